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

Latents: z = posterior mean of the frozen VAE (EMA weights), normalised per channel with
the statistics stored in the VAE checkpoint: z_n = (z - mean) / std (--latent-norm scalar: one scale for
all channels, z_n = (z - shift) * scale, as SD-VAE / DC-AE baselines). Then, per step:

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
  --r0 auto            R = the peak of the autoencoder's own F3 curve (FreqWarm Finding 3: latent HF
                       energy of E(lowpass(x, r0)) over vae.R0_SWEEP, on --r0-auto-images seeded random
                       training images); the curve and the choice are stored in the checkpoint, and a
                       resumed run keeps the stored choice. A curve without an interior peak is refused.
  --cache-latents      encode the dataset once (both flips; also the low-passed copy with FreqWarm)
                       into OUT/latents-*.npy (float16, memory-mapped) instead of every step.
  --keep-every N       also keep the EMA weights at steps N, 2N, ... (OUT/keep/ema_STEP.pt) for
                       convergence curves (`evaluate.py curve`).
"""
import argparse
import copy
import hashlib
import json
import os

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import fft_ops
from tqdm import tqdm

from common import (VAE_OUT, RunLock, SignalStop, StepLoop, UserError, adamw, add_common_args, autocast, barrier,
                    batch_split, check_finite, check_range, check_resume_settings, check_same_data, clear_run_folder,
                    ema_update, finish_message, global_rand, global_randn, load_checkpoint, log0, micro_rows,
                    parse_with_presets, resume_path, rng_state, run_main, save_checkpoint, save_grid, set_lr,
                    set_rng_state, setup_distributed, sync_grads_on, to_device, unwrap, validate_common,
                    wait_for_files, write_json)
from data import (FlipView, StepSampler, build_dataset, fingerprint, image_batches, make_loader, random_subset,
                  train_val_split)
from dit import (SAMPLERS, Projector, build_denoiser, guided_velocity, interpolate, sample_ode, sample_sde,
                 velocity_target)
from vae import (DEFAULT_IMAGE_SIZE, R0_SWEEP, LatentSpace, absolute_spec, dataset_latent_stats, f3_curve, f3_peak,
                 load_autoencoder, resolve_image_size, scalar_stats)

STREAM_T, STREAM_EPS, STREAM_DROP, STREAM_TEACHER = 11, 12, 13, 14
CACHE_SHARD_KEYS = 16384                 # latent-cache keys per shard file (the unit a stopped build resumes from)

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


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Stage 2: SiT with denoised latents, FDA and FreqWarm",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p)
    p.add_argument("--out", default="runs/sit", help="output folder: checkpoints, logs, grids, latent cache")
    p.add_argument("--vae", default=os.path.join(VAE_OUT, "last.pt"),
                   help="frozen autoencoder: a Stage-1 checkpoint (train_vae.py writes runs/vae/last.pt), or "
                        "diffusers:HUB_ID_OR_FOLDER[#SUBFOLDER] (AutoencoderKL, AutoencoderDC, AutoencoderKLWan, "
                        "AutoencoderKLLTXVideo)")
    p.add_argument("--model", default="XL/2", help="SiT size/patch: smoke/1, tiny/1, S/2, B/2, L/2, XL/2, XL/1, ...; "
                                                   "U-ViT: uvit-smoke/1, uvit-tiny/2, uvit-S/2, uvit-M/2, uvit-L/2, uvit-H/2")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"image side (default: the VAE's training size; {DEFAULT_IMAGE_SIZE} for pretrained autoencoders)")
    p.add_argument("--stats-images", type=int, default=10000,
                   help="random training images for the latent statistics when the VAE's own do not fit the data")
    p.add_argument("--class-dropout", type=float, default=0.1, help="label dropout to the null class (CFG)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--denoise-level", type=int, default=0, choices=range(4), help="train on S_l(z) (Eq. 5)")
    p.add_argument("--latent-norm", default="channel", choices=("channel", "scalar"),
                   help="channel: (z - mean) / std per channel, measured on the data; scalar: (z - shift) * scale "
                        "with the autoencoder's own scaling_factor (diffusers config) or --latent-scale")
    p.add_argument("--latent-scale", type=float, default=None,
                   help="with --latent-norm scalar: this scale (e.g. SD-VAE's 0.18215) instead of the autoencoder's own")
    p.add_argument("--renorm-level", action="store_true",
                   help="divide S_l(z_n) by its per-channel std (S_l removes variance: std ~1.0/.94/.87/.78)")
    p.add_argument("--fda", action="store_true", help="Frequency-Domain Diffusion Alignment (Eq. 6-8)")
    p.add_argument("--fda-weight", type=float, default=0.5, help="w in lambda(t)")
    p.add_argument("--fda-depth", type=int, default=8, help="align the output of this block (1-based)")
    p.add_argument("--fda-schedule", default="linear", choices=("linear", "constant"),
                   help="lambda(t) = w * t (linear) or w (constant)")
    p.add_argument("--freqwarm", action="store_true", help="FreqWarm low-pass warm-up curriculum")
    p.add_argument("--r0", type=r0_arg, default=0.2,
                   help="FreqWarm RGB low-pass radius, cycles/pixel in (0, 0.71], or 'auto': the peak of the "
                        "autoencoder's own F3 curve (latent HF energy vs r0)")
    p.add_argument("--r0-auto-images", type=int, default=256,
                   help="with --r0 auto: seeded random training images the F3 curve is measured on")
    p.add_argument("--lowpass-kind", default="ideal", choices=fft_ops.MASK_KINDS, help="FreqWarm filter shape")
    p.add_argument("--lowpass-clamp", action="store_true",
                   help="clamp low-passed images to [-1, 1] (the ideal filter rings past it: Gibbs)")
    p.add_argument("--warmup-steps", type=int, default=None, help="FreqWarm warm-up length in steps")
    p.add_argument("--warmup-frac", type=float, default=0.5, help="warm-up as a fraction of --steps (if no --warmup-steps)")
    p.add_argument("--cache-latents", action="store_true", help="encode the dataset once into a latent cache")
    p.add_argument("--keep-every", type=int, default=0,
                   help="also keep the EMA weights at every multiple of this step in OUT/keep/ema_STEP.pt, for "
                        "`evaluate.py curve` (0: none)")
    p.add_argument("--sample-steps", type=int, default=50, help="sampler steps of the periodic sample grids")
    p.add_argument("--sampler", default="heun", choices=SAMPLERS,
                   help="euler / heun: the ODE; sde: SiT's Euler-Maruyama sampler (dit.sample_sde)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale of the periodic sample grids")
    args = parse_with_presets(p, PRESETS, argv)
    validate_common(args)
    if args.r0 == "auto" and not args.freqwarm:
        raise UserError("--r0 auto chooses FreqWarm's low-pass radius: add --freqwarm")
    if args.r0 != "auto":
        fft_ops.check_r0(args.r0)               # checked even without --freqwarm: a given value must be valid
    check_range(args, "r0_auto_images", 1)
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
    if args.latent_scale is not None and (args.latent_norm != "scalar" or not args.latent_scale > 0):
        raise UserError(f"--latent-scale {args.latent_scale} needs --latent-norm scalar and a value > 0")
    if args.latent_norm == "scalar" and args.renorm_level:
        raise UserError("--renorm-level needs per-level statistics, which --latent-norm scalar does not measure")
    check_range(args, "fda_weight", 0.0, float("inf"))
    check_finite(args, "cfg_scale")                       # the grids are checked too (common.save_grid)
    return args


def r0_arg(text):
    """--r0: a radius in cycles/pixel, or 'auto'."""
    return "auto" if text == "auto" else float(text)


# ----------------------------------------------------------------------------- latents

class Latents(LatentSpace):
    """Normalised autoencoder latents of a batch, from images on the fly or from the cache.

    Stage by stage: images (B, 3, H, W) --[lowpass(., r0) while warming up]--> frozen encoder
    --> latent (B, C, h, w) --> z_n = (z - mean) / std. The denoise level is applied in the loss:
    z^(l) = S_l(z_n) (divided by its per-channel std with --renorm-level), see LatentSpace.
    """

    def __init__(self, ae, stats, args, warmup_steps, device):
        super().__init__(stats, ae.mlsr_fractions, args.denoise_level, args.renorm_level, device)
        self.ae, self.stats, self.args, self.device = ae, stats, args, device
        self.planned_warmup = warmup_steps                 # stored in checkpoints: a resumed run keeps it
        self.warmup_steps = warmup_steps if args.freqwarm else 0
        self.cache = None                                  # {False: full, True: low-passed} CachedRows
        self.r0_auto = None                                # --r0 auto: the F3 curve and the choice (checkpointed)

    def warming(self, step):
        return step < self.warmup_steps

    def phase(self, step):
        """'warmup' while FreqWarm feeds low-passed latents, else 'full' (logged and checkpointed)."""
        return "warmup" if self.warming(step) else "full"

    def images_for(self, images, lowpassed):
        """The encoder's input: images, or with FreqWarm lowpass(images, r0) (clamped with --lowpass-clamp)."""
        if not lowpassed:
            return images
        x = fft_ops.lowpass(images, self.args.r0, self.args.lowpass_kind)
        return x.clamp(-1, 1) if self.args.lowpass_clamp else x

    @torch.no_grad()
    def encode(self, images, lowpassed):
        return self.ae.encode(self.images_for(images, lowpassed))            # (B, C, h, w) raw, float32

    def get(self, step, images=None, keys=None):
        """Normalised latents for step `step`: cached rows `keys`, or encoded `images`."""
        warm = self.warming(step)
        if self.cache is not None:
            z = to_device(torch.from_numpy(self.cache[warm][keys]), self.device)     # (B, C, h, w)
        else:
            z = self.encode(to_device(images, self.device), warm)
        return self.normalize(z)

    def cache_key(self, dataset, warm):
        """Content key of one cache: autoencoder bytes, data files, size, flips, low-pass settings."""
        a = self.args
        parts = [self.ae.content_hash, fingerprint(dataset), a.image_size, a.hflip]
        if warm:
            parts += [a.lowpass_kind, a.r0, a.lowpass_clamp]
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

    def build_cache(self, dataset, out_dir, d, batch=64):
        """Encode every sample key once per needed phase into float16 shards of CACHE_SHARD_KEYS keys each.

        Keys are those of FlipView (k >= N is image k - N mirrored) when --hflip, else 0..N-1. Shard j holds
        keys [j S, (j + 1) S) in OUT/latents-KEY/rows-LO-HI.npy (renamed into place when complete) and is
        encoded by rank j mod W; shards already there are kept, so a stopped build resumes from its finished
        shards (with any number of ranks). No rank waits in a collective, however long the others take: rank 0
        waits for the shard files, writes index.json, and the others wait for it (then a barrier, which they all
        reach within a poll). A cache is complete exactly when its index exists; any number of ranks can read it.
        """
        view = FlipView(dataset)
        n_keys = len(view) if self.args.hflip else len(dataset)
        shape = self.ae.latent_shape(self.args.image_size)
        self.cache = {}
        for warm in ([False, True] if self.args.freqwarm else [False]):
            folder = os.path.join(out_dir, f"latents-{self.cache_key(dataset, warm)}")
            index_path = os.path.join(folder, "index.json")
            if not os.path.isfile(index_path):
                bounds = list(range(0, n_keys, CACHE_SHARD_KEYS)) + [n_keys]
                names = [f"rows-{lo:09d}-{hi:09d}.npy" for lo, hi in zip(bounds[:-1], bounds[1:])]
                paths = [os.path.join(folder, n) for n in names]
                os.makedirs(folder, exist_ok=True)
                mine = range(d.rank, len(names), d.world_size)
                todo = [j for j in mine if not os.path.isfile(paths[j])]
                if len(todo) < len(mine):
                    log0(f"latent cache: keeping {len(mine) - len(todo)} finished shard(s) of rank {d.rank}", d)
                bar = tqdm(total=sum(bounds[j + 1] - bounds[j] for j in todo), unit="img", mininterval=2.0,
                           desc=f"latent cache ({'low-passed' if warm else 'full'})", disable=not d.main)
                for j in todo:
                    self._encode_shard(view, bounds[j], bounds[j + 1], paths[j], warm, batch, bar)
                bar.close()
                if d.main:
                    wait_for_files(paths, "the latent cache")
                    write_json(index_path, {"key": self.cache_key(dataset, warm), "shards": names, "bounds": bounds,
                                            "shape": list(shape), "autoencoder": self.ae.name,
                                            "low_passed": warm, "r0": self.args.r0 if warm else None})
                else:
                    wait_for_files([index_path], "the latent cache")
                barrier()                                  # all ranks are here within a poll: a short wait
                log0(f"latent cache written: {folder} ({n_keys} x {tuple(shape)})", d)
            self.cache[warm] = CachedRows(folder)

    def _encode_shard(self, view, lo, hi, path, warm, batch, bar):
        """Latents of keys [lo, hi) into the float16 file `path`, which appears only when complete."""
        tmp = path + ".part"
        try:                                               # a stopped or failed build leaves no partial shard
            shape = (hi - lo, *self.ae.latent_shape(self.args.image_size))            # (keys, C, h, w)
            arr = np.lib.format.open_memmap(tmp, "w+", np.float16, shape)
            row = 0
            for x in image_batches(view, range(lo, hi), batch, self.args.workers):
                arr[row:row + len(x)] = self.encode(x.to(self.device), warm).cpu().numpy().astype(np.float16)
                row += len(x)
                bar.update(len(x))
            arr.flush()
            del arr
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


