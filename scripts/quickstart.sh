#!/usr/bin/env bash
# The main job, end to end: scan data → train three styles (LoRA, DreamBooth, Textual Inversion) →
# stylize a content image → evaluate every method against the plain img2img baseline → plots.
#
# Default (no arguments): the `tiny` model on a generated synthetic dataset, offline, a few minutes on a CPU.
#   It checks that every step runs; its numbers are NOT quality results (random weights, smoke metrics).
# Real run (Kaggle GPU, SD v1.5):
#   MODEL=stable-diffusion-v1-5/stable-diffusion-v1-5 WIKIART_ROOT=/kaggle/input/wikiart \
#   COCO_ROOT=/kaggle/input/coco-2017-dataset/coco2017/val2017 STYLE=Analytical_Cubism \
#   OUT=/kaggle/working/quickstart bash scripts/quickstart.sh
# In a Kaggle or Colab notebook (KAGGLE_KERNEL_RUN_TYPE is set / google.colab imports), or with SKIP_SETUP=1, it
# uses the notebook's own Python and preinstalled packages (`python -m customgen`, after the README's install
# cell) and never creates .venv: a second environment there would download torch again for nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_DISABLE_TELEMETRY=1 MPLBACKEND=Agg
PY=$(command -v python3 || command -v python)
if [ -n "${KAGGLE_KERNEL_RUN_TYPE:-}" ] || "$PY" -c "import google.colab" 2>/dev/null; then
  SKIP_SETUP=1
fi
if [ "${SKIP_SETUP:-0}" = 1 ]; then
  "$PY" -c "import customgen" 2>/dev/null || {
    echo "error: customgen is not installed for $PY; run the README's install cell first (cd into the clone, pip install -q -r requirements.txt)" >&2
    exit 2; }
  echo "using $PY and its installed packages (no .venv)"
  cg() { "$PY" -m customgen "$@"; }
else
  bash scripts/setup.sh
  cg() { .venv/bin/customgen "$@"; }
fi

MODEL=${MODEL:-tiny}
OUT=${OUT:-outputs/quickstart}
SMOKE=()
if [ "$MODEL" = tiny ]; then
  export HF_HUB_OFFLINE=1
  cg data samples "$OUT/data" --overwrite
  WIKIART_ROOT=${WIKIART_ROOT:-$OUT/data/wikiart}
  COCO_ROOT=${COCO_ROOT:-$OUT/data/coco/val2017}
  STYLE=${STYLE:-Stripes}
  SMOKE=(--smoke)
else
  : "${WIKIART_ROOT:?set WIKIART_ROOT}" "${COCO_ROOT:?set COCO_ROOT}" "${STYLE:?set STYLE}"
fi

echo "== 1/5 scan data"
cg data scan "$WIKIART_ROOT" --layout wikiart --out "$OUT/selection" --overwrite
cg data scan "$COCO_ROOT" --layout coco --out "$OUT/selection" --overwrite

echo "== 2/5 train LoRA, DreamBooth and Textual Inversion on style $STYLE"
for recipe in lora_style dreambooth_style textual_inversion; do
  cg train "configs/$recipe.yaml" --model "$MODEL" "${SMOKE[@]}" --set "data.root=$WIKIART_ROOT" \
     --set "data.style=$STYLE" --output "$OUT/styles/$recipe" --overwrite
done

echo "== 3/5 stylize one content image"
first=$(find "$COCO_ROOT" -maxdepth 1 -type f \( -name '*.jpg' -o -name '*.png' \) | sort | head -n 1)
cg stylize --model "$MODEL" --content "$first" --style "$OUT/styles/lora_style" --out "$OUT/stylized.png" --overwrite \
   $( [ "$MODEL" = tiny ] && echo "--size 64 --steps 4" )

echo "== 4/5 + 5/5 evaluate every style and the baseline; metrics and plots"
cg evaluate configs/eval.yaml --model "$MODEL" --set "eval.styles=$OUT/styles" --set "eval.content_root=$COCO_ROOT" \
   --set "eval.style_root=$WIKIART_ROOT" --set "eval.output=$OUT/results" "${SMOKE[@]}" --overwrite
echo "done: artifacts in $OUT/styles, metrics and plots in $OUT/results"
