"""Stage 1: train the ViT VAE with Multi-Level Spectral Regularization (Denoising-VAE Sec. 3.1), or a DC-AE.

    python train_vae.py --preset smoke                                   # CPU, seconds
    python train_vae.py --preset cpu-demo                                # CPU, a few minutes, 32x32 dead leaves
    python train_vae.py --preset f16d32 --data /data/imagenet/train      # one GPU
    torchrun --nproc_per_node=8 train_vae.py --preset f16d32 --data /data/imagenet/train
    torchrun --nproc_per_node=8 train_vae.py --preset f16d32 --image-size 512 --grad-checkpoint \\
             --data /data/imagenet/train                                 # less activation memory
    torchrun --nnodes=4 --node_rank=$NODE_RANK --master_addr=$MASTER --master_port=29500 \\
             --nproc_per_node=8 train_vae.py --preset f16d32 --data /data/imagenet/train
    python train_vae.py --stats-only --resume runs/vae/last.pt           # latent statistics again (no GPU needed)
    python train_vae.py --preset dcae-cpu                                # a DC-AE-style conv autoencoder, CPU
    torchrun --nproc_per_node=8 train_vae.py --preset dcae-f32c32 --data /data/imagenet/train

--arch dcae trains a diffusers AutoencoderDC (a named layout of vae.DCAE_CONFIGS, --dcae-config) with the
same losses, MLSR included; its latent is deterministic, so there is no KL term. Beside every checkpoint it
writes OUT/diffusers/ (the EMA weights, save_pretrained): Stages 2-3 use it as --vae diffusers:OUT/diffusers.

Each step samples one level l ~ Unif{0,1,2,3} (Eq. 1) for the whole global batch and trains

    L = d(D(S_l(z)), G_l(x)),   z ~ q(z | x)                                         (Eq. 2)
    S_l: drop the fraction p_l = (0, .25, .5, .75) of latent bins of largest radius   (Eq. 3)
    G_l: Gaussian blur with sigma_l = (0, .05, .25, .5) px, reflect padding           (Eq. 4)
    d  = w_pix MSE + w_perc VGG16 distance + w_gan hinge-GAN + w_kl KL

The GAN term is part of d, so it too is measured against G_l(x): the discriminator's real images
are G_l(x) at the step's level (--gan-real target; --gan-real image: the sharp x at every level).

The GAN weight is fixed (no VQGAN adaptive weight: it needs the decoder's last-layer
gradient, which DDP and torch.compile make awkward) and starts at --gan-start.
The final checkpoint (OUT/last.pt, kind "vae") carries per-channel mean / std of the
posterior means over a seeded random subset of --stats-images training images (every class
of a class-sorted folder is represented): Stage 2 normalises with them (a DC-AE is read by Stage 2 from
OUT/diffusers, with its --mlsr-fractions in OUT/diffusers/freqldm.json and, from the last step on, the measured
scaling_factor 1 / std in its config.json; Stage 2 measures its per-channel statistics).
"""
import argparse
import copy
import json
import os
import shutil

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fft_ops
from common import (VAE_OUT, Run, UserError, adamw, add_common_args, barrier, check_range, ema_update,
                    fixed_on_resume, load_checkpoint, log0, parse_training_args, resume_path, run_main,
                    save_checkpoint, save_grid, setup_distributed, step_uniform, unwrap, when, write_json)
from data import StepSampler, build_dataset, check_readable, fingerprint, make_loader, train_val_split
from vae import (DCAE, DCAE_CONFIGS, DCAE_FOLDER, MLSR_FILE, SIZES, PatchDiscriminator, VGGPerceptual,
                 ViTVAEAutoencoder, build_vae, dataset_latent_stats, hinge_d_loss, hinge_g_loss, level_scores)

STREAM_LEVEL, STREAM_Z = 1, 2          # independent random streams of one step

