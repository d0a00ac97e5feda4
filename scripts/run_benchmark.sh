#!/usr/bin/env bash
# Run every method config of one benchmark folder in turn, then write one comparison report.
#
#   scripts/run_benchmark.sh configs/voc/15-1-overlapped [key=value ...]
#
# The key=value overrides apply to every run (e.g. seed=1 data.root=/data/VOC2012 train.amp=bf16).
# Methods run in the order ft lwf ilt mib mib_ucd plop plop_ucd joint lwf_mc ewc pi rw mib_sdr ssul
# ssul_m dkd dkd_m (then any other config of the folder); files whose name starts with "_", or that another file of the folder names as its
# _base_, are bases, not runs. Methods whose step 0 computes the same thing (plain cross-entropy
# on the base classes for most; ucdseg's Method.first_step) share it: by default the first run of
# each such step 0 trains it and the others reuse it (train.step0_from), as the papers do; joint
# always trains its own single step. Runs that were interrupted continue where
# they stopped when the script is run again; finished runs are skipped quickly.
# At the end `ucdseg report` writes <output_dir>/<dataset>-<benchmark>-report/report.{md,csv,png}
# (e.g. runs/voc-15-1-overlapped-report/), with UCD Table 1's numbers beside the VOC rows.
#
# Environment:
#   NPROC=N          run each config with torchrun on N processes (one per GPU)
#   METHODS="a b"    only these config files (names without .yaml), in this order
#   SHARE_STEP0=0    train step 0 in every run instead of reusing the first run's
#                    (keep the same value when re-running: it is part of each run's config)
#   PYTHON=path      the Python that has ucdseg installed (default: .venv/bin/python if present,
#                    else python3)
#   DRY_RUN=1        print the commands instead of running them
set -euo pipefail

usage="usage: scripts/run_benchmark.sh BENCHMARK_FOLDER [key=value ...]  (e.g. configs/voc/15-1-overlapped)"
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  echo "$usage" >&2
  exit 2
fi
folder=${1%/}
shift
if [ ! -d "$folder" ]; then
  echo "run_benchmark.sh: $folder is not a folder; $usage" >&2
  exit 2
fi

source "$(dirname "$0")/_python.sh"

# ------------------------------------------------------------------ the configs, in method order
default_order="ft lwf ilt mib mib_ucd plop plop_ucd joint lwf_mc ewc pi rw mib_sdr ssul ssul_m dkd dkd_m"
configs=()
if [ -n "${METHODS:-}" ]; then
  for m in $METHODS; do
    if [ ! -f "$folder/$m.yaml" ]; then
      echo "run_benchmark.sh: METHODS names $m but $folder/$m.yaml does not exist" >&2
      exit 2
    fi
    configs+=("$folder/$m.yaml")
  done
else
  for m in $default_order; do
    if [ -f "$folder/$m.yaml" ]; then configs+=("$folder/$m.yaml"); fi
  done
  for f in "$folder"/*.yaml; do
    [ -f "$f" ] || continue
    m=$(basename "$f" .yaml)
    case "$m" in _*) continue ;; esac
    case " $default_order " in *" $m "*) continue ;; esac
    # a file other configs of the folder name as their _base_ is a base, not a run
    if grep -Eq "^_base_:[[:space:]]*[\"']?$m\.yaml[\"']?[[:space:]]*(#.*)?$" "$folder"/*.yaml; then continue; fi
    configs+=("$f")
  done
fi
if [ ${#configs[@]} -eq 0 ]; then
  echo "run_benchmark.sh: no method config (*.yaml not starting with _) in $folder" >&2
  exit 2
fi

# Load every config once up front (fails early on a typo) and get its run directory and which step 0
# it may share ("-" for joint: its own single step).
info=$(CONFIGS=$(printf '%s\n' "${configs[@]}") "$py" -c '
import hashlib, os, sys
from ucdseg.config import load_config
from ucdseg.methods import get_method
for path in os.environ["CONFIGS"].splitlines():
    cfg = load_config(path, sys.argv[1:])
    method = get_method(cfg.method.name)
    key = "-" if method.joint else hashlib.sha256(method.first_step.encode()).hexdigest()[:16]
    print(cfg.run_dir, key, sep="\t")
' "$@")
mapfile -t runs <<< "$info"

if [ -n "${NPROC:-}" ]; then
  launch=("$py" -m torch.distributed.run --standalone "--nproc_per_node=$NPROC" -m ucdseg.cli)
else
  launch=("$py" -m ucdseg.cli)
fi

run() {
  if [ -n "${DRY_RUN:-}" ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# ------------------------------------------------------------------------------------ the runs
declare -A step0_dirs=()  # step-0 identity -> the first run that trains it
run_dirs=()
for i in "${!configs[@]}"; do
  cfg=${configs[$i]}
  run_dir=${runs[$i]%%$'\t'*}
  step0=${runs[$i]#*$'\t'}
  extra=()
  if [ "$step0" != "-" ] && [ "${SHARE_STEP0:-1}" != "0" ]; then
    if [ -z "${step0_dirs[$step0]:-}" ]; then
      step0_dirs[$step0]=$run_dir
    else
      extra=("train.step0_from=${step0_dirs[$step0]}")
    fi
  fi
  echo "== [$((i + 1))/${#configs[@]}] $cfg -> $run_dir" >&2
  run "${launch[@]}" run "$cfg" "$@" ${extra[@]+"${extra[@]}"}
  run_dirs+=("$run_dir")
done

bench=$(basename "$folder")
parent=$(basename "$(dirname "$folder")")
if [ "$parent" != "configs" ] && [ "$parent" != "." ]; then bench=$parent-$bench; fi
report_dir=$(dirname "${run_dirs[0]}")/$bench-report
run "$py" -m ucdseg.cli report "${run_dirs[@]}" --output-dir "$report_dir" --paper
