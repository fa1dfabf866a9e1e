#!/usr/bin/env bash
# One device call: build the package, show the real GPU read-only, check energy sources.
# Usage (device machine): bash bench/gpu_smoke.sh   (writes under $OUT when set)
set -u
OUT=${OUT:-/tmp/llm_dvfs_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
cd /tmp
echo "== info"; python3 -m llm_dvfs.info | tee "$OUT/info.txt"
python3 -m llm_dvfs.info --json > "$OUT/info.json"
echo "== nvidia-smi (read-only query)"
nvidia-smi --query-gpu=name,uuid,pci.bus_id,driver_version,memory.total,power.limit,power.default_limit,power.min_limit,power.max_limit,clocks.sm,clocks.mem,clocks.applications.graphics,clocks.applications.memory --format=csv | tee "$OUT/nvidia_smi.csv"
nvidia-smi -q -d SUPPORTED_CLOCKS | grep -c "Graphics" | sed 's/^/supported graphics clock lines: /'
