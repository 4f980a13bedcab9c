"""Throughput benchmark (a benchmark, not a test): one table of what a run spends its time on.

    python bench.py --quick                 # CPU or GPU, seconds: every row at toy sizes (CI runs it)
    python bench.py                         # this machine's table (CPU: SiT-S/2 on 32x32x4 latents, batch 16)
    python bench.py --compile               # the same with torch.compile (SiT, the official reference, FDA teacher)
    python bench.py --rows sit,sit-official --repeats 7

Rows (each on whatever device is present, bf16 autocast on CUDA unless --no-bf16):
    vae-step        one Stage-1 step: MLSR generator loss (pixel + KL + hinge GAN), backward, discriminator
                    loss and backward, clipping and the non-finite guard, both AdamW steps, EMA
    <model>-step    one Stage-2 step of each model in STAGE2 (SiT, ...): velocity loss on latents, backward,
                    clipping and the non-finite guard, AdamW, EMA, the step's bookkeeping (StepLoop); the
                    "+FDA" row adds the alignment loss with the EMA teacher
    sit-official    the same SiT configuration as an independent re-implementation of the official SiT
                    (willisma/SiT models.py + train.py step), for comparison at equal settings
    compare         our SiT step and the official one timed alternately, step by step: the median ratio of their
                    times (a machine shared with other work slows both alike)
    sample          img/s of Euler sampling at --sample-steps, without guidance and with guidance (batched halves)
    cache-encode    latent-cache encoding img/s from a folder of JPEGs (DataLoader with 0 and 2 workers),
                    and the JPEG decode + crop alone (to see which of the two limits it)
    fid-features    FID feature extraction img/s from the same JPEGs (Inception when its file is present,
                    else a small stand-in network, labelled as such: then it times the data path only)

Step times are the median over --repeats timed repeats of --iters steps each, after warm-up; "spread" is the
smallest and largest repeat. Peak memory: CUDA max_memory_allocated per row; on CPU the process's peak
resident set per row (reset through /proc/self/clear_refs where Linux allows it, else the peak of the whole
process so far, from getrusage); it includes what the process still holds from earlier rows. FLOP counts come from torch.utils.flop_counter on one step (matmuls and
attention, forward and backward); MFU = FLOP/s / the GPU's dense bf16 peak, on known GPUs only.
"""
import argparse
import contextlib
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fft_ops
import train_diffusion as td
import train_vae
from common import (StepLoop, UserError, adamw, autocast, check_device, check_range, ema_update, global_rand,
                    global_randn, run_main)
from data import ImageFolder, image_batches
from dit import build_denoiser, build_sit, guided_velocity, sample_ode
from vae import PatchDiscriminator, ViTVAEAutoencoder, build_vae, sincos_2d

# Stage-2 models timed by the <model>-step rows: name -> builder(size "S/2", latent side, channels, classes).
# Adding a model is one line here.
STAGE2 = {
    "SiT": lambda name, side, ch, ncls: build_sit(name, side, ch, ncls),
    "U-ViT": lambda name, side, ch, ncls: build_denoiser("uvit-" + name.replace("XL/", "H/"), side, ch, ncls),
}

# Dense bf16 peak (FLOP/s) of the GPUs we know, for MFU.
GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}

# Settings: (quick, CPU, GPU)
CONFIGS = {
    "quick": dict(vae=("smoke", 16, 8, ["--disc-channels", "16", "--disc-layers", "2"]), dit=("smoke/1", 8, 4, 8), sample_steps=4, sample_batch=4,
                  jpeg=(24, 80, 64, 32, "smoke"), repeats=3, iters=2, warmup=1),
    "cpu": dict(vae=("tiny", 32, 32, ["--disc-channels", "32", "--disc-layers", "2"]), dit=("S/2", 32, 4, 16), sample_steps=5, sample_batch=8,
                jpeg=(256, 320, 240, 64, "tiny"), repeats=3, iters=1, warmup=1),
    "gpu": dict(vae=("f16d32", 256, 64, []), dit=("XL/1", 16, 32, 32), sample_steps=50, sample_batch=64,
                jpeg=(1024, 500, 375, 256, "f16d32"), repeats=5, iters=5, warmup=3),
}


