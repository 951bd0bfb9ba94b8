#!/usr/bin/env bash
# Every benchmark at the paper's sizes on one CUDA GPU, JSON + markdown into one folder (each step has its own
# time cap, 570 s together, so the whole stays under 10 minutes; never run on a GPU yet: none was available).
#
#   bench/gpu.sh [OUT_DIR]            # default outputs/gpu-<date>
#   bench/gpu.sh --smoke [OUT_DIR]    # no GPU: the CPU path of every benchmark at tiny sizes (a rot check)
#
# Steps: generator alone (256 and 1024, batch 1 and 8: reference, fp32, bf16, fp16, compiled), the speed table
# (bench/inference.py: CLCAE vs pSp), the training step at 1024 x 8 (ours vs the authors' three passes, and AMP),
# the bulk inversion job (Ray Data, 1 GPU actor) and Serve under load (1 GPU replica).  Weights are random at the
# official sizes: nothing is downloaded.  OUT_DIR/summary.md gathers every table; the JSON files hold the rest.
set -euo pipefail

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
OUT="${1:-outputs/gpu-$(date +%Y%m%d-%H%M%S)}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
cd "$ROOT"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
RANDOM_WEIGHTS=(generator.checkpoint=null encoder.pretrained=null 'directions={}')  # nothing to download

step() {  # step NAME SECONDS COMMAND...: run with a time cap, keep going if one step fails, log everything
  local name="$1" cap="$2"; shift 2
  echo "[gpu.sh] $name: $*" | tee -a "$OUT/log.txt"
  local t0=$SECONDS
  if timeout "$cap" "$@" >>"$OUT/log.txt" 2>&1; then
    echo "[gpu.sh] $name done in $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
  else
    echo "[gpu.sh] $name FAILED or timed out after $((SECONDS - t0)) s (see log.txt)" | tee -a "$OUT/log.txt"
  fi
}

if [[ $SMOKE == 1 ]]; then
  step generator 300 "$PY" bench/generator.py --smoke --modes reference fp32 bf16 fp16 --out "$OUT/generator.json"
  step speed_table 300 "$PY" bench/inference.py --config configs/tiny.yaml --sizes 64 --batches 1 2 --repeats 1 \
    --out "$OUT/speed.json"
  step train_step 300 "$PY" bench/train_step.py --smoke --out "$OUT/train_step.json"
  step batch 600 "$PY" bench/batch.py --images 32 --batch 8 --actors 1 --cpus 2 --out "$OUT/batch.json"
  step serve 600 "$PY" bench/serve_load.py --requests 16 --concurrency 4 --warmup 2 --out "$OUT/serve.json"
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1 || true
  # caps add up to 570 s; a step that runs over is cut and logged, the others still run
  step generator 120 "$PY" bench/generator.py --device cuda --sizes 256 1024 --batches 1 8 --rounds 10 \
    --modes reference fp32 bf16 fp16 --out "$OUT/generator.json"
  # compiling costs tens of seconds per (size, batch): one shape only
  step generator_compiled 90 "$PY" bench/generator.py --device cuda --sizes 1024 --batches 8 --rounds 5 \
    --modes fp32 compiled --out "$OUT/generator_compiled.json"
  step speed_table 100 "$PY" bench/inference.py --device cuda --repeats 20 --train-forward-batches 1 8 \
    --out "$OUT/speed.json"
  step train_step 100 "$PY" bench/train_step.py --device cuda --cases paper256 paper1024 --batch 8 --steps 5 \
    --variants shared three_pass bf16 fp16 --out "$OUT/train_step.json"
  step batch 80 "$PY" bench/batch.py --config configs/ffhq.yaml --images 1024 --image-size 256 --batch 32 \
    --actors 1 --cpus 8 --out "$OUT/batch.json" "${RANDOM_WEIGHTS[@]}" infer.use_gpu=true
  step serve 80 "$PY" bench/serve_load.py --config configs/ffhq.yaml --requests 400 --concurrency 32 \
    --image-size 256 --out "$OUT/serve.json" "${RANDOM_WEIGHTS[@]}" serve.use_gpu=true
fi

"$PY" - "$OUT" "$SMOKE" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
parts = [f"# Benchmarks ({'smoke run, CPU, tiny sizes' if sys.argv[2] == '1' else 'CUDA, paper sizes'}): {out}", ""]
if (out / "gpu.txt").exists():
    parts += ["```", (out / "gpu.txt").read_text().strip(), "```", ""]
for name in ("generator", "generator_compiled", "speed", "train_step", "batch", "serve"):
    md, js = out / f"{name}.md", out / f"{name}.json"
    parts.append(f"## {name}")
    if md.exists():
        parts.append(md.read_text())
    elif js.exists():
        parts += ["```json", json.dumps(json.loads(js.read_text()), indent=1)[:6000], "```"]
    else:
        parts.append("(no output: see log.txt)")
    parts.append("")
(out / "summary.md").write_text("\n".join(parts))
print(f"[gpu.sh] wrote {out / 'summary.md'}")
PYEOF
