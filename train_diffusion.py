"""Stage 2: SiT on frozen-VAE latents, with denoised latents, FDA and the FreqWarm curriculum.

    python train_diffusion.py --preset smoke                                           # CPU, seconds (after
                                                                                       # train_vae.py --preset smoke)
    python train_diffusion.py --preset cpu-demo [--freqwarm]                           # CPU, minutes
    python train_diffusion.py --preset dvae-f16d32 --vae runs/vae-f16d32/last.pt --data /data/imagenet/train
    torchrun --nproc_per_node=8 train_diffusion.py --freqwarm --r0 0.2 --vae VAE.pt --data /data/imagenet/train
    torchrun --nproc_per_node=8 train_diffusion.py --freqwarm --r0 0.2 --vae diffusers:mit-han-lab/dc-ae-f64c128-in-1.0-diffusers \\
             --image-size 512 --model uvit-H/1 --data /data/imagenet/train              # a pretrained AE, U-ViT
    torchrun --nnodes=4 --node_rank=$NODE_RANK --master_addr=$MASTER --master_port=29500 --nproc_per_node=8 \\
             train_diffusion.py --preset freqwarm-512 --vae VAE.pt --data /data/imagenet/train
    torchrun --nproc_per_node=8 train_diffusion.py --model uvit-2B/1 --image-size 512 --global-batch 4096 \\
             --grad-checkpoint --shard-optimizer --micro-batch 256 --data /data/imagenet/train \\
             --vae diffusers:mit-han-lab/dc-ae-f32c32-in-1.0-diffusers     # USiT-2B, 8 x 80 GB: bench.py --memory

Latents: z = posterior mean of the frozen VAE (EMA weights), normalised per channel, z_n = (z - mean) / std,
with the statistics stored in our VAE's checkpoint when they were taken on this data, size and held-out split,
else computed here over --stats-images training images (--latent-norm scalar: one scale for all channels,
z_n = (z - shift) * scale, as SD-VAE / DC-AE baselines). Then, per step:

  --denoise-level l    train on z^(l) = S_l(z_n) (Denoising-VAE Eq. 5, with the linear
                       interpolant x_t = (1 - t) z^(l) + t eps and velocity target eps - z^(l))
  --fda                Frequency-Domain Diffusion Alignment (Eq. 6-8). Our reading: the student
                       is the model being trained, on noisy z^(l_lo)_t with l_lo = --denoise-level;
                       the teacher is its EMA, fed the clean z^(l_hi) at t = 0 with l_hi drawn
                       uniformly from {l_lo + 1, ..., 3} each step. L_align is the squared error
                       between projector(student block-k hidden state) and the teacher's block-k
                       hidden state (Eq. 7), weighted by lambda(t) = w * t (larger at high noise,
                       t = 1 is pure noise) or w (constant); L = L_diff + lambda(t) L_align (Eq. 8).
  --freqwarm --r0 R    FreqWarm: for the first --warmup-steps (or --warmup-frac of --steps) the
                       latents are those of lowpass(x, R); afterwards of x. The switch step is
                       stored in the checkpoint, so a resumed run continues in the right phase.
  --freqwarm-schedule  step (the paper's hard switch, default) keeps R for the whole warm-up; linear /
                       cosine (ours, beyond the paper) widen the band from R toward the corner over
                       --freqwarm-stages equal stages of the warm-up (freqwarm_radius).
  --r0 auto            our rule, not the paper's (it chose 0.2 by a gFID ablation): R = the peak of the
                       autoencoder's own F3 curve (FreqWarm Finding 3: latent HF energy of
                       E(lowpass(x, r0)) over vae.R0_SWEEP, on --r0-auto-images seeded random training
                       images in 4 disjoint subsets); the curves and the choice are stored in the
                       checkpoint, and a resumed run keeps the stored choice. A curve without an interior
                       peak, or whose peak does not stand above its spread over the subsets, is refused.
  --cache-latents      encode the dataset once (both flips; also the low-passed copy with FreqWarm)
                       into OUT/latents-KEY/ (float16 shards, memory-mapped) instead of every step.
  --keep-every N       also keep the EMA weights at steps N, 2N, ... (OUT/keep/ema_STEP.pt) for
                       convergence curves (`evaluate.py curve`).
  --grad-checkpoint    memory, not method: each block recomputes its activations in backward; with
  --shard-optimizer    2+ ranks each keeps the AdamW state of its share of the parameters (ZeRO-1). Neither
                       changes a number, so both may change on resume (README, "Memory at the paper's scale").
"""
import argparse
import copy
import hashlib
import math
import os

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

import fft_ops
from common import (VAE_OUT, Run, UserError, adamw, add_common_args, autocast, check_finite, check_range, ema_update,
                    derive_seed, fixed_on_resume, log0, parse_training_args, run_main, save_grid, setup_distributed, to_device,
                    step_uniform, when)
from data import (StepSampler, build_dataset, cache_latents, check_readable, fingerprint, image_batches, make_loader,
                  random_subset, train_val_split)
from dit import (SAMPLERS, Projector, build_denoiser, guided_velocity, interpolate, sample_ode, sample_sde,
                 velocity_loss)
from vae import (DEFAULT_IMAGE_SIZE, F3_SUBSETS, R0_SWEEP, LatentSpace, absolute_spec, dataset_latent_stats, describe_f3,
                 f3_curve, f3_peak_test, load_autoencoder, resolve_image_size, scalar_stats)