class CachedRows:
    """Rows of a sharded latent cache, memory-mapped: rows[keys] -> float32 (len(keys), C, h, w)."""

    def __init__(self, folder):
        with open(os.path.join(folder, "index.json")) as f:
            index = json.load(f)
        self.bounds = np.array(index["bounds"])
        self.shards = [np.load(os.path.join(folder, s), mmap_mode="r") for s in index["shards"]]

    def __len__(self):
        return int(self.bounds[-1])

    def __getitem__(self, keys):
        keys = np.asarray(keys)
        which = np.searchsorted(self.bounds, keys, side="right") - 1             # shard of each key
        out = np.empty((len(keys), *self.shards[0].shape[1:]), dtype=np.float32)
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.shards[s][keys[sel] - self.bounds[s]]
        return out


# ----------------------------------------------------------------------------- validation (DESIGN.md section 9)

VAL_TS = tuple((i + 0.5) / 8 for i in range(8))          # fixed t grid: 0.0625 ... 0.9375 (t = 1 is noise)


class Validation:
    """The EMA model's flow-matching loss on fixed held-out latents, per t on a fixed grid, with fixed noise.

    Latents are full-frequency (never low-passed) at the run's denoise level, z^(l) = S_l(z_n), of images
    held out of training; noise for grid point i is drawn from a generator seeded by (seed, i). So at a given
    step the number depends only on the EMA weights: runs that differ only in FreqWarm or FDA are comparable.
    """

    def __init__(self, latents, dataset, indices, args, device, batch=64):
        zs, ys = [], []
        for i in range(0, len(indices), batch):
            idx = indices[i:i + batch]
            x = torch.stack([dataset[j][0] for j in idx]).to(device)
            zs.append(latents.at_level(latents.normalize(latents.encode(x, False)), args.denoise_level))
            ys.append(torch.tensor([dataset.label(j) for j in idx], device=device))
        self.z, self.y, self.seed, self.batch = torch.cat(zs), torch.cat(ys), args.seed, batch    # (V, C, h, w)

    @torch.no_grad()
    def __call__(self, ema):
        ema.eval()
        out = {}
        for i, t in enumerate(VAL_TS):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_777 + i)
            eps = torch.randn(self.z.shape, generator=g).to(self.z.device)
            per = []
            for s in range(0, len(self.z), self.batch):
                z, e, y = self.z[s:s + self.batch], eps[s:s + self.batch], self.y[s:s + self.batch]
                tt = torch.full((len(z),), t, device=z.device)
                v = ema(interpolate(z, e, tt), tt, y).float()
                per.append((v - velocity_target(z, e)).pow(2).mean(dim=(1, 2, 3)))
            out[f"val_loss_t{t:.4f}"] = torch.cat(per).mean().item()
        out["val_loss"] = sum(out.values()) / len(VAL_TS)
        return out