PRESETS = {
    "smoke": dict(size="smoke", image_size=16, n_images=64, steps=6, global_batch=8, lr=1e-3, ema_decay=0.9,
                  perceptual_weight=0.0, gan_weight=0.1, gan_start=3, disc_channels=16, disc_layers=2,
                  log_every=1, ckpt_every=3, sample_every=6, stats_images=32, val_images=8, val_every=3),
    "cpu-demo": dict(size="tiny", image_size=32, n_images=2000, steps=1200, global_batch=32, lr=1e-3,
                     ema_decay=0.995, perceptual_weight=0.0, gan_weight=0.0, log_every=50, ckpt_every=400,
                     sample_every=400, stats_images=2000, val_images=128, val_every=200, out="runs/vae-demo"),
    **{f"f16d{d}": dict(size=f"f16d{d}", image_size=256, steps=500000, global_batch=512, lr=1e-4,
                        perceptual_weight=1.0, gan_weight=0.1, gan_start=200000, ema_decay=0.9999,
                        out=f"runs/vae-f16d{d}", workers=8) for d in (16, 32, 64)},
    # DC-AE-style conv autoencoders (--arch dcae): smoke for tests, a CPU one, the published layouts for GPUs
    "dcae-smoke": dict(arch="dcae", dcae_config="smoke", image_size=16, n_images=64, steps=6, global_batch=8,
                       lr=1e-3, ema_decay=0.9, perceptual_weight=0.0, gan_weight=0.1, gan_start=3, disc_channels=16,
                       disc_layers=2, log_every=1, ckpt_every=3, sample_every=6, stats_images=32, val_images=8,
                       val_every=3),
    "dcae-cpu": dict(arch="dcae", dcae_config="tiny-f4", image_size=32, n_images=2000, steps=1200, global_batch=32,
                     lr=1e-3, ema_decay=0.995, perceptual_weight=0.0, gan_weight=0.0, log_every=50, ckpt_every=400,
                     sample_every=400, stats_images=2000, val_images=128, val_every=200, out="runs/dcae-demo"),
    **{f"dcae-{c}": dict(arch="dcae", dcae_config=c, image_size=256, steps=500000, global_batch=256, lr=1e-4,
                         perceptual_weight=1.0, gan_weight=0.1, gan_start=200000, ema_decay=0.9999,
                         out=f"runs/dcae-{c}", workers=8) for c in ("f32c32", "f64c128")},
}