STREAM_T, STREAM_EPS, STREAM_DROP, STREAM_TEACHER = 11, 12, 13, 14       # independent random draws of one step

PRESETS = {
    "smoke": dict(model="smoke/1", n_images=64, steps=6, global_batch=8, lr=1e-3, ema_decay=0.9, log_every=1,
                  ckpt_every=3, sample_every=6, sample_steps=4, fda_depth=1, val_images=8, val_every=3),
    "cpu-demo": dict(model="tiny/2", n_images=2000, steps=2000, global_batch=64, lr=5e-4, ema_decay=0.995,
                     log_every=50, ckpt_every=500, sample_every=1000, sample_steps=25, cfg_scale=2.0, fda_depth=2,
                     val_images=200, val_every=250,
                     cache_latents=True, out="runs/sit-demo", vae="runs/vae-demo/last.pt"),
    # Denoising-VAE Sec. 4: SiT-XL on f16 latents (16x16 at 256 px: patch 1 -> 256 tokens), batch 256, lr 1e-4
    # ... trained "without data augmentation": no flips
    "dvae-f16d32": dict(model="XL/1", steps=4_000_000, global_batch=256, lr=1e-4, denoise_level=2, fda=True, hflip=False,
                        cache_latents=True, workers=8, out="runs/sit-dvae-f16d32", vae="runs/vae-f16d32/last.pt"),
    # FreqWarm Sec. 4: r0 = 0.2, batch 4096, 512 px
    "freqwarm-512": dict(model="XL/2", image_size=512, steps=400_000, global_batch=4096, lr=1e-4, freqwarm=True,
                         r0=0.2, cache_latents=True, workers=8, out="runs/sit-freqwarm-512"),
}


FREQWARM_SCHEDULES = ("step", "linear", "cosine")


def r0_arg(text):
    """--r0: a radius in cycles/pixel, or 'auto'."""
    return "auto" if text == "auto" else float(text)


def parser():
    p = argparse.ArgumentParser(description="Stage 2: SiT with denoised latents, FDA and FreqWarm",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fixed = add_common_args(p)              # what is trained: a resumed run may not change these (common.Run)
    fixed.add_argument("--model", default="XL/2", help="SiT size/patch: smoke/1, tiny/1, S/2, B/2, L/2, XL/2, XL/1, "
                                                       "...; U-ViT: uvit-smoke/1, uvit-tiny/2, uvit-S/2, uvit-M/2, "
                                                       "uvit-L/2, uvit-H/2, uvit-2B/1 (USiT-2B)")
    fixed.add_argument("--image-size", type=int, default=None,
                       help=f"image side (default: the VAE's training size; {DEFAULT_IMAGE_SIZE} for pretrained "
                            f"autoencoders)")
    fixed.add_argument("--class-dropout", type=float, default=0.1, help="label dropout to the null class (CFG)")
    fixed.add_argument("--denoise-level", type=int, default=0, choices=range(4), help="train on S_l(z) (Eq. 5)")
    fixed.add_argument("--renorm-level", action="store_true",
                       help="divide S_l(z_n) by its per-channel std (S_l removes variance: std ~1.0/.94/.87/.78)")
    fixed.add_argument("--fda", action="store_true", help="Frequency-Domain Diffusion Alignment (Eq. 6-8)")
    fixed.add_argument("--fda-weight", type=float, default=0.5, help="w in lambda(t)")
    fixed.add_argument("--fda-depth", type=int, default=8, help="align the output of this block (1-based)")
    fixed.add_argument("--fda-schedule", default="linear", choices=("linear", "constant"),
                       help="lambda(t) = w * t (linear) or w (constant)")
    fixed.add_argument("--freqwarm", action="store_true", help="FreqWarm low-pass warm-up curriculum")
    fixed.add_argument("--r0", type=r0_arg, default=0.2,
                       help="FreqWarm RGB low-pass radius, cycles/pixel in (0, 0.71], or 'auto': the peak of the "
                            "autoencoder's own F3 curve (latent HF energy vs r0)")
    fixed.add_argument("--r0-auto-images", type=int, default=256,
                       help="with --r0 auto: seeded random training images the F3 curve is measured on, in "
                            "4 disjoint subsets: the peak must stand above the curve's spread over them")
    fixed.add_argument("--freqwarm-schedule", default="step", choices=FREQWARM_SCHEDULES,
                       help="FreqWarm's radius over the warm-up: step = r0 throughout, then full frequency (the "
                            "paper); linear / cosine = from r0 widening toward the corner 0.7071 in --freqwarm-stages "
                            "equal stages (ours: the paper did not try scheduled thresholds)")
    fixed.add_argument("--freqwarm-stages", type=int, default=4,
                       help="with --freqwarm-schedule linear / cosine: stages of the warm-up, each at one radius "
                            "(the latent cache holds one low-passed copy per stage)")
    fixed.add_argument("--lowpass-kind", default="ideal", choices=fft_ops.MASK_KINDS,
                       help="FreqWarm filter shape; every kind has gain 1/2 at r0 (ideal: the step's middle), so "
                            "one r0 cuts the band at the same radius and the kinds differ only in sharpness")
    fixed.add_argument("--lowpass-clamp", action="store_true",
                       help="clamp low-passed images to [-1, 1] (the ideal filter rings past it: Gibbs)")
    fixed.add_argument("--latent-norm", default="channel", choices=("channel", "scalar"),
                       help="channel: (z - mean) / std per channel, measured on the data; scalar: (z - shift) * "
                            "scale with the autoencoder's own scaling_factor (diffusers config) or --latent-scale")
    fixed.add_argument("--latent-scale", type=float, default=None,
                       help="with --latent-norm scalar: this scale (e.g. SD-VAE's 0.18215) instead of the "
                            "autoencoder's own")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="FreqWarm warm-up length in steps (stored in the checkpoint: it may not change on resume)")
    p.add_argument("--warmup-frac", type=float, default=0.5, help="warm-up as a fraction of --steps (if no --warmup-steps)")
    p.add_argument("--out", default="runs/sit", help="output folder: checkpoints, logs, grids, latent cache")
    p.add_argument("--vae", default=os.path.join(VAE_OUT, "last.pt"),
                   help="frozen autoencoder: a Stage-1 checkpoint (train_vae.py writes runs/vae/last.pt), or "
                        "diffusers:HUB_ID_OR_FOLDER[#SUBFOLDER] (AutoencoderKL, AutoencoderDC, AutoencoderKLWan, "
                        "AutoencoderKLLTXVideo); its content may not change on resume")
    p.add_argument("--stats-images", type=int, default=10000,
                   help="random training images for the latent statistics when the VAE's own do not fit the data")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--shard-optimizer", action="store_true",
                   help="under torchrun: each rank keeps the AdamW state of its share of the parameters only "
                        "(ZeroRedundancyOptimizer); the same updates, checkpoints as without")
    p.add_argument("--cache-latents", action="store_true", help="encode the dataset once into a latent cache")
    p.add_argument("--keep-every", type=int, default=0,
                   help="also keep the EMA weights at every multiple of this step in OUT/keep/ema_STEP.pt, for "
                        "`evaluate.py curve` (0: none)")
    p.add_argument("--sample-steps", type=int, default=50, help="sampler steps of the periodic sample grids")
    p.add_argument("--sampler", default="heun", choices=SAMPLERS,
                   help="euler / heun: the ODE; sde: SiT's Euler-Maruyama sampler (dit.sample_sde)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale of the periodic sample grids")
    return p