# ----------------------------------------------------------------------------- student (SiT + FDA projector)

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


def fda_lambda(t, args):
    """lambda_align(t): larger at high noise (t -> 1) for the coarse-to-fine schedule."""
    return args.fda_weight * (t if args.fda_schedule == "linear" else torch.ones_like(t))


def teacher_level(args, step):
    """l_hi ~ Unif{l_lo + 1, ..., 3}, the same on every rank."""
    lo = args.denoise_level
    u = global_rand((1,), args.seed, step, STREAM_TEACHER, slice(None), torch.device("cpu")).item()
    return lo + 1 + min(int(u * (3 - lo)), 2 - lo)


def diffusion_loss(student, ema, z, y, t, eps, args, step, to_level=fft_ops.attenuate):
    """Velocity loss on z^(l_lo) (Eq. 5) plus, with FDA, lambda(t) L_align (Eq. 6-8). Returns (loss, parts).

    to_level(z, l) gives z^(l): S_l with the autoencoder's own fractions (Latents.at_level) in training.
    """
    z_lo = to_level(z, args.denoise_level)                                     # (B, C, h, w)
    v, h_student = student(interpolate(z_lo, eps, t), t, y)
    per_sample = (v.float() - velocity_target(z_lo, eps)).pow(2).mean(dim=(1, 2, 3))   # (B,)
    parts = {"diff": per_sample.mean()}
    loss = parts["diff"]
    if args.fda:
        z_hi = to_level(z, teacher_level(args, step))
        with torch.no_grad():                                                  # stop-gradient teacher
            h_teacher = ema(z_hi, torch.zeros_like(t), y, return_hidden=args.fda_depth, hidden_only=True)
        align = (h_student.float() - h_teacher.float()).pow(2).mean(dim=(1, 2))   # (B,) Eq. 7
        parts["align"] = align.mean()
        loss = loss + (fda_lambda(t, args) * align).mean()
    return loss, parts