def parser():
    p = argparse.ArgumentParser(description="Stage 1: ViT VAE (or DC-AE) with MLSR",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fixed = add_common_args(p)              # what is trained: a resumed run may not change these (common.Run)
    fixed.add_argument("--arch", default="vit", choices=("vit", "dcae"),
                       help="vit: the ViT VAE (--size); dcae: a diffusers AutoencoderDC (--dcae-config), deterministic")
    fixed.add_argument("--dcae-config", default="f32c32", choices=sorted(DCAE_CONFIGS), help="named DC-AE layout")
    fixed.add_argument("--size", default="f16d32", choices=sorted(SIZES), help="named VAE size")
    fixed.add_argument("--latent-dim", type=int, default=None, help="override the size's latent channels d")
    fixed.add_argument("--image-size", type=int, default=256)
    fixed.add_argument("--mlsr-fractions", type=float, nargs=4, default=list(fft_ops.MLSR_FRACTIONS),
                       help="p_l: fraction of latent bins removed at levels 0..3 (Eq. 3)")
    fixed.add_argument("--mlsr-sigmas", type=float, nargs=4, default=list(fft_ops.MLSR_SIGMAS),
                       help="sigma_l in pixels of the image blur at levels 0..3 (Eq. 4)")
    fixed.add_argument("--pixel-weight", type=float, default=1.0)
    fixed.add_argument("--perceptual-weight", type=float, default=1.0)
    fixed.add_argument("--kl-weight", type=float, default=1e-6)
    fixed.add_argument("--gan-weight", type=float, default=0.1, help="fixed weight of the generator hinge loss")
    fixed.add_argument("--gan-start", type=int, default=200000, help="step at which the GAN losses switch on")
    fixed.add_argument("--gan-real", default="target", choices=("target", "image"),
                       help="the discriminator's real images: G_l(x), the target of Eq. 2 at the step's level "
                            "(target), or the sharp x at every level (image)")
    fixed.add_argument("--disc-channels", type=int, default=64)
    fixed.add_argument("--disc-layers", type=int, default=3)
    p.add_argument("--out", default=VAE_OUT, help="output folder: checkpoints, logs, grids")
    p.add_argument("--perceptual-weights", default=None, help="local VGG16 weights file (torchvision format)")
    p.add_argument("--disc-lr", type=float, default=None, help="discriminator lr (default: --lr)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--stats-images", type=int, default=10000, help="images used for the latent mean / std")
    p.add_argument("--stats-only", action="store_true", help="only (re)compute latent statistics of --resume")
    return p


FIXED_ON_RESUME = fixed_on_resume(parser())

# Settings that act only with others: given without them they are refused in one line (common.check_needs), and
# runs record them as inert, so `evaluate.py compare` does not group runs by them. A new one is one line.
GAN_ON = when("gan_weight", 0.0, unless=True)
NEEDS = {
    "size": (when("arch", "vit"),),
    "kl_weight": (when("arch", "vit"),),                  # a DC-AE's latent is deterministic: no KL term
    "dcae_config": (when("arch", "dcae"),),
    "grad_checkpoint": (when("arch", "vit"),),            # diffusers' AutoencoderDC has no activation checkpointing
    "gan_start": (GAN_ON,),
    "gan_real": (GAN_ON,),
    "disc_channels": (GAN_ON,),
    "disc_layers": (GAN_ON,),
    "disc_lr": (GAN_ON,),
    "perceptual_weights": (when("perceptual_weight", 0.0, unless=True),),
}


def get_args(argv=None):
    args = parse_training_args(parser(), PRESETS, argv, NEEDS)
    preset_arch = PRESETS[args.preset].get("arch", "vit") if args.preset else args.arch
    if preset_arch != args.arch:                # a preset of the other architecture would set its flags
        mine = [n for n, v in PRESETS.items() if v.get("arch", "vit") == args.arch]
        raise UserError(f"--preset {args.preset} is a preset of --arch {preset_arch}; for --arch {args.arch} use one "
                        f"of its presets: {', '.join('--preset ' + n for n in mine)}")
    args.mlsr_fractions = list(fft_ops.check_fractions(args.mlsr_fractions, "--mlsr-fractions"))
    for name in ("image_size", "stats_images"):
        check_range(args, name, 1)
    check_range(args, "gan_start", 0)
    check_range(args, "grad_clip", 0.0, float("inf"))
    return args


# ----------------------------------------------------------------------------- the method: MLSR (Eq. 1-4)

def sample_level(args, step):
    """Eq. 1: one level l ~ Unif{0..3} per step, the same on every rank."""
    u = step_uniform(args.seed, step, STREAM_LEVEL)
    return min(int(u * len(args.mlsr_fractions)), len(args.mlsr_fractions) - 1)


class MLSRPath(torch.nn.Module):
    """The autoencoder's path in Eq. 2: x -> z ~ q(z | x) -> S_l(z) (Eq. 3) -> D(S_l(z)), as one module so that
    DDP and torch.compile see one forward. It holds the autoencoder (ViT VAE or DC-AE), whose own weights are
    what checkpoints store."""

    def __init__(self, ae):
        super().__init__()
        self.ae = ae

    def forward(self, x, noise, level, fractions):
        post = self.ae.encode(x)                                    # q(z | x); a DC-AE's latent is deterministic
        z = fft_ops.attenuate(post.sample(noise), level, fractions)  # S_l(z): the top p_l of z's radii removed
        return self.ae.decode(z), post                              # D(S_l(z)) (B, 3, H, W), posterior


def generator_loss(model, disc, perceptual, x, noise, level, args, step):
    """Eq. 2 with d = pixel + perceptual + GAN + KL, for one micro-batch at MLSR level l (Eq. 1).

    model: an MLSRPath (possibly under DDP / torch.compile): D(S_l(z)) (Eq. 3) with z ~ q(z | x) drawn with
    `noise` (Eq. 2), compared with G_l(x), x blurred by sigma_l (Eq. 4). Returns (loss, parts, target, recon);
    losses are computed in float32.
    """
    recon, post = model(x, noise, level, args.mlsr_fractions)                   # D(S_l(z)), Eq. 3 (B, 3, H, W)
    target = fft_ops.gaussian_blur(x, args.mlsr_sigmas[level])                  # G_l(x), Eq. 4
    recon = recon.float()
    parts = {"pix": F.mse_loss(recon, target)}
    loss = args.pixel_weight * parts["pix"]
    if args.arch == "vit":                                # a DC-AE's latent is deterministic: no KL
        parts["kl"] = post.kl()
        loss = loss + args.kl_weight * parts["kl"]
    if args.perceptual_weight > 0:
        parts["perc"] = perceptual(recon, target)
        loss = loss + args.perceptual_weight * parts["perc"]
    if args.gan_weight > 0 and step >= args.gan_start:
        critic = unwrap(disc)                             # no DDP hooks: its params are frozen here
        critic.requires_grad_(False)
        parts["g_gan"] = hinge_g_loss(critic(recon).float())
        critic.requires_grad_(True)
        loss = loss + args.gan_weight * parts["g_gan"]
    return loss, parts, target, recon


def discriminator_loss(disc, real, recon):
    """The discriminator's hinge loss: real images (G_l(x) with --gan-real target, Eq. 2) against detached
    reconstructions."""
    return hinge_d_loss(disc(real).float(), disc(recon.detach()).float())


# ----------------------------------------------------------------------------- training

def main(argv=None):
    args = get_args(argv)
    d = setup_distributed(args.device, args.dist_timeout)
    if args.stats_only:
        return stats_only(args, d)
    with Run(args, d, "vae", FIXED_ON_RESUME) as run:             # OUT/.lock: one run per folder
        train(args, run)


def train(args, run):
    d = run.d
    torch.manual_seed(args.seed)
    dataset = build_dataset(args.data, args.image_size, n=args.n_images, seed=args.seed)
    if args.arch == "dcae":
        model = DCAE(args.dcae_config, args.image_size, args.latent_dim).to(d.device)
    else:
        model = build_vae(args.size, args.image_size, args.latent_dim).to(d.device)
        model.grad_checkpoint = args.grad_checkpoint    # recompute each block's activations in backward
    ema = copy.deepcopy(model).requires_grad_(False)
    disc = PatchDiscriminator(args.disc_channels, args.disc_layers).to(d.device)
    perceptual = VGGPerceptual(args.perceptual_weights or "torchvision").to(d.device) if args.perceptual_weight > 0 else None
    opt = adamw(model.parameters(), d.device, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    opt_d = adamw(disc.parameters(), d.device, lr=args.disc_lr or args.lr, betas=(0.5, 0.9))
    ck = run.resume(fingerprint(dataset), model.config)                # None: a fresh start
    if ck:
        step = run.restore(ck, {"model": model, "ema": ema, "disc": disc, "opt": opt, "opt_d": opt_d},
                           lr={"opt": args.lr, "opt_d": args.disc_lr or args.lr})
        log0(f"resumed from {ck['path']} at step {step}", d)
    else:
        step = 0
        if d.main:                                  # a fresh run: no DC-AE folder of an earlier run stays behind
            shutil.rmtree(os.path.join(args.out, DCAE_FOLDER), ignore_errors=True)
        check_readable(dataset, d, args.workers)     # an unreadable image stops the run now, not at its step
    name = f"VAE {args.size}" if args.arch == "vit" else f"DC-AE {args.dcae_config}"
    log0(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, latent "
         f"{model.latent_shape(args.image_size)}; {d.world_size} rank(s) x {run.per_rank} images "
         f"({run.accum} micro-batch(es) of {run.micro}); device {d.device}", d)
    train_model = MLSRPath(model)                    # the trained forward: D(S_l(z)); its weights are model's
    train_model = torch.compile(train_model) if args.compile else train_model
    if d.world_size > 1:
        train_model, disc = DDP(train_model), DDP(disc)
    train_idx, val_idx = train_val_split(len(dataset), args.val_images, args.seed)
    sampler = StepSampler(len(dataset), args.global_batch, d.rank, d.world_size, run.accum, args.seed, step,
                          flip=args.hflip, indices=train_idx)
    batches = iter(make_loader(dataset, sampler, args.workers))
    fixed = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))]).to(d.device)
    val_x = torch.stack([dataset[i][0] for i in val_idx]).to(d.device) if val_idx and args.val_every and d.main else None
    latent_shape = model.latent_shape(args.image_size)
    run.start(step)
    while step < args.steps:
        model.train()
        level = sample_level(args, step)                     # Eq. 1: one MLSR level per step
        use_gan = args.gan_weight > 0 and step >= args.gan_start
        totals = {}
        for j in range(run.accum):                           # micro-batches of this rank's share of the batch
            x, _ = next(batches)                             # (b, 3, H, W) in [-1, 1]
            x = x.to(d.device, non_blocking=True)
            noise = run.randn(latent_shape, step, STREAM_Z, j)                      # the posterior sample's
            with run.no_sync(train_model, j):
                with run.autocast():
                    loss, parts, target, recon = generator_loss(train_model, disc, perceptual, x, noise, level,
                                                                args, step)
                (loss / run.accum).backward()
            if use_gan:
                with run.no_sync(disc, j):
                    with run.autocast():
                        real = target if args.gan_real == "target" else x          # G_l(x) (Eq. 2) or x
                        parts["d_gan"] = discriminator_loss(disc, real, recon)
                    (parts["d_gan"] / run.accum).backward()
            run.accumulate(totals, {"loss": loss, **parts})
        totals = run.clip(totals, model.parameters(), step, disc.parameters())      # --grad-clip, NaN guard
        opt.step(), opt.zero_grad(set_to_none=True)
        if use_gan:
            opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        ema_update(ema, model, args.ema_decay)
        step += 1
        run.end_step(step, dict(level=level, lr=opt.param_groups[0]["lr"], **totals))

        if run.due(step, args.val_every):                   # once in a while: held-out PSNR per level
            run.record(step, (lambda: validation_recon(ema, val_x, args)) if val_x is not None else None)
        if step % args.sample_every == 0 and d.main:
            grid = os.path.join(args.out, f"recon_{step:07d}.png")
            save_recon_grid(ema, fixed, args.mlsr_fractions, grid)
            run.grid(grid, step)
        if run.due(step, args.ckpt_every) or run.stopping:
            stats = vae_latent_stats(ema, dataset, args, d) if step == args.steps else None   # for Stage 2
            run.save(lambda: checkpoint_state(run, step, model, ema, disc, opt, opt_d, stats),
                     also=(lambda: save_diffusers_folder(ema, args.out, args.mlsr_fractions, stats))
                     if args.arch == "dcae" else None)
        if run.stopping:
            break
    run.close()                                     # signals act normally again while the last grid is written
    if d.main and step == args.steps and step > run.first_step and not run.stopping:
        save_recon_grid(ema, fixed, args.mlsr_fractions, os.path.join(args.out, "recon_final.png"))
    folder = (f"; for Stages 2-3: --vae diffusers:{os.path.join(args.out, DCAE_FOLDER)}" if args.arch == "dcae" else "")
    run.finish(step, f"done: {run.ckpt_path} (kind 'vae', with latent statistics); grid {args.out}/recon_final.png"
                     + folder)