FIXED_ON_RESUME = fixed_on_resume(parser())

# Settings that act only with others: given without them they are refused in one line (common.check_needs), and
# runs record them as inert, so `evaluate.py compare` / `curve` do not group runs by them. A new one is one line.
NEEDS = {
    "r0": (when("freqwarm", True),),
    "r0_auto_images": (when("freqwarm", True), when("r0", "auto")),
    "warmup_steps": (when("freqwarm", True),),
    "warmup_frac": (when("freqwarm", True), when("warmup_steps", None)),
    "lowpass_kind": (when("freqwarm", True),),
    "lowpass_clamp": (when("freqwarm", True),),
    "freqwarm_schedule": (when("freqwarm", True),),
    "freqwarm_stages": (when("freqwarm", True), when("freqwarm_schedule", "linear", "cosine")),
    "fda_weight": (when("fda", True),),
    "fda_depth": (when("fda", True),),
    "fda_schedule": (when("fda", True),),
    "latent_scale": (when("latent_norm", "scalar"),),
    "stats_images": (when("latent_norm", "channel"),),
    "renorm_level": (when("latent_norm", "channel"), when("denoise_level", 1, 2, 3)),
}


def get_args(argv=None):
    args = parse_training_args(parser(), PRESETS, argv, NEEDS)
    if args.r0 != "auto":
        fft_ops.check_r0(args.r0)
    check_range(args, "r0_auto_images", F3_SUBSETS)
    check_range(args, "freqwarm_stages", 1)
    if args.freqwarm_schedule != "step" and args.r0 != "auto" and args.r0 >= fft_ops.MAX_RADIUS:
        raise UserError(f"--freqwarm-schedule {args.freqwarm_schedule} widens the band from --r0 toward the corner "
                        f"{fft_ops.MAX_RADIUS:.4f}; --r0 {args.r0} is already there")
    check_range(args, "warmup_steps", 0, optional=True)
    check_range(args, "warmup_frac", 0.0, 1.0)
    check_range(args, "class_dropout", 0.0, 1.0)
    check_range(args, "sample_steps", 1)
    if args.sampler == "sde" and args.sample_steps < 2:
        raise UserError("--sampler sde needs --sample-steps >= 2 (Euler-Maruyama steps, then SiT's last step)")
    check_range(args, "fda_depth", 1)
    check_range(args, "image_size", 1, optional=True)
    check_range(args, "grad_clip", 0.0, float("inf"))
    check_range(args, "keep_every", 0)
    if args.latent_scale is not None and not (0 < args.latent_scale < float("inf")):
        raise UserError(f"--latent-scale must be a finite number > 0; got {args.latent_scale}")
    check_range(args, "fda_weight", 0.0, float("inf"))
    check_finite(args, "cfg_scale")                       # the grids are checked too (common.save_grid)
    return args


# ----------------------------------------------------------------------------- the method

def stage_radii(args):
    """The low-pass radius of each warm-up stage: [r0] for the paper's step schedule; with linear / cosine, stage
    k of K at r_k = r0 + (r_max - r0) s(k / K), s(u) = u or (1 - cos(pi u)) / 2, r_max = 0.7071 (the corner:
    the whole band), so stage 0 is at r0 and the band widens toward full frequency."""
    if args.freqwarm_schedule == "step":
        return [args.r0]
    K, r_max = args.freqwarm_stages, fft_ops.MAX_RADIUS
    s = (lambda u: u) if args.freqwarm_schedule == "linear" else (lambda u: (1 - math.cos(math.pi * u)) / 2)
    return [args.r0 + (r_max - args.r0) * s(k / K) for k in range(K)]