# ----------------------------------------------------------------------------- sampling grid

@torch.no_grad()
def sample_grid(ema, latents, num_classes, args, device, path, per_class=4):
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
    images = latents.ae.decode(latents.to_autoencoder(z))
    save_grid(images, path, nrow=len(classes))


# ----------------------------------------------------------------------------- main

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
    """--r0 auto: r0 at the peak of the autoencoder's own F3 curve, measured here (FreqWarm Finding 3).

    F3(r0) = mean latent HF energy of z_n = (E(lowpass(x, r0)) - mean) / std (vae.f3_scores; this run's latent
    statistics) over --r0-auto-images seeded random training images (never validation ones), for r0 in
    vae.R0_SWEEP. The peak must be interior: a curve highest at an end of the sweep is refused in one line.
    Returns the record stored in checkpoints (the curve, the choice, what it was measured on).
    """
    train_idx, _ = train_val_split(len(dataset), args.val_images, args.seed)
    idx = [train_idx[i] for i in random_subset(len(train_idx), args.r0_auto_images, args.seed)]
    batches = image_batches(dataset, idx[d.rank::d.world_size], batch, args.workers)
    energy = f3_curve(ae, batches, LatentSpace(stats, ae.mlsr_fractions, device=d.device).normalize, d.device)
    curve = ", ".join(f"{r:g}: {e:.4g}" for r, e in zip(R0_SWEEP, energy))
    what = f"F3 curve of {ae.name} (latent HF energy at radius > 0.25 vs r0, {len(idx)} random training images)"
    peak = f3_peak(R0_SWEEP, energy)
    if peak is None:
        end = "rises to the largest" if energy[-1] >= max(energy) else "falls from the smallest"
        raise UserError(f"--r0 auto: the {what} has no interior peak (it {end} r0: {curve}); pass --r0 R")
    log0(f"--r0 auto: r0 = {peak:g}, the peak of the {what}: {curve}", d)
    return {"r0_sweep": list(R0_SWEEP), "latent_hf_energy": energy, "chosen": peak, "n_images": len(idx),
            "seed": args.seed, "hf_radius": 0.25}


