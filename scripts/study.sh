#!/usr/bin/env bash
# The embedded-benchmark study (docs/results/): every method on two tasks of the embedded
# benchmark (v2), overlapped, then the reports.
#
#   scripts/study.sh                      # the study; reports into docs/results/ (timing: docs/results/README.md)
#   WEIGHTS="0.1 1" scripts/study.sh      # and the UCD-weight sweep (about 20 min more)
#
# Tasks: 4-3-3 (the demo's task, steps of 3 classes) and 6-1 (single-class steps). Both use the
# demo's settings (src/ucdseg/configs/demo.yaml: the embedded ResNet-10 DeepLab-v3 with the embedded
# pre-trained backbone, 3 epochs in every step, lr 0.05 then 0.005): the papers' protocol shape,
# no per-method tuning, every method at its paper's loss weights.
# Seeds: the four methods UCD is compared on (MiB, MiB+UCD, PLOP, PLOP+UCD) run SEEDS (5 seeds, so
# that the paired UCD gain gets a 95 % interval); the other methods run BASELINE_SEEDS (3).
# Each (task, seed) trains step 0 once per step-0 loss (cross-entropy; BCE for MiB's LwF-MC) and the
# methods reuse it; joint trains its single step for the same 3 epochs.
# The UCD-weight sweep (4-3-3, when WEIGHTS is given): MiB+UCD and PLOP+UCD with UCD weighted
# WEIGHTS instead of the paper's 0.01, on SWEEP_SEEDS, reusing the same step 0. It is not part of
# the default study (it asks another question: what weight suits this benchmark).
# Units run JOBS at a time, one torch thread each, so the numbers do not depend on the machine's
# core count (docs/methods.md, Determinism); the UCD pairs of every seed come first, then the
# baselines, then the sweep. Interrupted runs continue where they stopped when the script is run
# again; finished runs are skipped.
#
# Environment:
#   SEEDS="0 1 2 3 4", BASELINE_SEEDS="0 1 2" ("" for none), TASKS="4-3-3 6-1"
#   WEIGHTS=""      the sweep's UCD weights (e.g. "0.1 1"; default none), SWEEP_SEEDS="0 1 2"
#   JOBS=2          units at once (units of the same task and seed wait for each other)
#   OUT=runs/study  where the runs go (the sweep's: $OUT-ucd-weight)
#   REPORT=1        write the reports at the end (0: only run)
#   PYTHON=path     the Python that has ucdseg installed (default: .venv/bin/python if present)
#   DRY_RUN=1       print the commands instead of running them
set -euo pipefail
source "$(dirname "$0")/_python.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

out=${OUT:-runs/study}
seeds=${SEEDS:-0 1 2 3 4}
baseline_seeds=${BASELINE_SEEDS-0 1 2}
tasks=${TASKS:-4-3-3 6-1}
weights=${WEIGHTS-}
sweep_seeds=${SWEEP_SEEDS-0 1 2}
compared=mib,mib+ucd,plop,plop+ucd
baselines=ft,lwf,lwf-mc,ilt,joint
for task in $tasks; do
  case $task in 4-3-3|6-1) ;; *) echo "study.sh: TASKS names $task; the study's tasks are 4-3-3 6-1" >&2; exit 2 ;; esac
done
run() {
  if [ "${DRY_RUN:-0}" = "1" ]; then echo "+ $*"; else "$@"; fi
}
contains() { case " $1 " in *" $2 "*) return 0 ;; esac; return 1; }

# one unit of work: (phase, task, seed). Phase "compared": the compared methods sharing step 0;
# phase "baselines": the baselines (they reuse the compared methods' step 0 where the loss matches);
# phase "sweep" (4-3-3): the UCD-weight sweep on the same step 0.
unit() {
  local phase=$1 task=$2 seed=$3
  local dir=$out/$task/seed$seed
  case $phase in
    compared) run "$py" -m ucdseg.cli --quiet demo --methods "$compared" --seed "$seed" --output-dir "$dir" "task.name=$task" ;;
    baselines) run "$py" -m ucdseg.cli --quiet demo --methods "$compared,$baselines" --seed "$seed" --output-dir "$dir" \
                 "task.name=$task" ;;
    sweep)
      for weight in $weights; do
        for method in mib+ucd plop+ucd; do
          run "$py" -m ucdseg.cli --quiet run "$demo_config" "task.name=$task" "seed=$seed" "method.name=$method" \
            "method.weights.ucd=$weight" "name=$method-w$weight" "output_dir=$out-ucd-weight/$task/seed$seed" \
            "train.step0_from=$dir/mib"
        done
      done ;;
  esac
}

# the units in order of importance: the UCD pairs over every seed first, then the baselines, then the sweep
units=()
for seed in $seeds; do for task in $tasks; do units+=("compared $task $seed"); done; done
for seed in $baseline_seeds; do for task in $tasks; do units+=("baselines $task $seed"); done; done
if [ -n "$weights" ] && contains "$tasks" 4-3-3; then for seed in $sweep_seeds; do units+=("sweep 4-3-3 $seed"); done; fi

demo_config=$("$py" -c 'from ucdseg.cli import packaged_config as p; print(p("demo.yaml"))')
failed=0
for item in "${units[@]}"; do
  read -r phase task seed <<<"$item"
  if [ "${DRY_RUN:-0}" = "1" ]; then
    unit "$phase" "$task" "$seed"
    continue
  fi
  mkdir -p "$out/$task"
  (
    # one (task, seed) at a time: its phases share step 0; a second copy of this script waits
    flock 9
    echo "== study: $phase, task $task, seed $seed" >&2
    unit "$phase" "$task" "$seed"
  ) 9>"$out/$task/seed$seed.lock" &
  while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-2}" ]; do wait -n || failed=1; done
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
  if [ -n "$weights" ] && contains "$tasks" 4-3-3; then  # the sweep: the study's runs at 0.01 beside it
    run "$py" -m ucdseg.cli report "$out/4-3-3"/seed*/{mib,mib+ucd,plop,plop+ucd}/ "$out-ucd-weight/4-3-3"/seed*/*/ \
      --output-dir "$repo/docs/results/ucd-weight"
  fi
fi