def freqwarm_radius(step, freqwarm_end, args):
    """FreqWarm's RGB low-pass radius at `step` (cycles/pixel), or None from freqwarm_end on: full-frequency
    latents. Steps [0, freqwarm_end) fall into len(stage_radii) equal stages (one, at r0, for the paper's switch)."""
    if step >= freqwarm_end:
        return None
    radii = stage_radii(args)
    return radii[step * len(radii) // freqwarm_end]


@torch.no_grad()
def encode_images(ae, x, radius, args):
    """The frozen encoder's latent (B, C, h, w) of images x (B, 3, H, W) in [-1, 1]; during FreqWarm's warm-up
    (radius: freqwarm_radius) of lowpass(x, radius): the RGB spectrum cut at that radius in cycles/pixel (FreqWarm
    Sec. 4; the ideal filter rings past [-1, 1], --lowpass-clamp clips it)."""
    if radius is not None:
        x = fft_ops.lowpass(x, radius, args.lowpass_kind)
        x = x.clamp(-1, 1) if args.lowpass_clamp else x
    return ae.encode(x)


class Student(torch.nn.Module):
    """The trained module: SiT plus, with FDA, the projector of its block-k hidden state (one DDP unit)."""

    def __init__(self, sit, fda_depth=None):
        super().__init__()
        self.sit, self.fda_depth = sit, fda_depth
        self.projector = Projector(sit.config["width"]) if fda_depth else None

    def forward(self, x, t, y):
        if self.projector is None:
            return self.sit(x, t, y), None
        v, h = self.sit(x, t, y, return_hidden=self.fda_depth)           # (B, C, h, w), (B, N, D)
        return v, self.projector(h)


def teacher_level(args, step):
    """FDA's teacher level l_hi ~ Unif{l_lo + 1, ..., 3}, one per step, the same on every rank."""
    lo = args.denoise_level
    u = step_uniform(args.seed, step, STREAM_TEACHER)
    return lo + 1 + min(int(u * (3 - lo)), 2 - lo)


def fda_lambda(t, args):
    """lambda_align(t) (Eq. 8): w * t with --fda-schedule linear (larger at high noise, t -> 1: coarse to fine),
    or the constant w."""
    return args.fda_weight * (t if args.fda_schedule == "linear" else torch.ones_like(t))


def diffusion_loss(student, ema, z, y, t, eps, args, step, to_level=fft_ops.attenuate):
    """Velocity loss on z^(l_lo) (Eq. 5) plus, with FDA, lambda(t) L_align (Eq. 6-8). Returns (loss, parts).

    z: normalised latents z_n (B, C, h, w); to_level(z, l) gives z^(l) = S_l(z) (LatentSpace.at_level: the
    autoencoder's own p_l, divided by the level's std with --renorm-level).
    """
    z_lo = to_level(z, args.denoise_level)                                     # (B, C, h, w)
    v, h_student = student(interpolate(z_lo, eps, t), t, y)                    # x_t = (1 - t) z + t eps
    parts = {"diff": velocity_loss(v, z_lo, eps).mean()}                       # |v - (eps - z)|^2
    loss = parts["diff"]
    if args.fda:
        z_hi = to_level(z, teacher_level(args, step))
        with torch.no_grad():                                                  # stop-gradient teacher, at t = 0
            h_teacher = ema(z_hi, torch.zeros_like(t), y, return_hidden=args.fda_depth, hidden_only=True)
        align = (h_student.float() - h_teacher.float()).pow(2).mean(dim=(1, 2))   # (B,) Eq. 7
        parts["align"] = align.mean()
        loss = loss + (fda_lambda(t, args) * align).mean()                     # Eq. 8
    return loss, parts


# ----------------------------------------------------------------------------- training

def main(argv=None):
    args = get_args(argv)
    d = setup_distributed(args.device, args.dist_timeout)
    with Run(args, d, "sit", FIXED_ON_RESUME) as run:             # OUT/.lock: one run per folder
        train(args, run)


def train(args, run):
    d = run.d
    torch.manual_seed(args.seed)
    ae, dataset, student, ema, opt = build(args, d)
    ck = run.resume(fingerprint(dataset), student.sit.config,
                    check=lambda ck, path: check_resume(ck, path, args, ae, d),
                    check_after=lambda ck, path: check_warmup(ck, path, args))
    step = run.restore(ck, {"model": student, "ema": ema, "opt": opt}, lr={"opt": args.lr}) if ck else 0
    if not ck:
        check_readable(dataset, d, args.workers)     # an unreadable image stops the run now, not at its step
    if ck:
        log0(f"resumed from {ck['path']} at step {step}"
             + (f" (FreqWarm switch at step {ck['freqwarm']['warmup_steps']})" if args.freqwarm else ""), d)
    if d.main:
        prune_kept(args.out, step, d)
    stats = ck["latent_stats"] if ck else training_stats(ae, dataset, args, d)
    space = LatentSpace(stats, ae.mlsr_fractions, args.denoise_level, args.renorm_level, d.device)
    r0_auto = auto_r0(ae, dataset, stats, args, d) if args.r0 == "auto" else (ck or {}).get("freqwarm", {}).get("auto")
    warmup_steps = ck["freqwarm"]["warmup_steps"] if ck else (     # the stored switch wins on resume
        args.warmup_steps if args.warmup_steps is not None else round(args.warmup_frac * args.steps))
    freqwarm_end = warmup_steps if args.freqwarm else 0     # FreqWarm: steps [0, freqwarm_end) see lowpass(x, r0)
    if 0 < freqwarm_end < len(stage_radii(args)):
        raise UserError(f"a warm-up of {freqwarm_end} steps cannot hold --freqwarm-stages {args.freqwarm_stages} "
                        f"stages: use fewer stages or a longer --warmup-steps / --warmup-frac")
    record = dict(ae=ae, stats=stats, warmup_steps=warmup_steps, r0_auto=r0_auto)   # checkpoints store these
    log0(f"latent statistics: {stats['source']}", d)
    describe(args, ae, student, freqwarm_end, r0_auto, run, isinstance(opt, ZeroRedundancyOptimizer))
    train_idx, val_idx = train_val_split(len(dataset), args.val_images, args.seed)
    sampler = StepSampler(len(dataset), args.global_batch, d.rank, d.world_size, run.accum, args.seed, step,
                          flip=args.hflip, indices=train_idx)
    if args.cache_latents:                                  # {radius: rows}: every key encoded once per stage
        cache, batches = build_cache(ae, dataset, args, d), iter(sampler)       # batches of sample keys
    else:
        cache, batches = None, iter(make_loader(dataset, sampler, args.workers))
    validation = Validation(ae, space, dataset, val_idx, args, d.device) if val_idx and args.val_every and d.main \
        else None
    train_model = torch.compile(student) if args.compile else student
    teacher = torch.compile(ema) if args.compile and args.fda else ema        # the FDA teacher (shares ema's weights)
    if d.world_size > 1:
        train_model = DDP(train_model)
    run.start(step)
    if validation is not None and step == 0:
        run.record(0, lambda: validation(ema))              # the EMA's held-out loss before training
    while step < args.steps:
        student.train()
        radius = freqwarm_radius(step, freqwarm_end, args)  # FreqWarm: low-passed latents until the switch
        before = freqwarm_radius(step - 1, freqwarm_end, args) if args.freqwarm and step > 0 else radius
        if radius != before:                                # the switch (and, scheduled, each wider stage)
            log0(f"FreqWarm: step {step}: " + (f"switching from low-passed (r={before:.4g}) to full-frequency latents"
                                               if radius is None else f"widening the low-pass to r={radius:.4g}"), d)
        totals = {}
        for j in range(run.accum):                          # micro-batches of this rank's share of the batch
            if cache is None:
                x, y = next(batches)                        # images (b, 3, H, W) in [-1, 1], labels (b,)
                x, y = to_device(x, d.device), to_device(y, d.device)             # no wait for the device
                z = encode_images(ae, x, radius, args)                              # E(x) or E(lowpass(x, r0))
            else:                                                                   # the same, encoded once
                z, y = cache[radius].batch(next(batches), d.device)
            z = space.normalize(z)                                                  # z_n = (z - mean) / std
            t = run.rand(step, STREAM_T, j)                                         # (b,) t = 1 is pure noise
            eps = run.randn(z.shape[1:], step, STREAM_EPS, j)                       # (b, C, h, w)
            drop = run.rand(step, STREAM_DROP, j) < args.class_dropout              # CFG: some labels -> null
            y = torch.where(drop, torch.full_like(y, dataset.num_classes), y)
            with run.no_sync(train_model, j):                                       # DDP syncs the last one
                with run.autocast():
                    loss, parts = diffusion_loss(train_model, teacher, z, y, t, eps, args, step, space.at_level)
                (loss / run.accum).backward()
            run.accumulate(totals, {"loss": loss, **parts})
        totals = run.clip(totals, student.parameters(), step)                       # --grad-clip, NaN guard
        opt.step(), opt.zero_grad(set_to_none=True)
        ema_update(ema, student.sit, args.ema_decay)                                 # the EMA is also the teacher
        step += 1
        lowpass_r = {"lowpass_r": radius} if args.freqwarm_schedule != "step" and radius is not None else {}
        run.end_step(step, dict(phase="warmup" if radius is not None else "full", **lowpass_r, lr=opt.param_groups[0]["lr"],
                                **totals))

        if run.due(step, args.val_every):                   # once in a while: the EMA's held-out loss per t
            run.record(step, (lambda: validation(ema)) if validation else None)
        if args.keep_every and step % args.keep_every == 0:                         # for `evaluate.py curve`
            run.save(lambda: checkpoint_state(run, step, student, ema, opt, record, ema_only=True),
                     kept_path(args.out, step))
        if run.due(step, args.sample_every) and d.main:
            grid = os.path.join(args.out, f"samples_{step:07d}.png")
            sample_grid(ema, ae, space, dataset.num_classes, args, d.device, grid)
            run.grid(grid, step)
        if run.due(step, args.ckpt_every) or run.stopping:
            run.save(lambda: checkpoint_state(run, step, student, ema, opt, record), gather=[opt])
        if run.stopping:
            break
    run.finish(step, f"done: {run.ckpt_path} (kind 'sit'); samples {args.out}/samples_{step:07d}.png")


# ----------------------------------------------------------------------------- building, resuming, checkpoints

def build(args, d):
    """Frozen autoencoder, dataset, SiT student / EMA teacher, optimizer."""
    ae = load_autoencoder(args.vae, d.device)
    if not (args.image_size or ae.image_size):
        log0(f"image size: {DEFAULT_IMAGE_SIZE} px ({ae.name} has no native size; --image-size to change)", d)
    args.image_size = resolve_image_size(ae, args.image_size)
    dataset = build_dataset(args.data, args.image_size, n=args.n_images, seed=args.seed)
    C, h = ae.latent_dim, args.image_size // ae.downsample
    sit = build_denoiser(args.model, h, C, dataset.num_classes).to(d.device)
    sit.grad_checkpoint = args.grad_checkpoint          # recompute each block's activations in backward
    if args.fda and not 1 <= args.fda_depth <= len(sit.blocks):
        raise UserError(f"--fda-depth {args.fda_depth} is outside 1..{len(sit.blocks)} for SiT {args.model}")
    if args.fda and args.denoise_level == 3:
        raise UserError("--fda needs a more attenuated teacher level than --denoise-level; use a level below 3")
    student = Student(sit, args.fda_depth if args.fda else None).to(d.device)
    ema = copy.deepcopy(sit).requires_grad_(False).eval()
    opt = adamw(student.parameters(), d.device, args.shard_optimizer, lr=args.lr, weight_decay=args.weight_decay)
    return ae, dataset, student, ema, opt


def check_resume(ck, path, args, ae, d):
    """Stage 2's own resume checks (before common.Run's: settings, data, step, model): the same latents (the
    autoencoder's content, its channels, the normalisation); with --r0 auto the stored choice wins, so a resumed
    run never re-measures it."""
    if not ck.get("latent_stats"):
        raise UserError(f"{path} holds no latent statistics (latent_stats): it cannot be resumed; "
                        f"start a fresh run with another --out")
    norm = ck["latent_stats"].get("norm", "channel")
    if norm != args.latent_norm:
        raise UserError(f"{path} was trained with --latent-norm {norm}, not {args.latent_norm}: it may not change "
                        f"on resume")
    channels = ae.latent_dim
    if ck["model_config"]["in_channels"] != channels:
        raise UserError(f"{path} was trained on {ck['model_config']['in_channels']}-channel latents, "
                        f"but {args.vae} gives {channels} channels")
    stored_p = ck.get("autoencoder", {}).get("mlsr_fractions")
    if stored_p is not None and tuple(stored_p) != tuple(ae.mlsr_fractions):
        raise UserError(f"{path} was trained with the MLSR fractions {list(stored_p)} of its autoencoder, but "
                        f"{args.vae} now gives {list(ae.mlsr_fractions)} (S_l of --denoise-level and FDA would "
                        f"change): they may not change on resume")
    stored_ae = ck.get("autoencoder", {}).get("content_hash")
    if stored_ae and stored_ae != ae.content_hash:
        raise UserError(f"{path} was trained on the latents of another autoencoder (content {stored_ae}), "
                        f"not {args.vae} ({ae.content_hash}): it may not change on resume")
    fw = ck["freqwarm"]
    if args.freqwarm and "schedule" not in fw and (args.freqwarm_schedule != "step" or fw.get("kind") == "gaussian"):
        raise UserError(f"{path} predates --freqwarm-schedule and the Gaussian cut's gain of 1/2 at r0: it trained "
                        f"with the step schedule" + (" and the Gaussian of standard deviation r0" if fw.get("kind") ==
                                                     "gaussian" else "") + ", which may not change on resume")
    if args.r0 == "auto":
        if ck["freqwarm"].get("auto") is None:
            raise UserError(f"{path} was trained with --r0 {ck['config']['r0']}, not chosen by --r0 auto: "
                            f"resume it with --r0 {ck['config']['r0']}")
        args.r0 = ck["config"]["r0"]
        log0(f"--r0 auto: r0 = {args.r0:g}, the choice stored in {path}", d)


def check_warmup(ck, path, args):
    """The stored FreqWarm switch wins over --steps / --warmup-frac; a different --warmup-steps is refused."""
    warmup = ck["freqwarm"]["warmup_steps"]
    if args.freqwarm and args.warmup_steps is not None and args.warmup_steps != warmup:
        raise UserError(f"{path} switches FreqWarm off at step {warmup}, not --warmup-steps {args.warmup_steps}: "
                        f"it may not change on resume")


def describe(args, ae, student, freqwarm_end, r0_auto, run, sharded=False):
    """The run's first line: model, latents, method settings, batch split, device, memory switches."""
    sched = "" if args.freqwarm_schedule == "step" else \
        f", {args.freqwarm_schedule} schedule r = {' / '.join(f'{r:.3g}' for r in stage_radii(args))}"
    warm = (f"r0={args.r0:g}{' (auto)' if r0_auto else ''}{sched} for {freqwarm_end} steps" if args.freqwarm else "off")
    log0(f"{args.model}: {sum(p.numel() for p in student.sit.parameters()) / 1e6:.2f}M params on latents "
         f"{tuple(ae.latent_shape(args.image_size))} of {ae.name}; denoise level {args.denoise_level}, FDA {args.fda}, "
         f"FreqWarm {warm}; {run.d.world_size} rank(s) x {run.per_rank} ({run.accum} x {run.micro}); "
         f"device {run.d.device}" + (f"; optimizer state sharded over {run.d.world_size} ranks" if sharded else "")
         + ("; activation checkpointing per block" if args.grad_checkpoint else ""), run.d)
    if args.shard_optimizer and not sharded:
        log0("--shard-optimizer: one rank, so nothing to shard: plain AdamW", run.d)


def checkpoint_state(run, step, student, ema, opt, record, ema_only=False):
    """OUT/last.pt: weights, optimizer, RNG, settings, and the latents it was trained on (statistics,
    autoencoder, FreqWarm's switch and --r0 auto's curve). ema_only (--keep-every): a checkpoint for sampling
    only, with the EMA weights and everything `evaluate.py sample` reads, without the trained weights,
    optimizer and RNG state."""
    args, ae = run.args, record["ae"]
    state = run.checkpoint(
        step, model_config=student.sit.config, ema=ema.state_dict(), latent_stats=record["stats"],
        autoencoder={"spec": args.vae, "abs_spec": absolute_spec(args.vae), "name": ae.name,
                     "content_hash": ae.content_hash, "mlsr_fractions": list(ae.mlsr_fractions)},
        freqwarm={"enabled": args.freqwarm, "r0": args.r0, "kind": args.lowpass_kind,
                  "schedule": args.freqwarm_schedule, "stage_radii": stage_radii(args) if args.freqwarm else [],
                  "warmup_steps": record["warmup_steps"],
                  "phase": "warmup" if args.freqwarm and step < record["warmup_steps"] else "full",
                  **({"auto": record["r0_auto"]} if record["r0_auto"] else {})})
    if ema_only:
        del state["rng"]
        return {**state, "ema_only": True}
    return {**state, "model": student.state_dict(), "opt": opt.state_dict()}


KEEP_DIR = "keep"


def kept_path(out, step):
    """OUT/keep/ema_STEP.pt: the EMA weights kept at `step` by --keep-every."""
    return os.path.join(out, KEEP_DIR, f"ema_{step:07d}.pt")


def prune_kept(out, step, d):
    """Kept checkpoints past `step` (the step this run starts from) belong to a run that is not continued
    (a fresh start, or a stopped run resumed from an earlier checkpoint): removed, so OUT/keep/ holds only
    this run's trajectory; the resumed run writes its own again as it passes those steps."""
    folder = os.path.join(out, KEEP_DIR)
    if not os.path.isdir(folder):
        return
    stale = sorted(f for f in os.listdir(folder)
                   if f.startswith("ema_") and f.endswith(".pt") and f[4:-3].isdigit() and int(f[4:-3]) > step)
    for f in stale:
        os.remove(os.path.join(folder, f))
    if stale:
        log0(f"removed {len(stale)} kept checkpoint(s) past step {step} from {folder} ({stale[0]} ... {stale[-1]}): "
             f"they belong to a run that is not continued", d)


# ----------------------------------------------------------------------------- latents: statistics, r0 auto, cache

def training_stats(ae, dataset, args, d):
    """Latent statistics for this run: the autoencoder's own when they were taken on this very data at this
    resolution with the same images held out, else computed here over a seeded random subset of --stats-images
    training images (never the held-out validation images)."""
    if args.latent_norm == "scalar":
        return scalar_stats(ae, args.latent_scale)
    s = ae.stats
    if s is not None and "level_std" in s and s.get("image_size") == args.image_size \
            and s.get("data") == fingerprint(dataset) \
            and (args.val_images == 0 or (s.get("val_images"), s.get("seed")) == (args.val_images, args.seed)):
        return {**s, "source": f"{ae.name} ({s.get('source', 'its checkpoint')})"}
    why = ("it has none" if s is None else "they were taken on other data, at another size, with other images "
           "held out, or without per-level std")
    log0(f"latent statistics: not using those of {ae.name} ({why}); computing them over "
         f"{min(args.stats_images, len(dataset) - args.val_images)} random training images", d)
    return dataset_latent_stats(ae, dataset, args.stats_images, args.seed, d, workers=args.workers,
                                val_images=args.val_images)


def auto_r0(ae, dataset, stats, args, d, batch=64):
    """--r0 auto: r0 at the interior peak of the autoencoder's own F3 curve, when that peak stands above the
    curve's spread over image subsets (vae.f3_peak_test: our rule; the paper chose r0 = 0.2 by a gFID ablation);
    sets args.r0 and returns the record stored in checkpoints (the curves, the choice, what they were measured on).

    F3(r0) = mean latent HF energy of z_n = (E(lowpass(x, r0)) - mean) / std (vae.f3_scores; this run's latent
    statistics) for r0 in vae.R0_SWEEP, on --r0-auto-images seeded random training images (never validation ones)
    split into vae.F3_SUBSETS disjoint subsets. A curve without an interior maximum, or whose maximum does not stand
    above its spread, is refused in one line that gives the curve and its spread.
    """
    train_idx, _ = train_val_split(len(dataset), args.val_images, args.seed)
    idx = [train_idx[i] for i in random_subset(len(train_idx), args.r0_auto_images, args.seed)]
    normalize = LatentSpace(stats, ae.mlsr_fractions, device=d.device).normalize
    subsets = [idx[k::F3_SUBSETS] for k in range(F3_SUBSETS)]                       # disjoint, interleaved
    curves = [f3_curve(ae, image_batches(dataset, sub[d.rank::d.world_size], batch, args.workers), normalize, d.device)
              for sub in subsets]                                                   # (K, len(R0_SWEEP))
    test = f3_peak_test(R0_SWEEP, curves)
    energy = test["mean"]                                                           # over the subsets
    what = (f"F3 curve of {ae.name} (latent HF energy at radius > 0.25 vs r0, {len(idx)} random training images): "
            f"{describe_f3(R0_SWEEP, test)}")
    if test["peak"] is None:
        end = "rises to the largest" if energy[-1] >= max(energy) else "falls from the smallest"
        raise UserError(f"--r0 auto: the {what}: it {end} r0; pass --r0 R")
    if not test["stands"]:
        raise UserError(f"--r0 auto: the {what}: the peak does not stand above its spread over the image subsets "
                        f"(height <= its std), so the autoencoder has no measurable F3 peak here; pass --r0 R")
    log0(f"--r0 auto: r0 = {test['peak']:g}, the peak of the {what}", d)
    args.r0 = test["peak"]
    return {"r0_sweep": list(R0_SWEEP), "latent_hf_energy": energy, "chosen": test["peak"], "n_images": len(idx),
            "seed": args.seed, "hf_radius": 0.25, "subset_curves": curves, "peak_height": test["height"],
            "peak_height_std": test["height_std"]}


def build_cache(ae, dataset, args, d):
    """--cache-latents: {radius: data.CachedRows}, the latents of every sample key (both flips with --hflip)
    encoded once, full-frequency (radius None) and, with FreqWarm, low-passed at each stage's radius (one for
    the paper's step schedule); in OUT/latents-KEY/ (KEY: cache_key)."""
    labels = torch.tensor([dataset.label(i) for i in range(len(dataset))])          # (N,), shared by all
    return {r: cache_latents(dataset, args.out, cache_key(ae, dataset, args, r), args.hflip,
                             ae.latent_shape(args.image_size), lambda x, r=r: encode_images(ae, x, r, args), d,
                             args.workers, {"autoencoder": ae.name, "low_passed": r is not None, "r0": r}, labels)
            for r in [None] + (stage_radii(args) if args.freqwarm else [])}


def cache_key(ae, dataset, args, radius):
    """Content key of one latent cache: autoencoder bytes, data files, size, flips, and the low-pass the images
    went through (kind, the radius applied, clamp; radius None: full frequency). The radius is what a FreqWarm
    schedule changes, so a stage of a schedule and a step run at that radius share their content."""
    parts = [ae.content_hash, fingerprint(dataset), args.image_size, args.hflip]
    if radius is not None:                          # the Gaussian as defined now: gain 1/2 at the radius
        parts += [args.lowpass_kind + ("@half-gain" if args.lowpass_kind == "gaussian" else ""), radius,
                  args.lowpass_clamp]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- validation and sample grids

VAL_TS = tuple((i + 0.5) / 8 for i in range(8))          # fixed t grid: 0.0625 ... 0.9375 (t = 1 is noise)


class Validation:
    """The EMA model's flow-matching loss on fixed held-out latents, per t on a fixed grid, with fixed noise.

    Latents are full-frequency (never low-passed) at the run's denoise level, z^(l) = S_l(z_n), of images
    held out of training; noise for grid point i comes from its own named stream (seed, "val", i). So at a
    given step the number depends only on the EMA weights: runs that differ only in FreqWarm or FDA are
    comparable.
    """

    def __init__(self, ae, space, dataset, indices, args, device, batch=64):
        zs, ys = [], []
        for i in range(0, len(indices), batch):
            idx = indices[i:i + batch]
            x = torch.stack([dataset[j][0] for j in idx]).to(device)
            zs.append(space.at_level(space.normalize(encode_images(ae, x, None, args)), args.denoise_level))
            ys.append(torch.tensor([dataset.label(j) for j in idx], device=device))
        self.z, self.y, self.seed, self.batch = torch.cat(zs), torch.cat(ys), args.seed, batch    # (V, C, h, w)

    @torch.no_grad()
    def __call__(self, ema):
        ema.eval()
        out = {}
        for i, t in enumerate(VAL_TS):
            g = torch.Generator().manual_seed(derive_seed(self.seed, "val", i))
            eps = torch.randn(self.z.shape, generator=g).to(self.z.device)
            per = []
            for s in range(0, len(self.z), self.batch):
                z, e, y = self.z[s:s + self.batch], eps[s:s + self.batch], self.y[s:s + self.batch]
                tt = torch.full((len(z),), t, device=z.device)
                per.append(velocity_loss(ema(interpolate(z, e, tt), tt, y), z, e))
            out[f"val_loss_t{t:.4f}"] = torch.cat(per).mean().item()
        out["val_loss"] = sum(out.values()) / len(VAL_TS)
        return out


@torch.no_grad()
def sample_grid(ema, ae, space, num_classes, args, device, path, per_class=4):
    """Decode EMA samples (float32 decode): one column per class (up to 10 classes), `per_class` rows."""
    ema.eval()
    classes = torch.linspace(0, num_classes - 1, min(num_classes, 10)).round().long()
    y = classes.repeat(per_class).to(device)
    C, h = ema.in_channels, ema.config["input_size"]
    g = torch.Generator(device=device).manual_seed(args.seed)
    noise = torch.randn(len(y), C, h, h, generator=g, device=device)
    velocity = guided_velocity(ema, y, args.cfg_scale)
    with autocast(device, not args.no_bf16):
        if args.sampler == "sde":                                  # its Brownian increments continue g's stream
            z = sample_sde(velocity, noise, args.sample_steps, generator=g)
        else:
            z = sample_ode(velocity, noise, args.sample_steps, args.sampler)
    save_grid(ae.decode(space.to_autoencoder(z)), path, nrow=len(classes))


if __name__ == "__main__":
    run_main(main)