# ----------------------------------------------------------------------------- measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, repeats, iters):
    """(median, min, max) seconds per call of fn over `repeats` repeats of `iters` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times), min(times), max(times)


class PeakMemory:
    """Peak memory of one row: CUDA max_memory_allocated, or on CPU the process's peak resident set."""

    def __init__(self, device):
        self.device = device

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "CUDA alloc"
            return
        try:                                       # Linux: "5" resets the peak RSS (VmHWM) of this process
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "RSS"
        except OSError:
            self.kind = "RSS, process"

    def read(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        if self.kind == "RSS":
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # KiB on Linux


def train_flops(fn):
    """FLOPs of one call of fn (matmuls, convolutions and attention; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def gpu_peak(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK.items() if k in name), None)


class Bench:
    def __init__(self, a, device):
        self.a, self.device, self.rows = a, device, []
        self.mem = PeakMemory(device)
        self.notes = []
        self.tmp = tempfile.mkdtemp(prefix="freqldm-bench-")
        self.bf16 = device.type == "cuda" and not a.no_bf16

    def measure(self, row, config, fn, images, flops_fn=None, warmup=None, repeats=None, iters=None, note=""):
        """Time fn (one call = `images` images), record a table row."""
        c = self.a
        self.mem.reset()
        flops = train_flops(flops_fn) if flops_fn is not None else None
        med, lo, hi = timed(fn, self.device, c.warmup if warmup is None else warmup,
                            c.repeats if repeats is None else repeats, c.iters if iters is None else iters)
        peak = gpu_peak(self.device)
        r = dict(row=row, config=config, img_s=images / med, step_ms=med * 1e3, lo_ms=lo * 1e3, hi_ms=hi * 1e3,
                 mem_mib=self.mem.read(), mem_kind=self.mem.kind, note=note,
                 gflop_img=flops / images / 1e9 if flops else None,
                 tflop_s=flops / med / 1e12 if flops else None,
                 mfu=flops / med / peak if flops and peak else None)
        self.rows.append(r)
        print(f"  {row}: {r['img_s']:.1f} img/s, {r['step_ms']:.1f} ms", file=sys.stderr, flush=True)
        return r


# ----------------------------------------------------------------------------- Stage 1

def bench_vae(b):
    size, res, batch, disc_flags = b.cfg["vae"]
    dev = b.device
    args = train_vae.get_args(["--out", os.path.join(b.tmp, "vae"), "--size", size, "--image-size", str(res),
                               "--global-batch", str(batch), "--perceptual-weight", "0", "--gan-start", "0",
                               "--steps", str(10 ** 9), "--log-every", str(10 ** 9), "--ckpt-every", str(10 ** 9),
                               "--sample-every", str(10 ** 9), *disc_flags] + (["--no-bf16"] if not b.bf16 else []))
    torch.manual_seed(0)
    model = build_vae(size, res).to(dev)
    ema = build_vae(size, res).to(dev).requires_grad_(False)
    disc = PatchDiscriminator(args.disc_channels, args.disc_layers).to(dev)
    opt = adamw(model.parameters(), dev, lr=args.lr, betas=(0.9, 0.95))
    opt_d = adamw(disc.parameters(), dev, lr=args.lr, betas=(0.5, 0.9))
    train_model = torch.compile(model) if b.a.compile else model
    x = torch.rand(batch, 3, res, res, device=dev) * 2 - 1
    lat = (batch, *model.latent_shape(res))
    loop = quiet_loop(args, dev)
    state = {"step": 0}

    def step():
        s = state["step"]
        level = train_vae.sample_level(args, s)
        noise = global_randn(lat, args.seed, s, train_vae.STREAM_Z, slice(None), dev)
        with autocast(dev, b.bf16):
            loss, parts, target, recon = train_vae.generator_loss(train_model, disc, None, x, noise, level, args, s)
        loss.backward()
        with autocast(dev, b.bf16):
            parts["d_gan"] = train_vae.hinge_d_loss(disc(x).float(), disc(recon.detach()).float())
        parts["d_gan"].backward()
        totals = {}
        loop.accumulate(totals, {"loss": loss, **parts}, 1)
        metrics = loop.reduce_and_clip(totals, model.parameters(), s, "none", args.grad_clip, disc.parameters())
        opt.step(), opt.zero_grad(set_to_none=True)
        opt_d.step(), opt_d.zero_grad(set_to_none=True)
        ema_update(ema, model, args.ema_decay)
        state["step"] = s + 1
        loop.end_step(s + 1, dict(level=level, **metrics))

    n = sum(p.numel() for p in model.parameters()) / 1e6
    b.measure("vae-step", f"ViT-VAE {size} ({n:.1f}M) {res}px, batch {batch}, GAN on", step, batch, flops_fn=step)
    loop.close()


def quiet_loop(args, device):
    """The trainers' StepLoop, silent (no bar, no metrics file), as between two metrics lines."""
    d = types.SimpleNamespace(main=False, rank=0, world_size=1, device=device)
    return StepLoop(args, d, 0, "bench")


# ----------------------------------------------------------------------------- Stage 2

def diffusion_args(b, name, side, ch, batch, *extra):
    return td.get_args(["--out", os.path.join(b.tmp, "sit"), "--model", name, "--global-batch", str(batch),
                        "--steps", str(10 ** 9), "--log-every", str(10 ** 9), "--ckpt-every", str(10 ** 9),
                        "--sample-every", str(10 ** 9), "--fda-depth", "1", *extra]
                       + (["--no-bf16"] if not b.bf16 else []))


def stage2_step(b, model_name, build, fda=False):
    name, side, ch, batch = b.cfg["dit"]
    dev, ncls = b.device, 1000
    args = diffusion_args(b, name, side, ch, batch, *(["--fda", "--denoise-level", "1"] if fda else []))
    torch.manual_seed(0)
    net = build(name, side, ch, ncls).to(dev)
    student = td.Student(net, args.fda_depth if fda else None).to(dev)
    ema = build(name, side, ch, ncls).to(dev).requires_grad_(False).eval()
    ema.load_state_dict(net.state_dict())
    opt = adamw(student.parameters(), dev, lr=args.lr, weight_decay=0.0)
    train_model = torch.compile(student) if b.a.compile else student
    teacher = torch.compile(ema) if b.a.compile and fda else ema
    z = torch.randn(batch, ch, side, side, device=dev)
    y = torch.randint(0, ncls, (batch,), device=dev)
    loop = quiet_loop(args, dev)
    lat = (batch, ch, side, side)
    fractions = fft_ops.MLSR_FRACTIONS
    state = {"step": 0}

    def step():
        s = state["step"]
        t = global_rand((batch,), args.seed, s, td.STREAM_T, slice(None), dev)
        eps = global_randn(lat, args.seed, s, td.STREAM_EPS, slice(None), dev)
        drop = global_rand((batch,), args.seed, s, td.STREAM_DROP, slice(None), dev) < args.class_dropout
        yy = torch.where(drop, torch.full_like(y, ncls), y)
        with autocast(dev, b.bf16):
            loss, parts = td.diffusion_loss(train_model, teacher, z, yy, t, eps, args, s,
                                            lambda v, lvl: fft_ops.attenuate(v, lvl, fractions))
        loss.backward()
        totals = {}
        loop.accumulate(totals, {"loss": loss, **parts}, 1)
        metrics = loop.reduce_and_clip(totals, student.parameters(), s, "none", args.grad_clip)
        opt.step(), opt.zero_grad(set_to_none=True)
        ema_update(ema, student.sit, args.ema_decay)
        state["step"] = s + 1
        loop.end_step(s + 1, dict(phase="full", **metrics))

    n = sum(p.numel() for p in net.parameters()) / 1e6
    tokens = (side // int(name.split("/")[1])) ** 2
    row = f"{model_name.lower()}-step" + ("+fda" if fda else "")
    config = (f"{model_name}-{name} ({n:.1f}M, {tokens} tokens) on {side}x{side}x{ch}, batch {batch}"
              + (", FDA (level 1, teacher at block 1)" if fda else ""))
    return step, batch, row, config, ema, loop


def bench_stage2(b, model_name, build, fda=False):
    step, batch, row, config, ema, loop = stage2_step(b, model_name, build, fda)
    b.measure(row, config, step, batch, flops_fn=step)
    loop.close()
    return ema


# ----------------------------------------------------------------------------- the official SiT, re-implemented

class RefAttention(nn.Module):
    """timm's Attention as SiT uses it: qkv with bias, fused scaled_dot_product_attention, projection."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = nn.Dropout(0.0), nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class RefMlp(nn.Module):
    """timm's Mlp with tanh-GELU, dropout 0."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        self.drop1, self.drop2 = nn.Dropout(0.0), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def ref_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RefBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(ref_modulate(self.norm1(x), sh1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(ref_modulate(self.norm2(x), sh2, sc2))


class RefSiT(nn.Module):
    """The official SiT (willisma/SiT models.py) at its defaults: conv patch embedding, fixed sin-cos positions as
    a frozen parameter, sinusoidal t features (256) + MLP, label embedding with dropout 0.1 inside the model in
    training, adaLN-Zero blocks, final layer, learn_sigma=True (2C outputs, the second half dropped)."""

    def __init__(self, input_size, patch, in_ch, dim, depth, heads, num_classes=1000, dropout=0.1):
        super().__init__()
        self.patch, self.in_ch, self.out_ch, self.num_classes, self.dropout = patch, in_ch, 2 * in_ch, num_classes, dropout
        self.x_proj = nn.Conv2d(in_ch, dim, patch, stride=patch)
        self.t_mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_table = nn.Embedding(num_classes + 1, dim)
        g = input_size // patch
        self.pos_embed = nn.Parameter(sincos_2d(dim, g, g)[None].clone(), requires_grad=False)
        self.blocks = nn.ModuleList(RefBlock(dim, heads) for _ in range(depth))
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final_linear = nn.Linear(dim, patch * patch * self.out_ch)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)
        for lin in [blk.adaLN_modulation[-1] for blk in self.blocks] + [self.final_ada[-1]]:
            nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
        nn.init.normal_(self.y_table.weight, std=0.02)

    def forward(self, x, t, y):
        x = self.x_proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        temb = self.t_mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        if self.training and self.dropout > 0:
            y = torch.where(torch.rand(y.shape[0], device=y.device) < self.dropout, self.num_classes, y)
        c = temb + self.y_table(y)
        for blk in self.blocks:
            x = blk(x, c)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        x = self.final_linear(ref_modulate(self.norm_final(x), shift, scale))
        p, c_out, h = self.patch, self.out_ch, int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, h, p, p, c_out))
        x = x.reshape(x.shape[0], c_out, h * p, h * p)
        return x.chunk(2, dim=1)[0]


