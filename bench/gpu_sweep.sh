#!/usr/bin/env bash
# Device call A: build, observe-mode sweep of two arch: models (bf16, synthetic task, batch 1
# and 8), then the report. Read-only on the GPU (no --allow-clock-changes).
set -u
OUT=${OUT:-/tmp/llm_dvfs_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
SRC=$PWD; cd /tmp
RUN=/tmp/h100_observe
python3 -m llm_dvfs.run --models arch:llama-3.2-1b,arch:gpt-neo-2.7b --tasks synthetic \
  --batch-sizes 1,8 --samples ${SAMPLES:-50} --max-new-tokens ${TOKENS:-64} --dtype bfloat16 \
  --ner heuristic --out $RUN 2>&1 | tee "$OUT/sweep.log" | grep -v "it/s\]" | tail -60
python3 -m llm_dvfs.report $RUN --out $RUN/report 2>&1 | tee "$OUT/report.txt" | tail -60
cp $RUN/report/report.md "$OUT/" 2>/dev/null; cp $RUN/report/report.html "$OUT/" 2>/dev/null
tar czf "$OUT/run.tgz" -C /tmp h100_observe