# ----------------------------------------------------------------------------- latent statistics, grids

def vae_latent_stats(vae, dataset, args, d):
    """Per-channel latent statistics of `vae` over a seeded random subset of --stats-images training images
    (the --val-images held out for validation are not among them)."""
    ae = ViTVAEAutoencoder(vae, args.mlsr_fractions)
    return dataset_latent_stats(ae, dataset, args.stats_images, args.seed, d, workers=args.workers,
                                val_images=args.val_images)


@torch.no_grad()
def validation_recon(ema, x, args, batch=64):
    """Validation of Stage 1: the EMA VAE on fixed held-out images x, per MLSR level l:
    PSNR of D(S_l(z)) against x (not G_l(x)) and the latent HF ratio of S_l(z) (fft_ops.latent_hf_ratio)."""
    ae = ViTVAEAutoencoder(ema, args.mlsr_fractions)
    rows = [level_scores(ae, x[i:i + batch]) for i in range(0, len(x), batch)]
    out = {}
    for level in range(len(args.mlsr_fractions)):
        out[f"val_psnr_l{level}"] = torch.cat([r[level][1] for r in rows]).mean().item()
        out[f"val_latent_hf_l{level}"] = torch.cat([r[level][2] for r in rows]).mean().item()
    return out


@torch.no_grad()
def save_recon_grid(vae, x, fractions, path):
    """Rows: input, then D(S_l(z)) for l = 0..3 with z the posterior mean."""
    vae.eval()
    z = vae.encode(x).mean
    rows = [x] + [vae.decode(fft_ops.attenuate(z, l, fractions)) for l in range(len(fractions))]
    save_grid(torch.cat(rows), path, nrow=x.shape[0])