def official_step(b):
    """The official training step: linear path, velocity target, mean-flat MSE, AdamW(lr 1e-4, wd 0), EMA as a
    per-parameter loop, loss.item() every step (SiT train.py)."""
    from dit import SIZES
    name, side, ch, batch = b.cfg["dit"]
    size, _, patch = name.partition("/")
    depth, dim, heads = SIZES[size]
    dev = b.device
    torch.manual_seed(0)
    model = RefSiT(side, int(patch), ch, dim, depth, heads).to(dev)
    ema = RefSiT(side, int(patch), ch, dim, depth, heads).to(dev).requires_grad_(False).eval()
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    train_model = torch.compile(model) if b.a.compile else model
    x1 = torch.randn(batch, ch, side, side, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    ema_params, model_params = dict(ema.named_parameters()), dict(model.named_parameters())
    running = {"loss": 0.0}

    def step():
        x0 = torch.randn_like(x1)
        t = torch.rand(batch).to(x1)
        tt = t.view(-1, 1, 1, 1)
        xt, ut = tt * x1 + (1 - tt) * x0, x1 - x0
        with autocast(dev, b.bf16):
            out = train_model(xt, t, y)
        loss = ((out.float() - ut) ** 2).mean(dim=(1, 2, 3)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for k, p in model_params.items():
                ema_params[k].mul_(0.9999).add_(p.data, alpha=1 - 0.9999)
        running["loss"] += loss.item()

    n = sum(p.numel() for p in model.parameters()) / 1e6
    return step, batch, "sit-official", f"official SiT-{name} re-implemented ({n:.1f}M), same latents and batch"


def bench_official(b):
    step, batch, row, config = official_step(b)
    b.measure(row, config, step, batch, flops_fn=step)


def bench_compare(b):
    """Our SiT step and the official one, timed alternately (one step each, `repeats` x `iters` pairs), so that
    a machine shared with other work slows both alike; reports the median of the per-pair time ratios."""
    ours, batch, _, _, _, loop = stage2_step(b, "SiT", STAGE2["SiT"])
    ref = official_step(b)[0]
    for _ in range(b.a.warmup):
        ours(), ref()
    pairs = []
    for _ in range(b.a.repeats * b.a.iters):
        t = []
        for fn in (ours, ref):
            sync(b.device)
            t0 = time.perf_counter()
            fn()
            sync(b.device)
            t.append(time.perf_counter() - t0)
        pairs.append(t)
    loop.close()
    ratios = sorted(o / r for o, r in pairs)
    med = lambda xs: statistics.median(xs) * 1e3
    b.notes.append(f"sit-step vs sit-official, alternating, {len(pairs)} pairs: ours {med([p[0] for p in pairs]):.0f} ms, "
                   f"official {med([p[1] for p in pairs]):.0f} ms (medians); time ratio ours / official: median "
                   f"{statistics.median(ratios):.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}")


# ----------------------------------------------------------------------------- sampling

def bench_sampling(b, ema):
    name, side, ch, _ = b.cfg["dit"]
    steps, batch, dev = b.cfg["sample_steps"], b.cfg["sample_batch"], b.device
    model = torch.compile(ema) if b.a.compile else ema
    y = torch.arange(batch, device=dev) % ema.num_classes
    noise = torch.randn(batch, ch, side, side, device=dev)
    for scale in (1.0, 1.5):
        def run():
            with autocast(dev, b.bf16):
                sample_ode(guided_velocity(model, y, scale), noise, steps, "euler")
        what = "no guidance" if scale == 1.0 else f"guidance {scale} (cond + uncond in one batch)"
        b.measure(f"sample{'' if scale == 1.0 else '-cfg'}", f"SiT-{name}, Euler {steps} steps, batch {batch}, {what}",
                  run, batch, warmup=1, repeats=max(3, b.a.repeats // 2), iters=1)


# ----------------------------------------------------------------------------- data path

def make_jpegs(folder, n, w, h, classes=4):
    """n JPEG photographs stand-ins (smooth colour fields with edges and noise), `classes` class folders."""
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        d = os.path.join(folder, f"c{i % classes}")
        os.makedirs(d, exist_ok=True)
        f = rng.uniform(0.005, 0.05, (3, 2))
        img = np.stack([127 + 100 * np.sin(f[c, 0] * xx + f[c, 1] * yy + i) for c in range(3)], -1)
        img[int(h * rng.uniform(0.2, 0.8)):, : int(w * rng.uniform(0.2, 0.8))] *= 0.5
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


def bench_data(b):
    n, w, h, res, vae_size = b.cfg["jpeg"]
    dev = b.device
    folder = os.path.join(b.tmp, "jpegs")
    make_jpegs(folder, n, w, h)
    ds = ImageFolder(folder, res)
    torch.manual_seed(0)
    vae = build_vae(vae_size, res).to(dev)
    ae = ViTVAEAutoencoder(vae)
    C = ae.latent_dim
    stats = {"mean": torch.zeros(C), "std": torch.ones(C), "level_std": torch.ones(4, C)}
    rounds = max(2, b.a.repeats // 2)
    for workers in (0, 2):
        def decode_only():
            for _ in image_batches(ds, range(len(ds)), 64, workers):
                pass
        b.measure(f"jpeg-decode-w{workers}", f"{n} JPEGs {w}x{h} -> ADM crop {res}px, DataLoader {workers} workers",
                  decode_only, n, warmup=0, repeats=rounds, iters=1)
        args = td.get_args(["--out", os.path.join(b.tmp, "cache"), "--image-size", str(res), "--workers", str(workers)])
        d = types.SimpleNamespace(rank=0, world_size=1, main=True)
        count = {"i": 0}

        def encode():
            count["i"] += 1                        # a fresh cache folder each time: every call encodes
            lat = td.Latents(ae, stats, args, 0, dev)
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                lat.build_cache(ds, os.path.join(b.tmp, f"cache-{workers}-{count['i']}"), d)
        b.measure(f"cache-encode-w{workers}",
                  f"latent cache of the {n} JPEGs (both flips: {2 * n} latents), ViT-VAE {vae_size}, {workers} workers",
                  encode, 2 * n, warmup=0, repeats=rounds, iters=1)
    bench_features(b, folder, n, res, rounds)


class _StandInTrunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 8, stride=8)

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.conv(x), 1)


class StandInFeatures(nn.Module):
    """Same calling convention as clean-fid's Inception TorchScript (a `layers` trunk, forward(x, no_output_bias)),
    a fraction of its cost: it stands in for the data path only, and its numbers are not FID."""

    def __init__(self):
        super().__init__()
        self.layers, self.fc = _StandInTrunk(), nn.Linear(32, 1008)

    def forward(self, x, no_output_bias: bool = False):
        return torch.softmax(self.fc(self.layers((x - 128) / 128).flatten(1)), 1)


def bench_features(b, folder, n, res, rounds):
    import evaluate as ev
    path = os.path.join(ev.CLEANFID_CACHE, ev.INCEPTION_FILE)
    if os.path.isfile(path):
        ext, label = ev.InceptionExtractor(path, b.device), "Inception-v3 (clean-fid)"
    else:
        path = os.path.join(b.tmp, "stand-in.pt")
        torch.jit.script(StandInFeatures().eval()).save(path)
        ext = ev.InceptionExtractor(path, b.device, verify=False)
        label = "STAND-IN network, not Inception (its file is absent): data path and 299-px resize only"
    for workers in (0, 2):
        def features():
            src, _, _ = ev.image_source(folder, "--ref", res, workers=workers)
            ev.extract(ext, src, keep=False)
        b.measure(f"fid-features-w{workers}", f"{n} JPEGs -> {res}px -> clean resize 299, {label}, {workers} workers",
                  features, n, warmup=0, repeats=rounds, iters=1)


# ----------------------------------------------------------------------------- table

def table(b, argv):
    dev = b.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    lines = [f"device: {dev.type} ({name}), {torch.get_num_threads()} CPU threads; torch {torch.__version__}; "
             f"{'bf16 autocast' if b.bf16 else 'float32'}{'; torch.compile' if b.a.compile else ''}",
             f"command: python bench.py {' '.join(argv)}".rstrip(), "",
             "| row | configuration | img/s | step ms (median) | spread ms | peak mem MiB | GFLOP/img | TFLOP/s | MFU |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in b.rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)
        lines.append(f"| {r['row']} | {r['config']} | {r['img_s']:.1f} | {r['step_ms']:.1f} | "
                     f"{r['lo_ms']:.1f}-{r['hi_ms']:.1f} | {r['mem_mib']:.0f} ({r['mem_kind']}) | "
                     f"{fmt(r['gflop_img'], '.3g')} | {fmt(r['tflop_s'], '.3g')} | "
                     f"{'-' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + ' %'} |")
    return "\n".join(lines + [""] * bool(b.notes) + b.notes)


ROWS = ("vae", "stage2", "fda", "sit-official", "compare", "sample", "data")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="FreqLDM throughput benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes: the whole table in seconds (CI)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained and sampled models")
    p.add_argument("--no-bf16", action="store_true", help="float32 on CUDA")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (median reported)")
    p.add_argument("--iters", type=int, default=None, help="steps per timed repeat")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = get_args(argv)
    for name in ("repeats", "iters"):
        check_range(a, name, 1, optional=True)
    check_range(a, "warmup", 0, optional=True)
    dev = check_device(a.device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = CONFIGS["quick" if a.quick else dev.type if dev.type == "cuda" else "cpu"]
    cfg = {**cfg, **{k: v for k in ("repeats", "iters", "warmup") if (v := getattr(a, k)) is not None}}
    a.repeats, a.iters, a.warmup = cfg["repeats"], cfg["iters"], cfg["warmup"]
    rows = set(a.rows.split(","))
    unknown = rows - set(ROWS)
    if unknown:
        raise UserError(f"unknown rows {sorted(unknown)}; use {','.join(ROWS)}")
    b = Bench(a, dev)
    b.cfg = cfg
    ema = None
    if "vae" in rows:
        bench_vae(b)
    if "stage2" in rows:
        for model_name, build in STAGE2.items():
            e = bench_stage2(b, model_name, build)
            ema = e if model_name == "SiT" else ema
    if "fda" in rows:
        bench_stage2(b, "SiT", STAGE2["SiT"], fda=True)
    if "sit-official" in rows:
        bench_official(b)
    if "compare" in rows:
        bench_compare(b)
    if "sample" in rows:
        if ema is None:
            name, side, ch, _ = cfg["dit"]
            ema = build_sit(name, side, ch, 1000).to(dev).eval()
        bench_sampling(b, ema)
    if "data" in rows:
        bench_data(b)
    print(table(b, argv))


if __name__ == "__main__":
    run_main(main)
