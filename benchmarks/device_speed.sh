#!/usr/bin/env bash
# benchmarks/speed.py --device cuda on a lent GPU machine that runs a copy of this tree with its own
# python3 and CUDA torch and no package index. Prepare here (both folders git-ignored, carried):
#   .whl/      wheels of what that python lacks: pydantic, pydantic-core (cp312), annotated-types,
#              typing-inspection, onnx2torch
#   .gpu/zoo/  manifest.json, clean_samples.npz and fm-square5-br/model.onnx from zoo/fashion-mnist
#   .gpu/commit  the commit measured (that copy has no .git)
# Then run `bash benchmarks/device_speed.sh [SECONDS]` there; results land in $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TROJANSCAN_GIT_COMMIT="$(cat .gpu/commit)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, onnx, onnxruntime, onnx2torch, pydantic; print('torch', torch.__version__, torch.cuda.is_available())" || exit 3
timeout "${1:-420}" python3 benchmarks/speed.py --zoo .gpu/zoo --model fm-square5-br --threads 8 --device cuda \
    --results-dir "$OUT" 2>&1 | tee "$OUT/speed_log.txt"
