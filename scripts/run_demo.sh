#!/usr/bin/env bash
# The demo experiment on CPU (see README, "The demo"):
#   1. a synthetic, entity-rich world with one fixed data seed          (cached under $CACHE_DIR)
#   2. a tiny CLIP pre-trained on the world's simple captions            (cached under $CACHE_DIR)
#   3. zero-shot re-ranking, then global-only and AGREE fine-tuning over several training seeds
#   4. results.md, results.json, rsum.png, retrieval_examples.png        -> $DEMO_DIR
# PRESET=default (3 seeds, ~17 min on 2 cores) | quick (1 seed, a first look) | full (+ the ablation).
# Every setting can be changed through the environment, e.g. SEEDS=0,1,2,3 LR=1e-3 bash scripts/run_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
args=(--preset "${PRESET:-default}" --out "${DEMO_DIR:-tmp/demo}" --cache "${CACHE_DIR:-tmp/cache}"
      --eval-split "${EVAL_SPLIT:-test}")
# recipe settings: environment variable NAME -> flag --name (unset: the preset's value); counts of images
# (TRAIN_IMAGES ...) -> --num-train-images ...; the switches LOCK_IMAGE and ABLATION take 1 or 0
for name in DATA_SEED TRAIN_IMAGES TRAIN_CAPTIONS VAL_IMAGES TEST_IMAGES TWIN_PAIRS VG_PER_OBJECT MODEL \
            PRETRAIN_IMAGES PRETRAIN_CAPTIONS PRETRAIN_EPOCHS PRETRAIN_BATCH PRETRAIN_LR PRETRAIN_WARMUP \
            SEEDS EPOCHS BATCH_SIZE LR WARMUP WD LOCK_IMAGE METHODS ABLATION; do
    [ -n "${!name:-}" ] || continue
    flag="$(echo "$name" | tr 'A-Z_' 'a-z-')"
    case "$name" in
        *_IMAGES) args+=("--num-$flag" "${!name}") ;;
        LOCK_IMAGE|ABLATION)
            case "${!name}" in
                1|true|yes) args+=("--$flag") ;;
                0|false|no) args+=("--no-$flag") ;;
                *) echo "error: $name must be 1 or 0, got '${!name}'" >&2; exit 2 ;;
            esac ;;
        *) args+=("--$flag" "${!name}") ;;
    esac
done
start=$(date +%s)
"$PY" -u scripts/demo.py "${args[@]}"
echo "Done in $(( $(date +%s) - start )) s: ${DEMO_DIR:-tmp/demo}/results.md, results.json, rsum.png, retrieval_examples.png"