# ----------------------------------------------------------------------------- checkpoints, --stats-only

def checkpoint_state(run, step, model, ema, disc, opt, opt_d, stats=None):
    """OUT/last.pt: weights (model, EMA, discriminator), optimizers, RNG, settings; at the last step also the
    latent statistics Stage 2 normalises with."""
    return run.checkpoint(step, model_config=unwrap(model).config, model=unwrap(model).state_dict(),
                          ema=ema.state_dict(), disc=unwrap(disc).state_dict(), opt=opt.state_dict(),
                          opt_d=opt_d.state_dict(), latent_stats=stats)


def save_diffusers_folder(ema, out, fractions, stats=None):
    """--arch dcae: OUT/diffusers, the EMA autoencoder as a diffusers folder, with this run's MLSR fractions in
    freqldm.json (vae.DiffusersAutoencoder reads them, so S_l in Stages 2-3 is the one it was trained with);
    replaced whole: it is written to a temporary folder first, so a reader finds the previous folder or the new
    one, never a half-written one.

    With the latent statistics of the last step, its config's scaling_factor is the measured 1 / std of the latents
    over all channels (as SD-VAE and DC-AE define it), and freqldm.json says what it was measured on; before
    that, the config holds diffusers' default 1.0 and freqldm.json records no measurement, so --latent-norm
    scalar does not take the default for a measured scale."""
    final = os.path.join(out, DCAE_FOLDER)
    tmp, old = final + ".part", final + ".old"          # one run per folder (OUT/.lock): fixed names, and what a
    for left in (tmp, old):                             # killed save left behind is removed here
        shutil.rmtree(left, ignore_errors=True)
    try:
        ema.save_pretrained(tmp)
        record = {"mlsr_fractions": list(fractions), "scaling_factor": None}
        if stats is not None:
            scale = measured_scale(stats)
            with open(os.path.join(tmp, "config.json")) as f:
                config = json.load(f)
            write_json(os.path.join(tmp, "config.json"), {**config, "scaling_factor": scale})
            record["scaling_factor"] = {"value": scale, "source": f"1 / std of its latents over all channels, "
                                                                  f"{stats['source']}"}
        write_json(os.path.join(tmp, MLSR_FILE), record)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def measured_scale(stats):
    """1 / std of the latents over every channel and position, from per-channel mean / std (equal counts per
    channel): the scaling_factor of SD-VAE and DC-AE, z_n = z * scale."""
    mean, std = stats["mean"].double(), stats["std"].double()
    var = (std ** 2 + mean ** 2).mean() - mean.mean() ** 2
    return float(1.0 / var.sqrt())


