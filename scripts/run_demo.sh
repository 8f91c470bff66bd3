#!/usr/bin/env bash
# The whole AGREE method on a synthetic dataset, on CPU, in minutes:
#   1. generate the entity-rich synthetic dataset in the release's layout   -> tmp/demo/
#   2. pre-train a tiny CLIP on the simple-caption split (our stand-in for OpenAI's checkpoint)
#                                                                            -> tmp/pretrained_models/tiny.pt
#   3. reproduce the paper's tables with the README's own recipes           -> tmp/demo/results.md
# Settings can be changed through the environment, e.g. DEVICE=cuda bash scripts/run_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
DEMO="${DEMO_DIR:-tmp/demo}"
DEVICE="${DEVICE:-cpu}"
SEED="${SEED:-0}"
PRETRAINED="${PRETRAINED:-tmp/pretrained_models/tiny.pt}"
# Sizes of the synthetic world and the two trainings (the defaults fit ~10 minutes on 2 CPU cores).
TRAIN_IMAGES="${TRAIN_IMAGES:-1000}"
TEST_IMAGES="${TEST_IMAGES:-200}"
VAL_IMAGES="${VAL_IMAGES:-100}"
PRETRAIN_IMAGES="${PRETRAIN_IMAGES:-4000}"
TRAIN_CAPTIONS="${TRAIN_CAPTIONS:-1}"
VG_PER_OBJECT="${VG_PER_OBJECT:-20}"
PRETRAIN_BATCH="${PRETRAIN_BATCH:-64}"
FINETUNE_BATCH="${FINETUNE_BATCH:-32}"
PRETRAIN_EPOCHS="${PRETRAIN_EPOCHS:-3}"
FINETUNE_EPOCHS="${FINETUNE_EPOCHS:-1}"
PARTS="${PARTS:-zeroshot,finetune,ablation}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

start=$(date +%s)
DATA="$DEMO/datasets/flickr30k_images"
rm -rf "$DEMO"

echo "=========== 1. Synthetic dataset ==========="
"$PY" scripts/make_synthetic_dataset.py --out "$DEMO" --seed "$SEED" --quiet \
    --train-images "$TRAIN_IMAGES" --val-images "$VAL_IMAGES" --test-images "$TEST_IMAGES" \
    --pretrain-images "$PRETRAIN_IMAGES" --train-captions "$TRAIN_CAPTIONS" --vg-per-object "$VG_PER_OBJECT"

echo "=========== 2. Pre-training the tiny CLIP ==========="
"$PY" -u training/main_all.py \
    --train-data="$DEMO/pretrain/pretrain_pred.jsonl" \
    --train-images="$DEMO/pretrain/pretrain_images.npz" \
    --val-data="$DATA/annotation/flickr30k_val.json" \
    --data-root="$DATA" \
    --model tiny --device "$DEVICE" --seed "$SEED" \
    --epochs="$PRETRAIN_EPOCHS" --batch-size="$PRETRAIN_BATCH" --lr=1e-3 --wd=0.1 --warmup=100 --workers=0 \
    --save-frequency="$PRETRAIN_EPOCHS" --log-every-n-steps=50 \
    --logs="$DEMO/runs" --name=pretrain
"$PY" scripts/export_weights.py "$DEMO/runs/pretrain/checkpoints/epoch_${PRETRAIN_EPOCHS}.pt" "$PRETRAINED"

echo "=========== 3. Tables: zero-shot re-ranking, fine-tuning, ablation ==========="
"$PY" -u scripts/reproduce_tables.py \
    --data-root "$DATA" --vg-root "$DEMO/VG" --pretrained "$PRETRAINED" --model tiny --device "$DEVICE" \
    --out "$DEMO/results" --overwrite --parts "$PARTS" --seed "$SEED" \
    --epochs "$FINETUNE_EPOCHS" --batch-size "$FINETUNE_BATCH" --lr 2e-5 --wd 0.1 --warmup 5 --workers 0 --batch-size-eval 100
cp "$DEMO/results/results.md" "$DEMO/results.md"
[ -f "$DEMO/results/retrieval_examples.png" ] && cp "$DEMO/results/retrieval_examples.png" "$DEMO/retrieval_examples.png"

echo "Done in $(( $(date +%s) - start )) s. Tables: $DEMO/results.md, numbers: $DEMO/results/results.json," \
     "picture: $DEMO/retrieval_examples.png"