def build(args, d):
    """Frozen autoencoder, dataset, SiT student / EMA teacher, optimizer."""
    ae = load_autoencoder(args.vae, d.device)
    if not (args.image_size or ae.image_size):
        log0(f"image size: {DEFAULT_IMAGE_SIZE} px ({ae.name} has no native size; --image-size to change)", d)
    args.image_size = resolve_image_size(ae, args.image_size)
    dataset = build_dataset(args.data, args.image_size, n=args.n_images, seed=args.seed)
    C, h = ae.latent_dim, args.image_size // ae.downsample
    sit = build_denoiser(args.model, h, C, dataset.num_classes).to(d.device)
    if args.fda and not 1 <= args.fda_depth <= len(sit.blocks):
        raise UserError(f"--fda-depth {args.fda_depth} is outside 1..{len(sit.blocks)} for SiT {args.model}")
    if args.fda and args.denoise_level == 3:
        raise UserError("--fda needs a more attenuated teacher level than --denoise-level; use a level below 3")
    student = Student(sit, args.fda_depth if args.fda else None).to(d.device)
    ema = copy.deepcopy(sit).requires_grad_(False).eval()
    opt = adamw(student.parameters(), d.device, lr=args.lr, weight_decay=args.weight_decay)
    return ae, dataset, student, ema, opt


