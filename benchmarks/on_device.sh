#!/usr/bin/env bash
# Runs a benchmark command on a lent GPU machine, which holds a copy of this tree, its own python3
# with CUDA torch, and no package index.
#   bash benchmarks/on_device.sh SECONDS COMMAND...     (output also in $OUT/log.txt)
# Prepared here beforehand (folders git-ignored, carried with the tree):
#   .whl/        wheels of what that python lacks: pydantic, pydantic-core (cp312), annotated-types,
#                typing-inspection, onnx2torch
#   .gpu/zoo/    the zoo files the command reads: python benchmarks/copy_zoo_for_device.py DATASET
#   .gpu/commit  the commit measured (that copy has no .git)
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TROJANSCAN_GIT_COMMIT="$(cat .gpu/commit)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log.txt"
python3 -c "import torch, onnx, onnxruntime, onnx2torch, pydantic; print('torch', torch.__version__, torch.cuda.is_available())" || exit 3
limit="$1"; shift
timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
