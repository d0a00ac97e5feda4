#!/usr/bin/env bash
# The embedded-benchmark study (docs/results/): every method on two tasks of the embedded
# benchmark, overlapped, three seeds; then one report per task (mean and std over the seeds).
#
#   scripts/study.sh                 # runs into runs/study, reports into docs/results/<task>/
#
# Tasks: 4-3-3 (a few larger steps, the demo's task) and 6-1 (a long sequence of single-class
# steps). Both start from the demo's config (src/ucdseg/configs/demo.yaml: ResNet-18 DeepLab-v3
# with the embedded pre-trained backbone, 64 px crops, batch 16, lr 0.05); the study trains step 0
# for 400 iterations and every later step for 50 (4-3-3) or 30 (6-1, one class per step) at a
# later-step lr of 0.02 (docs/embedded.md: at the demo's 0.05 the papers' distillation weights
# collapse LwF, ILT and PLOP to background; at 0.01 no method learns its new classes), so the
# whole study takes about an hour and a half on 2 CPU cores (two copies of the script at once).
# Each (task, seed) trains step 0 once and every method but joint reuses it; joint trains its
# single step for the same number of iterations as step 0. Interrupted runs continue where they
# stopped when the script is run again; finished runs are skipped.
#
# Environment:
#   SEEDS="0 1 2"   the seeds; TASKS="4-3-3 6-1" the tasks. Two copies of the script may run at
#                   once (e.g. with OMP_NUM_THREADS=1 each, to use two cores): a (task, seed) that
#                   one copy is running is skipped by the other (flock); REPORT=0 on all but the last
#   OUT=runs/study  where the runs go
#   REPORT=1        write the reports at the end (0: only run)
#   PYTHON=path     the Python that has ucdseg installed (default: .venv/bin/python if present)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then
  py=$repo/.venv/bin/python
else
  py=python3
fi
out=${OUT:-runs/study}
methods=ft,lwf,lwf-mc,ilt,mib,mib+ucd,plop,plop+ucd,joint
common=(train.iterations=400 train.lr_next=0.02)
declare -A next_iters=([4-3-3]=50 [6-1]=30)

for seed in ${SEEDS:-0 1 2}; do
  for task in ${TASKS:-4-3-3 6-1}; do
    mkdir -p "$out/$task"
    # one process per (task, seed): a second copy of this script skips what another one is running
    (
      if ! flock -n 9; then echo "== study: task $task, seed $seed is being run by another process" >&2; exit 0; fi
      echo "== study: task $task, seed $seed" >&2
      "$py" -m ucdseg.cli --quiet demo --methods "$methods" --seed "$seed" --output-dir "$out/$task/seed$seed" \
        "task.name=$task" "${common[@]}" "train.iterations_next=${next_iters[$task]}"
    ) 9>"$out/$task/seed$seed.lock"
  done
done

if [ "${REPORT:-1}" != "0" ]; then
  for task in 4-3-3 6-1; do
    "$py" -m ucdseg.cli report "$out/$task"/seed*/*/ --output-dir "$repo/docs/results/$task"
  done
fi
