#!/usr/bin/env bash
# The GPU check (speed issue, item 6): one command on a fresh GPU machine (16 cores, one
# H200, nothing installed, the package index reachable), in the repository root:
#
#     bash benchmarks/gpu_check.sh [SIZE]        # SIZE px square slide, default 50000
#
# Installs the project into .venv-gpu, synthesises an fls slide of SIZE x SIZE px at
# 0.25 um/px on all cores, runs `wsi-run --task fls --device cuda` through
# bench_gigapixel.py (per-stage seconds, RSS, GPU utilisation and memory sampled with
# nvidia-smi, total / reading floor) and the engine benchmark (windows/s, engine/bare), and
# prints the 100k x 100k extrapolation (stage seconds scale with tissue area: x (100k/SIZE)^2).
# Every figure also lands in $OUT (when set, as on the device tool) or bench-out/gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE="${1:-50000}"
DEST="${OUT:-bench-out/gpu}"
mkdir -p "$DEST"
CORES="$(nproc)"
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
pip install -q -e . 2>&1 | grep -v "^WARNING" || true
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "install: $(( $(date +%s) - start )) s"

python benchmarks/bench_gigapixel.py --sizes "$SIZE" --task fls --device cuda \
    --workers "$CORES" --out "$DEST/gigapixel" 2>&1 | tee "$DEST/gigapixel.log"
python benchmarks/bench_infer.py --device cuda --windows 512 --batch-size 32 \
    --workers 8 2>&1 | tee "$DEST/infer.log"

python - "$DEST/gigapixel/gigapixel.json" <<'PY' | tee "$DEST/extrapolation.txt"
import json, sys
row = json.load(open(sys.argv[1]))["rows"][0]
scale = (100_000 / row["size"]) ** 2
stages = {k: float(v) for k, v in row["stages_s"].items()}
print(f"{row['size']} x {row['size']}: wall {row['wall_s']:.1f} s, reading floor "
      f"{row['floor_s']:.1f} s; 100k x 100k extrapolated wall: {row['wall_s'] * scale:.1f} s "
      "(goal <= 20 s including decode)")
for name, seconds in stages.items():
    print(f"  {name:<8} {seconds:8.2f} s -> {seconds * scale:8.2f} s at 100k")
PY
echo "gpu_check: $(( $(date +%s) - start )) s in all"