# Settings that define what is trained: a resume may not change them (the others may, and are logged).
FIXED_ON_RESUME = ("model", "image_size", "data", "n_images", "val_images", "hflip", "global_batch", "seed",
                   "class_dropout",
                   "denoise_level", "renorm_level", "fda", "fda_depth", "fda_weight", "fda_schedule",
                   "freqwarm", "r0", "r0_auto_images", "lowpass_kind", "lowpass_clamp", "latent_norm", "latent_scale")


def resume(path, args, student, ema, opt, ae, data_fp, d):
    """Load a SiT checkpoint after checking that it is this run: same latents, same settings, same switch."""
    ck = load_checkpoint(path, "sit")
    if ck.get("ema_only"):
        raise UserError(f"{path} is a kept EMA-only checkpoint (for `evaluate.py curve`), not one to resume from")
    if not ck.get("latent_stats"):
        raise UserError(f"{path} holds no latent statistics (latent_stats): it cannot be resumed; "
                        f"start a fresh run with another --out")
    cfg = unwrap(student).sit.config
    norm = ck["latent_stats"].get("norm", "channel")
    if norm != args.latent_norm:
        raise UserError(f"{path} was trained with --latent-norm {norm}, not {args.latent_norm}: it may not change "
                        f"on resume")
    if ck["model_config"]["in_channels"] != cfg["in_channels"]:
        raise UserError(f"{path} was trained on {ck['model_config']['in_channels']}-channel latents, "
                        f"but {args.vae} gives {cfg['in_channels']} channels")
    stored_ae = ck.get("autoencoder", {}).get("content_hash")
    if stored_ae and stored_ae != ae.content_hash:
        raise UserError(f"{path} was trained on the latents of another autoencoder (content {stored_ae}), "
                        f"not {args.vae} ({ae.content_hash}): it may not change on resume")
    auto = ck["freqwarm"].get("auto")
    if args.r0 == "auto":                          # the stored choice wins: a resumed run never re-measures
        if auto is None:
            raise UserError(f"{path} was trained with --r0 {ck['config']['r0']}, not chosen by --r0 auto: "
                            f"resume it with --r0 {ck['config']['r0']}")
        args.r0 = ck["config"]["r0"]
        log0(f"--r0 auto: r0 = {args.r0:g}, the choice stored in {path}", d)
    check_resume_settings(ck["config"], args, FIXED_ON_RESUME, path, d)
    check_same_data(ck, data_fp, args.data, path)
    warmup = ck["freqwarm"]["warmup_steps"]            # the stored switch wins over --steps / --warmup-frac
    if args.freqwarm and args.warmup_steps is not None and args.warmup_steps != warmup:
        raise UserError(f"{path} switches FreqWarm off at step {warmup}, not --warmup-steps {args.warmup_steps}: "
                        f"it may not change on resume")
    if ck["step"] > args.steps:
        raise UserError(f"{path} is already at step {ck['step']}, past --steps {args.steps}")
    if ck["model_config"] != cfg:
        raise UserError(f"{path} holds SiT {ck['model_config']}, but the settings build {cfg}")
    student.load_state_dict(ck["model"]), ema.load_state_dict(ck["ema"]), opt.load_state_dict(ck["opt"])
    set_lr(opt, args.lr)
    set_rng_state(ck["rng"], d.device)
    switch = f" (FreqWarm switch at step {warmup})" if args.freqwarm else ""
    log0(f"resumed from {path} at step {ck['step']}{switch}", d)
    return ck["step"], warmup, ck["latent_stats"], auto