def stats_only(args, d):
    """--stats-only: (re)compute the latent statistics of a finished checkpoint, in place, atomically.

    Data, dataset size, seed, workers, held-out images and image size come from the checkpoint's own config (an
    explicit --data, --n-images, --stats-images, --seed, --workers or --val-images overrides them); the model
    from its model config; no VGG needed. The weights stay, and so does the content hash (vae.checkpoint_identity).
    """
    start = resume_path(args)
    if not start:
        raise UserError(f"--stats-only needs a checkpoint: --resume PATH (none at {os.path.join(args.out, 'last.pt')})")
    if load_checkpoint(start, "vae")["model_config"].get("arch") == "dcae":
        raise UserError(f"--stats-only is for the ViT VAE: Stage 2 measures the latent statistics of a DC-AE "
                        f"({start}) itself, from its diffusers folder")
    ae = ViTVAEAutoencoder.from_checkpoint(start, d.device)
    ck, cfg = ae.checkpoint, ae.checkpoint["config"]
    pick = {k: getattr(args, k) if k in args.explicit else cfg.get(k, getattr(args, k))
            for k in ("data", "n_images", "stats_images", "seed", "workers", "val_images")}
    dataset = build_dataset(pick["data"], ae.image_size, n=pick["n_images"], seed=pick["seed"])
    ck["latent_stats"] = dataset_latent_stats(ae, dataset, pick["stats_images"], pick["seed"], d,
                                              workers=pick["workers"], val_images=pick["val_images"])
    ck["content_hash"] = ae.content_hash            # same weights: the same autoencoder for the SiTs trained on it
    if d.main:
        save_checkpoint(start, ck)
    barrier()
    log0(f"latent statistics of {start} ({ck['latent_stats']['source']}, data {pick['data']}): "
         f"mean {[round(v, 4) for v in ck['latent_stats']['mean'].tolist()]}, "
         f"std {[round(v, 4) for v in ck['latent_stats']['std'].tolist()]}", d)


if __name__ == "__main__":
    run_main(main)
