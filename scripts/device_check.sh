#!/usr/bin/env bash
# The device check: run it first on a new GPU machine (docs/distributed.md, "Device check").
#
#   scripts/device_check.sh                 # on CUDA (the default when a GPU is visible); under 5 min on one GPU
#   scripts/device_check.sh --device cpu    # the same checks on the CPU, smaller (what the CI runs, ~40 s)
#   scripts/device_check.sh --list          # the checks' names
#   scripts/device_check.sh --only "ucd kernel,plop histogram"
#   scripts/device_check.sh --keep DIR      # work in DIR (new or empty) and keep it (runs, logs/ of every torchrun)
#
# It trains a VOC-shaped tiny task under torchrun (1 process, and 2 with 2 GPUs), with fp16/bf16
# autocast and channels_last, checks SyncBatchNorm, UCD's kernel and its gathered variant, PLOP's
# histogram reduction, eval and predict on the device, and prints one table: check | result |
# seconds | detail. Exit code 0 when no check failed (skipped checks do not fail), 1 when one did,
# 2 for a usage error (e.g. no CUDA without --device cpu).
#
# Environment: PYTHON=path  the Python that has ucdseg installed (default: .venv/bin/python if
#              present, else python3)
set -euo pipefail
source "$(dirname "$0")/_python.sh"
exec "$py" -m ucdseg.device_check "$@"
