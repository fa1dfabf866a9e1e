#!/usr/bin/env bash
# One device call for served traffic (issue 15), read-only on the GPU (observe mode): build,
# sensor model, arch:llama-3.2-1b bf16 under HF continuous batching at 1, 4 and 16 concurrent
# users, the same workload through lock-step generate at batch 1 and 8, both reports, and a
# summary (bench/served_summary.py) of J/request, J/token, TTFT/TPOT percentiles and the sum check.
# Usage (device machine, repository root): bash bench/gpu_served.sh   (results under $OUT)
set -u
OUT=${OUT:-/tmp/llm_dvfs_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
SAMPLES=${SAMPLES:-40}; NEW=${NEW:-64}
echo "== build"; python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
nvidia-smi --query-gpu=name,uuid,driver_version,clocks.sm,clocks.mem --format=csv
cd /tmp
python3 -m llm_dvfs.info --sensors --json > "$OUT/sensors.json" 2>"$OUT/sensors.err" || tail -3 "$OUT/sensors.err"
COMMON=(--models arch:llama-3.2-1b --dtype bfloat16 --samples "$SAMPLES" --max-new-tokens "$NEW"
        --fixed-output-length --ner heuristic -q)
echo "== continuous batching, concurrency 1,4,16"
/usr/bin/time -f "served wall %e s" python3 -m llm_dvfs.run "${COMMON[@]}" --engine continuous \
  --concurrency 1,4,16 --warmup-requests 4 --cooldown-requests 4 --out "$OUT/served" 2>&1 | tail -15
echo "== lock-step generate, batch 1,8"
/usr/bin/time -f "lockstep wall %e s" python3 -m llm_dvfs.run "${COMMON[@]}" --batch-sizes 1,8 \
  --out "$OUT/lockstep" 2>&1 | tail -8
for r in served lockstep; do
  python3 -m llm_dvfs.report "$OUT/$r" --n-boot 200 > "$OUT/$r.report.txt" 2>&1; echo "report $r rc=$?"; tail -4 "$OUT/$r.report.txt"
done
python3 "$OLDPWD/bench/served_summary.py" "$OUT/served" "$OUT/lockstep" | tee "$OUT/served_summary.txt"