def main(argv=None):
    args = get_args(argv)
    d = setup_distributed(args.device, args.dist_timeout)
    with RunLock(args.out, d):                                     # one run per folder
        train(args, d)


def train(args, d):
    torch.manual_seed(args.seed)
    ae, dataset, student, ema, opt = build(args, d)
    ckpt_path = os.path.join(args.out, "last.pt")
    step, warmup = 0, (args.warmup_steps if args.warmup_steps is not None else round(args.warmup_frac * args.steps))
    start, auto = resume_path(args), None
    data_fp = fingerprint(dataset)
    if start:
        step, warmup, stats, auto = resume(start, args, student, ema, opt, ae, data_fp, d)
    else:
        clear_run_folder(args.out, d)                             # a fresh start: nothing of an earlier run stays
        stats = training_stats(ae, dataset, args, d)
    log0(f"latent statistics: {stats['source']}", d)
    if d.main:
        prune_kept(args.out, step, d)
    if args.r0 == "auto":
        auto = auto_r0(ae, dataset, stats, args, d)
        args.r0 = auto["chosen"]
    latents = Latents(ae, stats, args, warmup, d.device)
    latents.r0_auto = auto
    per_rank, accum, micro = batch_split(args.global_batch, d.world_size, args.micro_batch)
    warm_text = (f"r0={args.r0:g}{' (auto)' if auto else ''} for {latents.warmup_steps} steps" if args.freqwarm
                 else "off")
    log0(f"{args.model}: {sum(p.numel() for p in student.sit.parameters()) / 1e6:.2f}M params on latents "
         f"{tuple(ae.latent_shape(args.image_size))} of {ae.name}; denoise level {args.denoise_level}, FDA {args.fda}, "
         f"FreqWarm {warm_text}; "
         f"{d.world_size} rank(s) x {per_rank} ({accum} x {micro}); device {d.device}", d)
    if args.cache_latents:
        latents.build_cache(dataset, args.out, d)
    train_idx, val_idx = train_val_split(len(dataset), args.val_images, args.seed)
    validation = Validation(latents, dataset, val_idx, args, d.device) if val_idx and args.val_every and d.main else None
    sampler = StepSampler(len(dataset), args.global_batch, d.rank, d.world_size, accum, args.seed, step,
                          flip=args.hflip, indices=train_idx)
    batches = iter(make_loader(dataset, sampler, args.workers)) if latents.cache is None else None
    labels = torch.tensor([dataset.label(i) for i in range(len(dataset))]) if batches is None else None
    train_model = torch.compile(student) if args.compile else student
    teacher = torch.compile(ema) if args.compile and args.fda else ema        # the FDA teacher (shares ema's weights)
    if d.world_size > 1:
        train_model = DDP(train_model)
    loop, first_step, stopping = StepLoop(args, d, step, "sit"), step, 0
    if validation is not None and step == 0:
        loop.log.write(step=0, **validation(ema))
    lat = (args.global_batch, *ae.latent_shape(args.image_size))
    while step < args.steps:
        student.train()
        if args.freqwarm and step == latents.warmup_steps:
            log0(f"FreqWarm: step {step}: switching from low-passed (r0={args.r0}) to full-frequency latents", d)
        totals = {}
        key_batches = sampler.step_keys(step) if batches is None else None
        for j in range(accum):
            if batches is None:
                keys = key_batches[j]
                z, y = latents.get(step, keys=keys), to_device(labels[[k % len(dataset) for k in keys]], d.device)
            else:
                x, y = next(batches)
                z, y = latents.get(step, images=x), to_device(y, d.device)
            rows = micro_rows(d, per_rank, micro, j)
            t = global_rand((args.global_batch,), args.seed, step, STREAM_T, rows, d.device)
            eps = global_randn(lat, args.seed, step, STREAM_EPS, rows, d.device)
            drop = global_rand((args.global_batch,), args.seed, step, STREAM_DROP, rows, d.device) < args.class_dropout
            y = torch.where(drop, torch.full_like(y, dataset.num_classes), y)
            with sync_grads_on(train_model, j, accum):
                with autocast(d.device, not args.no_bf16):
                    loss, parts = diffusion_loss(train_model, teacher, z, y, t, eps, args, step, latents.at_level)
                (loss / accum).backward()
            loop.accumulate(totals, {"loss": loss, **parts}, accum)
        totals = loop.reduce_and_clip(totals, student.parameters(), step, ckpt_path, args.grad_clip)
        opt.step(), opt.zero_grad(set_to_none=True)
        ema_update(ema, student.sit, args.ema_decay)
        phase = latents.phase(step)
        step += 1
        stopping = loop.end_step(step, dict(phase=phase, lr=opt.param_groups[0]["lr"], **totals))
        if args.val_every and loop.due(step, args.val_every):
            loop.check_finite(step)                 # on every rank: never a metric of a non-finite model
            if validation is not None:
                loop.log.write(step=step, **validation(ema))
        if args.keep_every and step % args.keep_every == 0:
            loop.check_finite(step)                 # never keep weights of a non-finite model
            if d.main:
                save_checkpoint(kept_path(args.out, step), kept_state(args, student, ema, opt, step, latents, d))
            barrier()
        if loop.due(step, args.sample_every) and d.main:
            grid = os.path.join(args.out, f"samples_{step:07d}.png")
            sample_grid(ema, latents, dataset.num_classes, args, d.device, grid)
            loop.log.grid(grid, step)                   # --log-to tensorboard: the grid as an image there too
        if loop.due(step, args.ckpt_every) or stopping:
            if d.main:
                save_checkpoint(ckpt_path, checkpoint_state(args, student, ema, opt, step, latents, d, data_fp))
            barrier()
        if stopping:
            log0(f"stop signal: saved {ckpt_path} at step {step}", d)
            break
    loop.close()
    if stopping:
        raise SignalStop(stopping, ckpt_path, step)
    log0(finish_message(step, first_step, args, ckpt_path,
                        f"done: {ckpt_path} (kind 'sit'); samples {args.out}/samples_{step:07d}.png"), d)


