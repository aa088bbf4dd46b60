#!/usr/bin/env bash
# Device check (see scripts/device_check.py): attention implementations in bf16, one-device pretraining (plain and
# --fully_shard, with a resume), and 192-layer throughput with and without per-layer compilation; one table.
#   scripts/device_check.sh [--output_dir DIR]      # on a GPU machine: under 8 minutes
#   scripts/device_check.sh --cpu [--output_dir DIR] # tiny sizes on CPU
# Exit status: 0 all checks passed, 1 some check failed (the table says which), 2 no GPU without --cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *" --cpu "* ]]; then
    exec python scripts/device_check.py "$@"  # no time budget: a shared 2-core machine may need several minutes
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec timeout 480 python scripts/device_check.py "$@"  # the 8-minute budget of a GPU run
