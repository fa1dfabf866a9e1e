#!/usr/bin/env bash
# Issue 17: parallel sweeps on a real machine with several GPUs. READ-ONLY on every GPU: observe
# mode throughout (no --allow-clock-changes, no clock or power-limit change anywhere).
#   1. python -m llm_dvfs.info, then a 10 s burst on every GPU at once measured by ONE PowerMonitor
#      over all GPUs: per-GPU window energy vs its energy counter
#   2. observe-mode sweep of arch:llama-3.2-1b and arch:gpt-neo-2.7b (bf16, synthetic, 32 samples,
#      batch 1 and 8) with --gpus all, --ray local (skipped when Ray is not installed) and --gpus 0:
#      wall times, speed-up, each row's GPU UUID, the report
#   3. a model split over two GPUs (--gpus 0,1 --gpus-per-model 2, a local checkpoint of
#      arch:llama-3.2-1b, device_map balanced): energy summed, per GPU, vs the two counters
#   4. SIGKILL one worker mid-run: its cell re-runs on another GPU, no duplicate, no lost row
# Usage (device machine, repository root): bash bench/multi_gpu_run.sh   (results under $OUT)
set -u
OUT=${OUT:-/tmp/llm_dvfs_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
SAMPLES=${SAMPLES:-32}; TOKENS=${TOKENS:-64}; REPEATS=${REPEATS:-2}  # 2 models x 2 batch sizes x 2 = 8 cells
echo "== build"
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
cd /tmp
W=/tmp/llm_dvfs_multi; rm -rf $W; mkdir -p $W

echo "== 1. GPUs, and a 10 s burst on all of them at once"
python3 -m llm_dvfs.info | tee "$OUT/info.txt" | head -40
python3 -m llm_dvfs.info --json > "$OUT/info.json" 2>/dev/null
nvidia-smi --query-gpu=index,name,uuid,power.draw,clocks.sm --format=csv | tee "$OUT/nvidia_smi.csv"
python3 - <<'EOF' 2>&1 | tee "$OUT/burst.txt"
import json, os, threading, time
import torch
from llm_dvfs.devices import devices
from llm_dvfs.meter.monitor import PowerMonitor
devs = devices()
print(f"{len(devs)} GPU(s): " + ", ".join(f"{d.index} {d.name} {d.uuid}" for d in devs))
mon = PowerMonitor(devices=[d.index for d in devs]).start()
stop = threading.Event()
def burn(i):
    x = torch.randn(8192, 8192, device=f"cuda:{i}", dtype=torch.bfloat16)
    while not stop.is_set():
        for _ in range(20):
            x = (x @ x).clamp_(-1, 1)
        torch.cuda.synchronize(i)
threads = [threading.Thread(target=burn, args=(d.index,)) for d in devs]
for t in threads: t.start()
time.sleep(1.0)
w = mon.begin_window("burst")
time.sleep(10.0)
w.end(); stop.set()
for t in threads: t.join()
m = w.measurement(); mon.stop()
rows = []
for d in devs:
    dm = m.devices[d.index]
    rel = (dm.energy_j - dm.energy_j_counter) / dm.energy_j_counter if dm.energy_j_counter else float("nan")
    rows.append({"gpu": d.index, "uuid": d.uuid, "energy_j": dm.energy_j, "method": dm.energy_method,
                 "counter_j": dm.energy_j_counter, "rel_diff": rel, "avg_power_w": dm.avg_power_w})
    print(f"GPU {d.index}: window {dm.energy_j:.1f} J ({dm.energy_method}), counter {dm.energy_j_counter} J, "
          f"diff {100 * rel:+.2f} %, {dm.avg_power_w:.0f} W")
print(f"sum over GPUs: {m.energy_j:.1f} J, {m.avg_power_w:.0f} W, flags {m.flags}")
json.dump(rows, open(os.environ.get("OUT", "/tmp") + "/burst.json", "w"), indent=2)
EOF

GRID="--models arch:llama-3.2-1b,arch:gpt-neo-2.7b --tasks synthetic --batch-sizes 1,8 --samples $SAMPLES \
  --max-new-tokens $TOKENS --dtype bfloat16 --ner heuristic --repeats $REPEATS -q"
sweep() {  # name, extra flags...
  local name=$1; shift
  local t0=$(date +%s.%N)
  python3 -m llm_dvfs.run $GRID "$@" --out $W/$name > "$OUT/sweep_$name.log" 2>&1
  local rc=$?
  local t1=$(date +%s.%N)
  echo "$name $(python3 -c "print(round($t1 - $t0, 1))") $rc" | tee -a "$OUT/walls.txt"
}
echo "== 2. observe-mode sweeps: --gpus all, --ray local, --gpus 0 (name wall_s exit)"
: > "$OUT/walls.txt"
sweep all --gpus all
if python3 -c "import ray" 2>/dev/null; then
  sweep ray --ray local
else
  echo "Ray is not installed here (import ray failed): the --ray local sweep is skipped" | tee -a "$OUT/walls.txt"
fi
sweep one --gpus 0
python3 - <<'EOF' 2>&1 | tee "$OUT/sweeps.txt"
import json, os
import pandas as pd
W = "/tmp/llm_dvfs_multi"
walls = {l.split()[0]: float(l.split()[1]) for l in open(os.environ["OUT"] + "/walls.txt") if l.split()[-1] == "0"}
print("wall times (s):", walls)
for k in ("all", "ray"):
    if k in walls and "one" in walls:
        print(f"speed-up {k} vs 1 GPU: {walls['one'] / walls[k]:.2f}x")
ref = None
for k in ("one", "all", "ray"):
    p = f"{W}/{k}/requests.parquet"
    if not os.path.exists(p):
        continue
    r = pd.read_parquet(p)
    man = json.load(open(f"{W}/{k}/manifest.json"))
    print(f"\n{k}: {len(r)} rows, request ids unique: {r['request_id'].is_unique}, status {man['status']}, "
          f"workers: {[(w['host'], w['gpu_uuids'], w['pid']) for w in man.get('workers', [])]}")
    print(r.groupby(["cell_id", "gpu_uuid", "host"]).agg(n=("request_id", "size"), e_med_j=("energy_j", "median"),
                                                        p_w=("avg_power_w", "median")).to_string())
    cols = ["cell_id", "request_id", "tokens_in", "tokens_out", "output_text"]
    if ref is None:
        ref = r[cols]
    else:
        same = r[cols].reset_index(drop=True).equals(ref.reset_index(drop=True))
        print(f"{k}: same rows as the 1-GPU run (ids, tokens, outputs): {same}")
EOF
python3 -m llm_dvfs.report $W/all --out $W/all/report > "$OUT/report_all.txt" 2>&1; tail -40 "$OUT/report_all.txt"
cp $W/all/report/report.md "$OUT/report_all.md" 2>/dev/null

echo "== 3. a model split over two GPUs (local checkpoint of arch:llama-3.2-1b, device_map balanced)"
python3 - <<'EOF' 2>&1 | tail -3
from llm_dvfs.workload.models import load_model
lm = load_model("arch:llama-3.2-1b", dtype="bfloat16", device="cpu")
lm.model.save_pretrained("/tmp/llm_dvfs_multi/llama1b-ckpt"); lm.tokenizer.save_pretrained("/tmp/llm_dvfs_multi/llama1b-ckpt")
print("checkpoint written")
EOF
python3 -c "import accelerate" 2>/dev/null || echo "note: accelerate is not installed; transformers may refuse device_map"
python3 -m llm_dvfs.run --models /tmp/llm_dvfs_multi/llama1b-ckpt --tasks synthetic --batch-sizes 1,8 --samples $SAMPLES \
  --max-new-tokens $TOKENS --dtype bfloat16 --ner heuristic -q --gpus 0,1 --gpus-per-model 2 --out $W/split \
  > "$OUT/sweep_split.log" 2>&1; echo "exit $?"; tail -5 "$OUT/sweep_split.log"
python3 - <<'EOF' 2>&1 | tee "$OUT/split.txt"
import glob, json
for p in sorted(glob.glob("/tmp/llm_dvfs_multi/split/cells/*.json")):
    m = json.load(open(p))
    per, cnt = m.get("energy_j_by_gpu", {}), m.get("energy_j_counter_by_gpu", {})
    print(m["cell_id"], f"sum {m.get('energy_j')} J")
    for u in per:
        rel = (per[u] - cnt[u]) / cnt[u] if cnt.get(u) else float("nan")
        print(f"  {u}: {per[u]:.2f} J window, {cnt.get(u)} J counter ({100 * rel:+.2f} %)")
EOF

echo "== 4. SIGKILL one worker mid-run"
python3 -m llm_dvfs.run $GRID --repeats 4 --gpus all --out $W/kill > "$OUT/sweep_kill.log" 2>&1 &
DRIVER=$!
python3 - <<'EOF' 2>&1 | tee "$OUT/kill.txt"
import json, os, re, signal, time
run = "/tmp/llm_dvfs_multi/kill"
deadline = time.time() + 900
pat = re.compile(r"cell (\d+) started on worker (\d+) ")
while time.time() < deadline:
    try:
        log = open(run + "/run.log").read(); workers = json.load(open(run + "/manifest.json")).get("workers", [])
    except (OSError, ValueError):
        time.sleep(0.2); continue
    starts = pat.findall(log)
    if len(starts) > len(workers) and workers:  # a worker on its second cell: mid-cell, model loaded
        wid = int(starts[-1][1])
        w = next(x for x in workers if x["worker"] == wid)
        os.kill(w["pid"], signal.SIGKILL)
        print(f"killed worker {wid} (pid {w['pid']}, {w['gpu_uuids']}) during cell {starts[-1][0]}")
        break
    time.sleep(0.05)
EOF
wait $DRIVER; echo "driver exit $?" | tee -a "$OUT/kill.txt"
grep -E "died during|re-queued|came back twice" $W/kill/run.log | tee -a "$OUT/kill.txt"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/kill.txt"
import json
import pandas as pd
r = pd.read_parquet("/tmp/llm_dvfs_multi/kill/requests.parquet"); m = json.load(open("/tmp/llm_dvfs_multi/kill/manifest.json"))
print(f"{len(r)} rows, unique request ids: {r['request_id'].is_unique}, cells done {m['cells_done']} of {m['cells_total']}, "
      f"status {m['status']}")
EOF
nvidia-smi --query-gpu=index,clocks.sm,clocks.applications.graphics,power.limit --format=csv | tee "$OUT/after.csv"
tar czf "$OUT/runs.tgz" -C /tmp --exclude='*.safetensors' llm_dvfs_multi 2>/dev/null
echo "== done"