def checkpoint_state(args, student, ema, opt, step, latents, d, data_fp=None):
    return {"kind": "sit", "config": vars(args), "model_config": student.sit.config, "model": student.state_dict(),
            "data_fingerprint": data_fp,
            "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng_state(d.device),
            "data_position": {"step": step, "seed": args.seed}, "latent_stats": latents.stats,
            "autoencoder": {"spec": args.vae, "abs_spec": absolute_spec(args.vae), "name": latents.ae.name,
                            "content_hash": latents.ae.content_hash,
                            "mlsr_fractions": list(latents.ae.mlsr_fractions)},
            "freqwarm": {"enabled": args.freqwarm, "r0": args.r0, "kind": args.lowpass_kind,
                         "warmup_steps": latents.planned_warmup, "phase": latents.phase(step),
                         **({"auto": latents.r0_auto} if latents.r0_auto else {})}}     # --r0 auto: curve, choice


KEEP_DIR = "keep"


def kept_path(out, step):
    """OUT/keep/ema_STEP.pt: the EMA weights kept at `step` by --keep-every."""
    return os.path.join(out, KEEP_DIR, f"ema_{step:07d}.pt")


def kept_state(args, student, ema, opt, step, latents, d):
    """A checkpoint for sampling only: kind 'sit' with the EMA weights and everything `evaluate.py sample` reads
    (settings, latent statistics, autoencoder record), without the trained weights, optimizer and RNG state."""
    state = checkpoint_state(args, student, ema, opt, step, latents, d)
    for k in ("model", "opt", "rng", "data_position"):
        del state[k]
    return {**state, "ema_only": True}


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


if __name__ == "__main__":
    run_main(main)
