#!/usr/bin/env bash
# One device call: build + install the package, install Zeus (and pytest if missing) from the
# wheels in .whl/, run the real-GPU tests, then bench/vs_zeus.py. Read-only on the GPU.
# Usage (device machine, repository root, .whl carried): bash bench/gpu_meter.sh
# Writes under $OUT when set: vs_zeus.json, vs_zeus.txt, pytest_gpu.txt, zeus_pip.log, info.json.
# Extra arguments go to vs_zeus.py (e.g. bash bench/gpu_meter.sh --quick).
set -u
OUT=${OUT:-/tmp/llm_dvfs_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
SRC=$PWD
echo "== build"
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3

echo "== zeus from .whl (optional)"
zeus_install() {
  [ -d .whl ] || { echo ".whl/ not here (carry it): no Zeus"; return 1; }
  # Full resolution needs scipy for scikit-learn; without it, Zeus's runtime deps one by one and
  # Zeus itself without deps (vs_zeus.py then provides sklearn.metrics.auc and says so).
  python3 -m pip install --no-index --find-links .whl zeus >"$OUT/zeus_pip.log" 2>&1 && return 0
  echo "full install failed ($(grep -m1 ERROR "$OUT/zeus_pip.log")); installing without scikit-learn"
  python3 -m pip install --no-index --find-links .whl nvidia-ml-py pydantic rich tyro httpx amdsmi \
      python-dateutil >>"$OUT/zeus_pip.log" 2>&1 &&
    python3 -m pip install --no-index --find-links .whl --no-deps zeus >>"$OUT/zeus_pip.log" 2>&1
}
zeus_install || echo "Zeus not installed (see $OUT/zeus_pip.log): vs_zeus.py runs without the Zeus columns"
(cd /tmp && python3 -c "import zeus, pynvml; print('zeus', zeus.__version__)" 2>&1 | tail -1)

echo "== GPU"
(cd /tmp && python3 -m llm_dvfs.info --json > "$OUT/info.json"; python3 -m llm_dvfs.info | head -12)
nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,memory.total,clocks.sm,clocks.mem --format=csv

echo "== sensor model (info --sensors: cached per UUID, used by every later PowerMonitor)"
(cd /tmp && python3 -m llm_dvfs.info --sensors --json > "$OUT/sensors.json"; python3 -m llm_dvfs.info --sensors --no-save --seconds 1 --no-bursts | tail -8; cat "$OUT/sensors.json")

echo "== real-GPU tests"
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --find-links .whl pytest 2>&1 | tail -2
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -40

echo "== vs_zeus"
cd /tmp
python3 "$SRC/bench/vs_zeus.py" --out "$OUT/vs_zeus.json" "$@" 2>&1 | tee "$OUT/vs_zeus.txt"
