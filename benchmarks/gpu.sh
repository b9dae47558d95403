#!/usr/bin/env bash
# The GPU check, as one command (at most 8 minutes on one GPU): per encoder (CLIP ViT-B/32,
# ViT-B/16, BERT-base; real-size random-init, bf16, 16 loader workers) on a synthetic
# 20,000-row dataset of 512 px JPEGs, the files -> cache rate, the forward-stage rate, the
# fixed seconds and the GPU's busy share in the forward stage; the GPU decode's cosine to the
# processor (benchmarks/image_fidelity.py); `compare --heads all` (5 folds x 3 seeds) on
# 4,000-row BERT-base + ViT-B/16 caches, batched vs one at a time; then each number against
# issue 16's targets, met / NOT met. See benchmarks/gpu_check.py for what each number means.
#
#   bash benchmarks/gpu.sh --prepare   # here, with the project's venv: wheels + model folders
#                                      # into .gpu/ (git-ignored), for a machine with no internet
#   bash benchmarks/gpu.sh             # on the GPU machine (python3 with torch); carry .gpu/
#   bash benchmarks/gpu.sh --smoke     # the same steps at toy size on the CPU
#
# The GPU machine needs python3 with torch, transformers, h5py, scikit-learn, typer, pillow,
# matplotlib, pyyaml, tqdm, charset-normalizer; lightgbm (and torchvision, for the GPU JPEG
# decode, when the prepared wheel matches the machine's torch) are installed from .gpu/wheels
# when missing. Extract runs with its default --decode auto (the GPU decode on CUDA). Output: the log on stdout, the numbers in $WORK/gpu_check.json (and $OUT when set).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
WORK=${WORK:-/tmp/fusebench-gpu-check}

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p .gpu/wheels
    # .gpu/ is git-ignored (.gitignore): wheels and model folders never land in a commit
    version=$("$PY" -c "import lightgbm; print(lightgbm.__version__)")
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/wheels "lightgbm==$version"
    # torchvision for the torch the GPU machine runs (TORCH_VERSION, default this venv's):
    # its CUDA build, 0.(minor + 15) for torch 2.minor; optional, the check runs without it
    tv=$("$PY" -c "import os, torch; v = os.environ.get('TORCH_VERSION', torch.__version__)
m = v.split('+')[0].split('.'); print(f'0.{int(m[1]) + 15}.*')")
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/wheels "torchvision==$tv" ||
        echo "note: no torchvision==$tv wheel; the GPU decode falls back to the CPU's" >&2
    "$PY" - <<'PYEOF'
import sys; sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from pathlib import Path
from gpu_check import build_models
print(build_models(Path(".gpu/models"), smoke=False))
PYEOF
    du -sh .gpu
    exit 0
fi

for pkg in lightgbm torchvision; do
    wheel=$(ls .gpu/wheels/"$pkg"-*.whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ] && ! "$PY" -c "import $pkg" 2>/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/fusebench-site "$wheel" || echo "note: $wheel did not install" >&2
    fi
done
[ -d /tmp/fusebench-site ] && export PYTHONPATH=/tmp/fusebench-site${PYTHONPATH:+:$PYTHONPATH}
# a torchvision whose ops do not load with this torch (another torch's build) is worse than
# none: extract's --decode auto would find it; leave it out then
if [ -d /tmp/fusebench-site/torchvision ] && ! "$PY" -c "import sys, torchvision.extension as e; sys.exit(not e._has_ops())" 2>/dev/null; then
    rm -rf /tmp/fusebench-site/torchvision /tmp/fusebench-site/torchvision-*
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
vocab=()
[ -f .gpu/models/bert-base/vocab.txt ] && vocab=(--vocab .gpu/models/bert-base)
"$PY" benchmarks/gpu_check.py --work "$WORK" "${vocab[@]}" "$@"
[ -n "${OUT:-}" ] && cp "$WORK/gpu_check.json" "$OUT/" || true
