#!/usr/bin/env bash
# The embedded-benchmark study (docs/results/): every method on two tasks of the embedded
# benchmark, overlapped, three seeds, plus an ablation of UCD's weight; then the reports.
#
#   scripts/study.sh        # about 1 h 50 min on 2 CPU cores; reports into docs/results/
#
# Tasks: 4-3-3 (a few larger steps, the demo's task) and 6-1 (a long sequence of single-class
# steps). Both start from the demo's config (src/ucdseg/configs/demo.yaml: ResNet-18 DeepLab-v3
# with the embedded pre-trained backbone, 64 px crops, batch 16, lr 0.05); the study trains step 0
# for 400 iterations and every later step for 50 (4-3-3) or 30 (6-1, one class per step) at a
# later-step lr of 0.02 (docs/embedded.md: at the demo's 0.05 the papers' distillation weights
# collapse LwF, ILT and PLOP to background; at 0.01 no method learns its new classes).
# Each (task, seed) trains step 0 once and every method but joint reuses it; joint trains its
# single step for the same number of iterations as step 0.
# The ablation (4-3-3 only): MiB+UCD and PLOP+UCD with UCD weighted 0.1 and 1 instead of the
# paper's 0.01, reusing the same step 0; its report (docs/results/ucd-weight/) shows the three
# weights side by side and pairs each run with the MiB / PLOP of its seed.
# (task, seed) units run JOBS at a time, one torch thread each, so the numbers do not depend on
# the machine's core count (docs/methods.md, Determinism). Interrupted runs continue where they
# stopped when the script is run again; finished runs are skipped.
#
# Environment:
#   SEEDS="0 1 2", TASKS="4-3-3 6-1", WEIGHTS="0.1 1" (the ablation's UCD weights; "" for none)
#   JOBS=2          units at once (a second copy of the script skips the units the first one runs)
#   OUT=runs/study  where the runs go (the ablation's: $OUT-ucd-weight)
#   REPORT=1        write the reports at the end (0: only run)
#   PYTHON=path     the Python that has ucdseg installed (default: .venv/bin/python if present)
#   DRY_RUN=1       print the commands instead of running them
set -euo pipefail
source "$(dirname "$0")/_python.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

out=${OUT:-runs/study}
seeds=${SEEDS:-0 1 2}
tasks=${TASKS:-4-3-3 6-1}
weights=${WEIGHTS-0.1 1}
methods=ft,lwf,lwf-mc,ilt,mib,mib+ucd,plop,plop+ucd,joint
declare -A next_iters=([4-3-3]=50 [6-1]=30)
for task in $tasks; do
  if [ -z "${next_iters[$task]:-}" ]; then
    echo "study.sh: TASKS names $task; the study's tasks are ${!next_iters[*]}" >&2
    exit 2
  fi
done
run() {
  if [ "${DRY_RUN:-0}" = "1" ]; then echo "+ $*"; else "$@"; fi
}

# one (task, seed): every method sharing step 0, then (4-3-3) the UCD-weight ablation on that step 0
unit() {
  local task=$1 seed=$2
  local dir=$out/$task/seed$seed
  local settings=(task.name=$task train.iterations=400 train.lr_next=0.02 "train.iterations_next=${next_iters[$task]}")
  run "$py" -m ucdseg.cli --quiet demo --methods "$methods" --seed "$seed" --output-dir "$dir" "${settings[@]}"
  if [ "$task" = 4-3-3 ]; then
    for weight in $weights; do
      for method in mib+ucd plop+ucd; do
        run "$py" -m ucdseg.cli --quiet run "$demo_config" \
          "${settings[@]}" "seed=$seed" "method.name=$method" "method.weights.ucd=$weight" \
          "name=$method-w$weight" "output_dir=$out-ucd-weight/$task/seed$seed" "train.step0_from=$dir/ft"
      done
    done
  fi
}

demo_config=$("$py" -c 'from ucdseg.cli import packaged_config as p; print(p("demo.yaml"))')
failed=0
for seed in $seeds; do
  for task in $tasks; do
    if [ "${DRY_RUN:-0}" = "1" ]; then
      unit "$task" "$seed"
      continue
    fi
    mkdir -p "$out/$task"
    (
      # a second copy of this script skips what another one is running
      if ! flock -n 9; then echo "== study: task $task, seed $seed is being run by another process" >&2; exit 0; fi
      echo "== study: task $task, seed $seed" >&2
      unit "$task" "$seed"
    ) 9>"$out/$task/seed$seed.lock" &
    while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-2}" ]; do wait -n || failed=1; done
  done
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
if [ "$failed" != 0 ]; then
  echo "study.sh: a run failed (see above); run the script again to continue" >&2
  exit 1
fi

if [ "${REPORT:-1}" != "0" ]; then
  for task in $tasks; do
    run "$py" -m ucdseg.cli report "$out/$task"/seed*/*/ --output-dir "$repo/docs/results/$task"
  done
  if [ -n "$weights" ]; then  # the weight sweep: the study's runs at 0.01 beside the ablation's
    run "$py" -m ucdseg.cli report "$out/4-3-3"/seed*/{mib,mib+ucd,plop,plop+ucd}/ "$out-ucd-weight/4-3-3"/seed*/*/ \
      --output-dir "$repo/docs/results/ucd-weight"
  fi
fi
