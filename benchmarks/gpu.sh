#!/usr/bin/env bash
# The GPU check, as one command (at most 8 minutes on one GPU): extraction speed from files to
# finished cache (BERT-base texts/s, ViT-B/16 and CLIP ViT-B/32 images/s, bf16, 16 loader
# workers, one-pass vs separate) and `compare --heads all` (5 folds x 2 seeds) batched vs one at
# a time, on a synthetic 4,000-row dataset with real-size random-init encoders.
# See benchmarks/gpu_check.py for what each number means.
#
#   bash benchmarks/gpu.sh --prepare   # here, with the project's venv: wheels + model folders
#                                      # into .gpu/ (git-ignored), for a machine with no internet
#   bash benchmarks/gpu.sh             # on the GPU machine (python3 with torch); carry .gpu/
#   bash benchmarks/gpu.sh --smoke     # the same steps at toy size on the CPU
#
# The GPU machine needs python3 with torch, transformers, h5py, scikit-learn, typer, pillow,
# matplotlib, pyyaml, tqdm, charset-normalizer; lightgbm is installed from .gpu/wheels when
# missing. Output: the log on stdout, the numbers in $WORK/gpu_check.json (and $OUT when set).
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
    "$PY" - <<'PYEOF'
import sys; sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from pathlib import Path
from gpu_check import build_models
print(build_models(Path(".gpu/models"), smoke=False))
PYEOF
    du -sh .gpu
    exit 0
fi

if ! "$PY" -c "import lightgbm" 2>/dev/null && ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fusebench-site .gpu/wheels/*.whl
    export PYTHONPATH=/tmp/fusebench-site${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
vocab=()
[ -f .gpu/models/bert-base/vocab.txt ] && vocab=(--vocab .gpu/models/bert-base)
"$PY" benchmarks/gpu_check.py --work "$WORK" "${vocab[@]}" "$@"
[ -n "${OUT:-}" ] && cp "$WORK/gpu_check.json" "$OUT/" || true
