#!/usr/bin/env bash
# The whole FreqLDM pipeline on the built-in dead-leaves set, on CPU.
#
#   bash demo.sh [OUT]            # cpu-demo presets: 8 to 12 minutes on 2 idle CPU cores
#   bash demo.sh --smoke [OUT]    # smoke presets: about a minute (what CI runs)
#
# Stage 1 trains the ViT VAE with MLSR; Stage 2 trains SiT three times on its latents: baseline,
# FreqWarm (r0 = 0.2) and denoised latents (level 1) with FDA, keeping the EMA every KEEP steps. Stage 3
# samples each, scores the samples with the offline dead-leaves metric, draws the metric against the training
# step over the kept checkpoints (a coarse curve: few samples, Euler), compares the runs (table + figure of the
# validation loss), measures reconstruction per MLSR level, runs the frequency diagnosis, and computes FID
# only if clean-fid's Inception weights are on disk.
set -euo pipefail
cd "$(dirname "$0")"
PRESET=cpu-demo; N_SAMPLES=200; N_EVAL=128; SAMPLE_STEPS=25; DL=(); KEEP=500; N_CURVE=100; CURVE_STEPS=10
if [ "${1:-}" = "--smoke" ]; then
    PRESET=smoke; N_SAMPLES=10; N_EVAL=16; SAMPLE_STEPS=4; DL=(--dl-train-images 200 --dl-steps 30); shift
    KEEP=3; N_CURVE=6; CURVE_STEPS=2
fi
OUT=${1:-demo_out}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
INCEPTION=${INCEPTION:-/tmp/inception-2015-12-05.pt}
mkdir -p "$OUT"
step() { echo; echo "==> $*"; }

step "dataset: one row per dead-leaves class"
"$PY" data.py show --resolution 32 --out "$OUT/deadleaves_classes.png"

step "stage 1: ViT VAE with multi-level spectral regularization ($PRESET)"
"$PY" train_vae.py --preset "$PRESET" --out "$OUT/vae"

RUNS=(baseline freqwarm dvae)
for RUN in "${RUNS[@]}"; do
    FLAGS=()
    [ "$RUN" = freqwarm ] && FLAGS=(--freqwarm --r0 0.2)
    [ "$RUN" = dvae ] && FLAGS=(--denoise-level 1 --fda)
    step "stage 2: SiT, $RUN ${FLAGS[*]:-} ($PRESET)"
    "$PY" train_diffusion.py --preset "$PRESET" --vae "$OUT/vae/last.pt" --out "$OUT/sit-$RUN" --keep-every "$KEEP" "${FLAGS[@]}"
    step "stage 3: $N_SAMPLES samples from the $RUN SiT, and the offline dead-leaves metric (fd_dl, class_acc_dl)"
    "$PY" evaluate.py sample --ckpt "$OUT/sit-$RUN/last.pt" --num-samples "$N_SAMPLES" --batch 50 --sample-steps "$SAMPLE_STEPS" \
        --cfg-scale 2.0 --out "$OUT/samples-$RUN"
    "$PY" evaluate.py fid --features deadleaves --samples "$OUT/samples-$RUN.npz" --record "$OUT/sit-$RUN" "${DL[@]}"
done

step "stage 3: convergence curves: fd_dl of $N_CURVE samples (Euler, $CURVE_STEPS steps) from the EMA kept every $KEEP steps"
"$PY" evaluate.py curve "$OUT/sit-baseline" "$OUT/sit-freqwarm" "$OUT/sit-dvae" --num-samples "$N_CURVE" --batch 100 \
    --sampler euler --sample-steps "$CURVE_STEPS" --cfg-scale 2.0 --out "$OUT/curve" "${DL[@]}"

step "stage 3: the runs side by side (validation loss of the EMA on held-out latents, offline metrics)"
"$PY" evaluate.py compare "$OUT/sit-baseline" "$OUT/sit-freqwarm" "$OUT/sit-dvae" --out "$OUT/compare"

step "stage 3: reconstruction per MLSR level"
"$PY" evaluate.py recon --vae "$OUT/vae/last.pt" --n "$N_EVAL" --out "$OUT/recon" --inception-path "$INCEPTION"

step "stage 3: frequency diagnosis (FreqWarm findings 1-3)"
"$PY" evaluate.py diagnose --vae "$OUT/vae/last.pt" --n "$N_EVAL" --out "$OUT/diagnosis"

if [ -f "$INCEPTION" ]; then
    step "stage 3: FID / IS / precision-recall against the dead-leaves images"
    "$PY" data.py export --out "$OUT/reference" --n "$N_SAMPLES" --resolution 32
    for RUN in "${RUNS[@]}"; do
        "$PY" evaluate.py fid --record "$OUT/sit-$RUN" --samples "$OUT/samples-$RUN.npz" --ref "$OUT/reference" --inception-path "$INCEPTION"
    done
else
    step "FID skipped: clean-fid's Inception weights are not at $INCEPTION (no download here);"
    echo "    put inception-2015-12-05.pt there (or set INCEPTION=FILE) and rerun to get FID / IS."
fi

cat <<MSG

Done. Look at:
  $OUT/deadleaves_classes.png            the dataset, one row per class
  $OUT/vae/recon_final.png               input, then D(S_l(z)) for l = 0..3
  $OUT/sit-baseline/samples_*.png         SiT samples during training (one column per class)
  $OUT/sit-freqwarm/samples_*.png         the same with FreqWarm (r0 = 0.2)
  $OUT/samples-{baseline,freqwarm,dvae}.npz   ADM-style sample arrays
  $OUT/curve/curve.md, curve.png          fd_dl against the training step, the runs side by side
  $OUT/compare/compare.md, compare.png    the runs side by side: validation loss, fd_dl, class_acc_dl
  $OUT/recon/recon.json                  PSNR / SSIM / latent HF ratio per MLSR level
  $OUT/diagnosis/*.png                   F1-F3 figures and latent spectra
MSG
