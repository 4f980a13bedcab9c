"""Throughput benchmark (a benchmark, not a test): one table of what a run spends its time on.

    python bench.py --quick                 # CPU or GPU, seconds: every row at toy sizes (CI runs it)
    python bench.py                         # this machine's table (CPU: SiT-S/2 on 32x32x4 latents, batch 16)
    python bench.py --compile               # the same with torch.compile (SiT, the official reference, FDA teacher)
    python bench.py --rows sit,sit-official --repeats 7
    python bench.py --gpu-check             # one GPU, < 10 min, no network: correctness, throughput, cache, study,
                                            # measured peak memory beside the plan's;
                                            # report in runs/gpu-check/gpu-check.{json,txt} (see "the GPU check")
    python bench.py --gpu-check --smoke --device cpu    # the same at smoke size on a CPU (CI runs it)
    python bench.py --memory                # CPU, seconds: per-GPU memory of the paper's denoisers at 512 px, batch
                                            # 4096 on 8 and 32 GPUs, plain / sharded / checkpointed / both
    python bench.py --memory --models uvit-2B/1 --gpus 8 --ae f32c128 --global-batch 1024

Rows (each on whatever device is present, bf16 autocast on CUDA unless --no-bf16):
    vae-step        one Stage-1 step: MLSR generator loss (pixel + KL + hinge GAN), backward, discriminator
                    loss and backward, clipping and the non-finite guard, both AdamW steps, EMA
    <model>-step    one Stage-2 step of each model in STAGE2 (SiT, ...): velocity loss on latents, backward,
                    clipping and the non-finite guard, AdamW, EMA, the step's bookkeeping (common.Run); the
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
import copy
import functools
import importlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F

import evaluate as ev
import fft_ops
import study
import train_diffusion as td
import train_vae
from common import (Run, UserError, adamw, atomic_write, autocast, check_device, check_range, ema_update,
                    load_checkpoint, read_jsonl, run_main, write_json)
from data import ImageFolder, cache_latents, image_batches
from dit import SIZES, build_denoiser, build_sit, guided_velocity, sample_ode
from vae import PatchDiscriminator, ViTVAEAutoencoder, build_vae, load_autoencoder, sincos_2d

# Stage-2 models timed by the <model>-step rows: name -> builder(size "S/2", latent side, channels, classes).
# Adding a model is one line here.
STAGE2 = {
    "SiT": lambda name, side, ch, ncls: build_sit(name, side, ch, ncls),
    "U-ViT": lambda name, side, ch, ncls: build_denoiser("uvit-" + name.replace("XL/", "H/"), side, ch, ncls),
}

# Dense bf16 peak (FLOP/s) of the GPUs we know, for MFU (datasheet figures; the first name contained in the
# device's name wins, so the PCIe and NVL cards come before the SXM "H100").
GPU_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}

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
    def __init__(self, a, device, tmp=None, backend="inductor"):
        self.a, self.device, self.rows = a, device, []
        self.mem = PeakMemory(device)
        self.notes = []
        self.tmp = tmp or tempfile.mkdtemp(prefix="freqldm-bench-")
        self.bf16 = device.type == "cuda" and not a.no_bf16
        self.backend = backend                     # torch.compile backend (the GPU check uses aot_eager on CPU)

    def compiled(self, model):
        return torch.compile(model, backend=self.backend)

    def measure(self, row, config, fn, images, flops_fn=None, warmup=None, repeats=None, iters=None, note="",
                flops=None):
        """Time fn (one call = `images` images), record a table row. `flops`: FLOPs of one call, if known."""
        c = self.a
        self.mem.reset()
        flops = train_flops(flops_fn) if flops_fn is not None else flops
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
    train_model = train_vae.MLSRPath(model)
    train_model = torch.compile(train_model) if b.a.compile else train_model
    x = torch.rand(batch, 3, res, res, device=dev) * 2 - 1
    lat = (batch, *model.latent_shape(res))
    loop = quiet_loop(args, dev)
    state = {"step": 0}

    def step():
        s = state["step"]
        level = train_vae.sample_level(args, s)
        noise = loop.randn(lat[1:], s, train_vae.STREAM_Z, 0)
        with autocast(dev, b.bf16):
            loss, parts, target, recon = train_vae.generator_loss(train_model, disc, None, x, noise, level, args, s)
        loss.backward()
        with autocast(dev, b.bf16):
            parts["d_gan"] = train_vae.hinge_d_loss(disc(x).float(), disc(recon.detach()).float())
        parts["d_gan"].backward()
        totals = {}
        loop.accumulate(totals, {"loss": loss, **parts})
        metrics = loop.clip(totals, model.parameters(), s, disc.parameters())
        opt.step(), opt.zero_grad(set_to_none=True)
        opt_d.step(), opt_d.zero_grad(set_to_none=True)
        ema_update(ema, model, args.ema_decay)
        state["step"] = s + 1
        loop.end_step(s + 1, dict(level=level, **metrics))

    n = sum(p.numel() for p in model.parameters()) / 1e6
    b.measure("vae-step", f"ViT-VAE {size} ({n:.1f}M) {res}px, batch {batch}, GAN on", step, batch, flops_fn=step)
    loop.close()


def quiet_loop(args, device):
    """The trainers' Run bookkeeping, silent (no bar, no metrics file), as between two metrics lines."""
    d = types.SimpleNamespace(main=False, rank=0, world_size=1, device=device)
    return Run(args, d, "bench").start(0)


# ----------------------------------------------------------------------------- Stage 2

def diffusion_args(b, name, side, ch, batch, *extra):
    return td.get_args(["--out", os.path.join(b.tmp, "sit"), "--model", name, "--global-batch", str(batch),
                        "--steps", str(10 ** 9), "--log-every", str(10 ** 9), "--ckpt-every", str(10 ** 9),
                        "--sample-every", str(10 ** 9), *extra]
                       + (["--no-bf16"] if not b.bf16 else []))


def stage2_step(b, model_name, build, fda=False):
    name, side, ch, batch = b.cfg["dit"]
    dev, ncls = b.device, 1000
    args = diffusion_args(b, name, side, ch, batch,
                          *(["--fda", "--fda-depth", "1", "--denoise-level", "1"] if fda else []))
    torch.manual_seed(0)
    with dev:                                      # initialised on the device (SiT-XL on a CPU takes seconds)
        net = build(name, side, ch, ncls).to(dev)
        ema = build(name, side, ch, ncls).to(dev).requires_grad_(False).eval()
    student = td.Student(net, args.fda_depth if fda else None).to(dev)
    ema.load_state_dict(net.state_dict())
    opt = adamw(student.parameters(), dev, lr=args.lr, weight_decay=0.0)
    train_model = b.compiled(student) if b.a.compile else student
    teacher = b.compiled(ema) if b.a.compile and fda else ema
    z = torch.randn(batch, ch, side, side, device=dev)
    y = torch.randint(0, ncls, (batch,), device=dev)
    loop = quiet_loop(args, dev)
    lat = (batch, ch, side, side)
    fractions = fft_ops.MLSR_FRACTIONS
    state = {"step": 0}

    def step():
        s = state["step"]
        t = loop.rand(s, td.STREAM_T, 0)                   # one rank, one micro-batch: the whole batch
        eps = loop.randn(lat[1:], s, td.STREAM_EPS, 0)
        drop = loop.rand(s, td.STREAM_DROP, 0) < args.class_dropout
        yy = torch.where(drop, torch.full_like(y, ncls), y)
        with autocast(dev, b.bf16):
            loss, parts = td.diffusion_loss(train_model, teacher, z, yy, t, eps, args, s,
                                            lambda v, lvl: fft_ops.attenuate(v, lvl, fractions))
        loss.backward()
        totals = {}
        loop.accumulate(totals, {"loss": loss, **parts})
        metrics = loop.clip(totals, student.parameters(), s)
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
    name, side, ch, batch = b.cfg["dit"]
    size, _, patch = name.partition("/")
    depth, dim, heads = SIZES[size]
    dev = b.device
    torch.manual_seed(0)
    with dev:
        model = RefSiT(side, int(patch), ch, dim, depth, heads).to(dev)
        ema = RefSiT(side, int(patch), ch, dim, depth, heads).to(dev).requires_grad_(False).eval()
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    train_model = b.compiled(model) if b.a.compile else model
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


def cache_encoder(ae, ds, args, dev, root):
    """A function that builds Stage 2's latent cache of `ds` (one process, full frequency, both flips) into a
    fresh folder ROOT-i on each call, so every call encodes."""
    d, count = types.SimpleNamespace(rank=0, world_size=1, main=True, device=dev), {"i": 0}
    args.image_size = ds.resolution

    def encode():
        count["i"] += 1
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            cache_latents(ds, f"{root}-{count['i']}", td.cache_key(ae, ds, args, None), True,
                          ae.latent_shape(ds.resolution), lambda x: td.encode_images(ae, x, None, args), d,
                          args.workers)
    return encode


def bench_data(b):
    n, w, h, res, vae_size = b.cfg["jpeg"]
    dev = b.device
    folder = os.path.join(b.tmp, "jpegs")
    make_jpegs(folder, n, w, h)
    ds = ImageFolder(folder, res)
    torch.manual_seed(0)
    vae = build_vae(vae_size, res).to(dev)
    ae = ViTVAEAutoencoder(vae)
    rounds = max(2, b.a.repeats // 2)
    for workers in (0, 2):
        def decode_only():
            for _ in image_batches(ds, range(len(ds)), 64, workers):
                pass
        b.measure(f"jpeg-decode-w{workers}", f"{n} JPEGs {w}x{h} -> ADM crop {res}px, DataLoader {workers} workers",
                  decode_only, n, warmup=0, repeats=rounds, iters=1)
        args = td.get_args(["--out", os.path.join(b.tmp, "cache"), "--image-size", str(res), "--workers", str(workers)])
        encode = cache_encoder(ae, ds, args, dev, os.path.join(b.tmp, f"cache-{workers}"))
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
    path = os.path.join(ev.CLEANFID_CACHE, ev.INCEPTION_FILE)
    if os.path.isfile(path):
        ext, label = ev.InceptionExtractor(path, b.device, mode="clean"), "Inception-v3 (clean-fid)"
    else:
        path = os.path.join(b.tmp, "stand-in.pt")
        torch.jit.script(StandInFeatures().eval()).save(path)
        ext = ev.InceptionExtractor(path, b.device, verify=False, mode="clean")
        label = "STAND-IN network, not Inception (its file is absent): data path and 299-px resize only"
    for workers in (0, 2):
        def features():
            src, _, _ = ev.image_source(folder, "--ref", res, workers=workers)
            ev.extract(ext, src, keep=False)
        b.measure(f"fid-features-w{workers}", f"{n} JPEGs -> {res}px -> clean resize 299, {label}, {workers} workers",
                  features, n, warmup=0, repeats=rounds, iters=1)


# ----------------------------------------------------------------------------- the memory plan (--memory)

# The FreqWarm paper's four denoisers at 512 px on an f32 autoencoder (16x16 latents), at patch 1 as DC-AE trains
# them on f32: DiT-XL (our SiT: DiT blocks), UViT-H and USiT-H (one network here: U-ViT trained with the
# flow-matching objective is USiT), USiT-2B.
PLAN_MODELS = {"XL/1": "DiT-XL/1 (SiT-XL/1)", "uvit-H/1": "UViT-H/1 = USiT-H/1", "uvit-2B/1": "USiT-2B/1"}
# (name, --grad-checkpoint, --shard-optimizer), in the order a run would add them: sharding costs one broadcast
# of the weights per step, checkpointing one more forward of every block
PLAN_SETTINGS = (("plain", False, False), ("sharded", False, True), ("checkpointed", True, False),
                 ("both", True, True))
CARDS_GIB = (40, 80)           # A100-40GB; A100-80GB / H100-80GB (their memory is 40 and 80 GiB)
COUNT_BATCH = 2                # activations are counted at this batch and checked linear at twice it
GIB = 2 ** 30
FIT_SHARE = 0.9                # a run fits a card when the plan's total is at most 90 % of it: the rest is left for
                               # what the plan does not count (one op's transient buffers, allocator fragmentation)


class FlashAttention(torch.overrides.TorchFunctionMode):
    """F.scaled_dot_product_attention through the flash kernel, as CUDA (and the CPU) run it: backward keeps q,
    k, v, the output and the log-sum-exp, never the N x N attention matrix, which the meta device's reference
    path would keep."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args, **(kwargs or {}))[0]
        return func(*args, **(kwargs or {}))


class SavedForBackward:
    """Bytes of the tensors autograd keeps for backward while a forward runs (torch.autograd.graph's saved-tensor
    hooks): each storage once, parameters not (they are the weights), and how much of it each block saved."""

    def __init__(self, model, blocks=()):
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.sizes, self.per_block, self._before = {}, [], 0
        self.hooks = [h for b in blocks for h in (b.register_forward_pre_hook(self._enter),
                                                  b.register_forward_hook(self._leave))]

    def pack(self, t):
        s = t.untyped_storage()
        if s._cdata not in self.params:
            self.sizes[s._cdata] = s.nbytes()
        return t

    @property
    def total(self):
        return sum(self.sizes.values())

    def _enter(self, module, inputs):
        self._before = self.total

    def _leave(self, module, inputs, output):
        self.per_block.append(self.total - self._before)

    def run(self, fn):
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t), FlashAttention():
                return fn()
        finally:
            for h in self.hooks:
                h.remove()


def count_activations(model, batch):
    """Bytes one training forward of denoiser `model` at `batch` keeps for backward, in float32: `plain`; with
    --grad-checkpoint, `checkpointed` (every block's inputs, saved by torch.utils.checkpoint, and what lies outside
    the blocks) and `largest_block` (the largest block's own activations, which backward recomputes and holds
    while it goes through that block). On the meta device nothing is computed: tensors have shapes only."""
    dev = next(model.parameters()).device
    side, ch = model.config["input_size"], model.config["in_channels"]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(batch, ch, side, side, generator=g).to(dev), torch.rand(batch, generator=g).to(dev)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(dev)
    counts = []
    for on in (False, True):
        model.grad_checkpoint = on
        c = SavedForBackward(model, () if on else model.blocks)
        c.run(lambda: model(x, t, y))
        counts.append(c)
    model.grad_checkpoint = False
    return dict(plain=counts[0].total, checkpointed=counts[1].total, largest_block=max(counts[0].per_block))


@functools.lru_cache(maxsize=None)
def denoiser_counts(name, side, ch):
    """(parameter sizes, tokens, plain and checkpointed activation bytes per image) of denoiser `name` on
    (ch, side, side) latents, counted on the meta device at COUNT_BATCH and checked in proportion at twice it."""
    with torch.device("meta"):
        model = build_denoiser(name, side, ch, 1000)
    one, two = count_activations(model, COUNT_BATCH), count_activations(model, 2 * COUNT_BATCH)
    if any(two[k] != 2 * v for k, v in one.items()):
        raise UserError(f"{name}: the activations counted at batch {COUNT_BATCH} and {2 * COUNT_BATCH} are not in "
                        f"proportion ({one} / {two}): no per-image figure to scale")
    tokens = (side // model.patch) ** 2
    return (tuple(p.numel() for p in model.parameters()), tokens, one["plain"] // COUNT_BATCH,
            (one["checkpointed"] + one["largest_block"]) // COUNT_BATCH)


def zero_shard(sizes, ranks):
    """The largest share of parameters (elements) one rank holds the AdamW state of under ZeroRedundancyOptimizer:
    its partition, largest tensors first, each to the rank with the fewest elements so far."""
    load = [0] * ranks
    for n in sorted(sizes, reverse=True):
        load[load.index(min(load))] += n
    return max(load)


def parse_autoencoder(text):
    """--ae fFcC (e.g. f32c32): downsampling factor and latent channels."""
    m = re.fullmatch(r"f(\d+)c(\d+)", text)
    if not m:
        raise UserError(f"--ae {text}: use fFcC, e.g. f32c32 (factor 32, 32 channels) or f8c4 (SD-VAE)")
    return int(m[1]), int(m[2])


def memory_plan(name, image_size, ae, global_batch, gpus, micro_batch=None):
    """Per-GPU bytes of one Stage-2 run of denoiser `name` for each of PLAN_SETTINGS: a list of rows.

    weights  float32 parameters: 4 P
    grads    float32 .grad, 4 P, plus DDP's gradient buckets (another 4 P) on 2+ GPUs
    optim    AdamW's two moments, 8 P; with --shard-optimizer on 2+ GPUs, 8 x the largest rank's share (zero_shard)
    ema      the EMA copy (the FDA teacher), 4 P
    casts    bf16 autocast's copies of the weights, 2 P (held from the forward until backward has used them)
    acts     float32 bytes kept for backward per image (count_activations, at COUNT_BATCH) x the micro-batch; bf16
             autocast stores the matmul inputs in bf16, so on a GPU they are at most this
    Not counted: the transient buffers of one op (the backward of the largest matmul, the all-reduce, the
    allocator's slack), which the GPU check's measured peak includes.
    """
    f, ch = ae
    if image_size % f:
        raise UserError(f"--image-size {image_size} is not a multiple of the autoencoder's factor {f}")
    sizes, tokens, plain, ckpt = denoiser_counts(name, image_size // f, ch)
    P = sum(sizes)
    if global_batch % gpus:
        raise UserError(f"--global-batch {global_batch} is not divisible by {gpus} GPUs")
    per_gpu = global_batch // gpus
    micro = min(micro_batch or per_gpu, per_gpu)
    rows = []
    for setting, checkpointed, sharded in PLAN_SETTINGS:
        parts = dict(weights=4 * P, grads=4 * P * (2 if gpus > 1 else 1),
                     optim=8 * (zero_shard(sizes, gpus) if sharded else P), ema=4 * P, casts=2 * P,
                     acts=(ckpt if checkpointed else plain) * micro)
        total = sum(parts.values())
        rows.append(dict(model=name, label=PLAN_MODELS.get(name, name), params=P, tokens=tokens,
                         latents=f"{ch}x{image_size // f}x{image_size // f}", gpus=gpus, per_gpu=per_gpu, micro=micro,
                         setting=setting, checkpointed=checkpointed, sharded=sharded,
                         act_per_image=ckpt if checkpointed else plain, **parts, total=total,
                         fits={c: total <= FIT_SHARE * c * GIB for c in CARDS_GIB}))
    return rows


def plan_flags(name, image_size, ae, global_batch, gpus, card):
    """The flags a run needs to fit a `card` GiB GPU: the first of PLAN_SETTINGS that fits, else both switches
    and the largest --micro-batch (a power of two) that fits; None if not even micro-batch 1 does."""
    rows = memory_plan(name, image_size, ae, global_batch, gpus)
    flags = {"plain": "", "sharded": "--shard-optimizer", "checkpointed": "--grad-checkpoint",
             "both": "--grad-checkpoint --shard-optimizer"}
    for r in rows:
        if r["fits"][card]:
            return flags[r["setting"]] or "(none)", r
    micro = rows[0]["per_gpu"]
    while micro > 1:
        micro //= 2
        r = memory_plan(name, image_size, ae, global_batch, gpus, micro)[-1]
        if r["fits"][card]:
            return f"{flags['both']} --micro-batch {micro}", r
    return None, rows[-1]


def memory_table(a):
    """bench.py --memory: the plan's table, then the flags each model needs per GPU count and card."""
    ae = parse_autoencoder(a.ae)
    models = a.models.split(",")
    gpus = [int(g) for g in a.gpus.split(",")]
    gib = lambda b: f"{b / GIB:.1f}"
    lines = [f"memory plan: Stage 2 at {a.image_size} px on an {a.ae} autoencoder, global batch {a.global_batch}, "
             f"AdamW, EMA, bf16 autocast; per GPU, GiB (2^30 bytes)",
             f"command: python bench.py {' '.join(a.argv)}",
             f"activations: bytes autograd keeps for backward (saved-tensor hooks), counted on the meta device in "
             f"float32 at batch {COUNT_BATCH} and {2 * COUNT_BATCH} (in proportion, checked), per image x the "
             f"micro-batch; flash attention's saved set; checkpointed: block inputs + outside the blocks + the "
             f"largest block (recomputed in backward). bf16 autocast stores less: an upper bound. A run fits a "
             f"card when its total is at most {100 * FIT_SHARE:.0f} % of it.", "",
             "| model | params | latents (tokens) | GPUs | batch / GPU | setting | weights | grads | optimizer | EMA | "
             "bf16 casts | activations | total | " + " | ".join(f"{c} GB" for c in CARDS_GIB) + " |",
             "|---" * (13 + len(CARDS_GIB)) + "|"]
    summary = []
    for name in models:
        for g in gpus:
            for r in memory_plan(name, a.image_size, ae, a.global_batch, g, a.micro_batch):
                lines.append(f"| {r['label']} | {r['params'] / 1e6:.0f}M | {r['latents']} ({r['tokens']}) | {g} | "
                             f"{r['per_gpu']}" + (f" ({r['micro']} micro)" if r["micro"] < r["per_gpu"] else "")
                             + f" | {r['setting']} | {gib(r['weights'])} | {gib(r['grads'])} | {gib(r['optim'])} | "
                             f"{gib(r['ema'])} | {gib(r['casts'])} | {gib(r['acts'])} | {gib(r['total'])} | "
                             + " | ".join("fits" if r["fits"][c] else "no" for c in CARDS_GIB) + " |")
            for c in CARDS_GIB:
                flags, r = plan_flags(name, a.image_size, ae, a.global_batch, g, c)
                summary.append(f"- {PLAN_MODELS.get(name, name)} on {g} x {c} GB: " + (
                    f"`{flags}` ({gib(r['total'])} GiB)" if flags else
                    f"does not fit, even with both switches at micro-batch 1 ({gib(r['total'])} GiB)"))
    return "\n".join(lines + ["", "flags each run needs (the cheapest that fits):"] + summary)


# ----------------------------------------------------------------------------- the GPU check (--gpu-check)
#
# One prepared command for a GPU lent for minutes, without network: it checks the machine, then runs each phase
# below in a process of its own with its own time budget. A phase skips what would not fit in what is left of its
# budget; one that still runs past it is stopped (its process group ended) and reported as such, with the items
# it finished (each phase rewrites OUT/phases/PHASE.json after every item). The report is OUT/gpu-check.json,
# every figure named, with the same report as text in OUT/gpu-check.txt (and on stdout).

# phase -> (budget in seconds on a GPU, budget at --smoke), run in this order. On a GPU they sum to 565 s: with the
# start-up and the checks before them (~10 s) and 5 + 5 s to end a phase that runs past its budget, the whole
# command stays under 10 minutes. The smoke budgets leave room for a CPU shared with other jobs.
# GPU sizing, estimated (no GPU has run this version): SiT-XL/1 at batch 32 took 105 ms a step eager and 75 ms
# compiled on an H100 (305 / 429 img/s), so a timed row (3 + 25 steps) takes seconds and the four eager rows with
# start-up about 30 s; compiling an XL model (forward and backward) is estimated at 1-2 minutes, which leaves
# room for the two XL/1 compiled rows; a tiny model compiles in an estimated 20-30 s.
# The memory phase builds the largest denoiser that fits (USiT-2B/1 on an 80 GB card: ~15 s) and times
# 2 x 3 steps at batch 32 (~1 s each, estimated from its FLOPs).
CHECK_PHASES = {"equivalence": (95, 90), "train-resume": (120, 150), "throughput": (225, 60),
                "cache-encode": (30, 60), "study": (50, 90), "memory": (45, 30)}
CHECK_PACKAGES = ("numpy", "scipy", "PIL", "tqdm", "torchvision", "diffusers", "cleanfid")
TARGET_IMG_S = 800           # SiT-XL/1 at 256 tokens, bf16, one H100 (LightningDiT publishes about 660 per GPU)
# Tolerances of the equivalence check, relative to the float32 eager step: |loss - loss_ref| / |loss_ref| and
# ||grad - grad_ref|| / ||grad_ref|| over all parameters. bf16 keeps 8 mantissa bits (2^-8 = 0.4 % per rounding).
CHECK_TOL = {"float32": (1e-4, 1e-3), "bf16": (2e-2, 6e-2)}
# Sizes. equiv: (model, name, latent side, channels, batch); throughput: (name, latent side, channels, batch),
# SiT-XL/1 on 16x16x32 (f16d32 at 256 px) and SiT-XL/2 on 32x32x4 (f8 at 256 px): 256 tokens each.
# cache: (JPEGs, width, height, side, autoencoder stand-in); study: the study.py setting, steps per command.
CHECK_SIZES = {
    "gpu": dict(equiv=[("SiT", "tiny/1", 16, 32, 8), ("U-ViT", "tiny/1", 16, 32, 8)],
                throughput=[("XL/1", 16, 32, 32), ("XL/2", 32, 4, 32)], warmup=3, repeats=5, iters=5,
                cache=(256, 500, 375, 256, "SD-VAE"), workers=8, study="gpu", study_steps=30,
                memory=dict(models=list(PLAN_MODELS), side=16, ch=32, batch=32, steps=3)),
    "smoke": dict(equiv=[("SiT", "smoke/1", 8, 4, 4), ("U-ViT", "smoke/1", 8, 4, 4)],
                  throughput=[("smoke/1", 8, 4, 4), ("smoke/2", 16, 4, 4)], warmup=1, repeats=2, iters=2,
                  cache=(8, 40, 30, 32, "tiny"), workers=0, study="smoke", study_steps=3,
                  memory=dict(models=["uvit-smoke/1", "smoke/1"], side=8, ch=4, batch=4, steps=2)),
}
HERE = os.path.dirname(os.path.abspath(__file__))
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def pick_device(a):
    if a.device:
        return check_device(a.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def preflight(a, dev):
    """The machine, checked before any phase starts: one line naming the first thing missing."""
    if dev.type != "cuda" and not a.smoke:
        raise UserError("--gpu-check needs a CUDA GPU, and torch sees none here; add --smoke for the CPU size")
    missing = []
    for m in CHECK_PACKAGES + (("triton",) if dev.type == "cuda" else ()):   # triton: torch.compile on CUDA
        try:
            importlib.import_module(m)
        except Exception as e:                      # noqa: BLE001 - any import failure is the answer
            missing.append(f"{m} ({type(e).__name__})")
    if missing:
        raise UserError(f"--gpu-check: these packages do not import: {', '.join(missing)}; "
                        f"pip install -r requirements.txt")
    if dev.type == "cuda":          # triton builds a small C launcher per kernel: a C compiler and Python.h
        import sysconfig
        if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
            raise UserError("--gpu-check: torch.compile (triton) needs a C compiler (cc, gcc or clang; or set CC)")
        if not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
            raise UserError("--gpu-check: torch.compile (triton) needs Python's headers (Python.h; python3-dev)")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_available() or not getattr(dist, f"is_{backend}_available")():
        raise UserError(f"--gpu-check: this torch has no torch.distributed {backend} backend (torchrun needs it)")
    os.makedirs(a.out, exist_ok=True)
    free = shutil.disk_usage(a.out).free / 2 ** 30
    if free < 2:
        raise UserError(f"--gpu-check: only {free:.1f} GiB free under {a.out}; the check needs 2 GiB")
    m = dict(device=str(dev), torch=torch.__version__, python=platform.python_version(), cpus=os.cpu_count(),
             dist_backend=backend, compile_backend="inductor" if dev.type == "cuda" else "aot_eager",
             c_compiler=shutil.which("gcc") or shutil.which("cc"))
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        m.update(name=p.name, capability=f"sm_{p.major}{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1),
                 cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), peak_flops=gpu_peak(dev))
    else:
        m.update(name=platform.processor() or platform.machine(), peak_flops=None)
    return m


class Phase:
    """One phase's record and clock; the record is rewritten atomically after every item and check."""

    def __init__(self, a, name, dev):
        self.name, self.dev, self.a = name, dev, a
        self.budget = CHECK_PHASES[name][a.smoke] * a.budget_scale
        self.t0 = time.time()
        self.sizes = CHECK_SIZES["smoke" if a.smoke else "gpu"]
        self.work = os.path.join(a.out, "work")
        self.path = os.path.join(a.out, "phases", f"{name}.json")
        self.rec = dict(phase=name, items=[], checks=[], notes=[])
        self.save()

    def left(self):
        return self.budget - (time.time() - self.t0)

    def fits(self, what, need):
        """Whether `what` (about `need` s) fits in what is left of the budget; a note when it does not."""
        if self.left() >= need:
            return True
        self.note(f"skipped {what}: {max(0, self.left()):.0f} s left of the phase budget, it needs about {need:.0f} s")
        self.rec.setdefault("skipped", []).append(what)            # a check not run: the report is incomplete
        self.save()
        return False

    def item(self, **kw):
        self.rec["items"].append(kw)
        self.save()

    def check(self, name, ok, detail):
        self.rec["checks"].append(dict(name=name, ok=bool(ok), detail=detail))
        print(f"[{'ok' if ok else 'FAILED'}] {name}: {detail}", flush=True)
        self.save()

    def note(self, text):
        self.rec["notes"].append(text)
        print(f"note: {text}", flush=True)
        self.save()

    def save(self):
        write_json(self.path, self.rec)

    def run(self, args, torchrun=False, what=None):
        """A project command (`python SCRIPT ...`, or under torchrun with one process), its output streamed to
        OUT/phases/PHASE.log (kept up to where it was, should the phase be stopped); a failure is a failed
        check. Returns (ok, seconds, the command as shown)."""
        cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
                                  if torchrun else []) + [str(x) for x in args]
        shown = ("torchrun --standalone --nproc_per_node=1 " if torchrun else "python ") + " ".join(map(str, args))
        print(f"$ {shown}", flush=True)
        t0 = time.time()
        log = os.path.join(self.a.out, "phases", f"{self.name}.log")
        with open(log, "a") as f:
            rc = subprocess.run(cmd, cwd=HERE, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **OFFLINE)).returncode
        if rc != 0:
            self.check(what or shown, False, f"exit {rc}: {last_line(log)}")
        return rc == 0, time.time() - t0, shown


def device_flags(dev):
    return ["--device", "cpu"] if dev.type == "cpu" else []


# ---- phase 1: one training step in float32, bf16 autocast and compiled

def one_step(model_name, name, side, ch, batch, dev, bf16, backend=None):
    """One Stage-2 step of a freshly seeded model: (loss, flat gradient on the CPU, largest AdamW update).

    The weights are moved off their zero init (adaLN-Zero, zero output layer) so that every path carries
    gradient; the inputs are drawn on the CPU from fixed seeds, so every variant sees the same numbers."""
    torch.manual_seed(0)
    with dev:
        net = STAGE2[model_name](name, side, ch, 1000)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(dev))
    student = td.Student(net, None)
    model = torch.compile(student, backend=backend) if backend else student
    z, eps = (torch.randn(batch, ch, side, side, generator=g).to(dev) for _ in range(2))
    t, y = torch.rand(batch, generator=g).to(dev), torch.randint(0, 1000, (batch,), generator=g).to(dev)
    args = types.SimpleNamespace(denoise_level=0, fda=False)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):   # on CUDA: common.autocast
        loss, _ = td.diffusion_loss(model, None, z, y, t, eps, args, 0)  # Eq. 5 at level 0: velocity MSE
    loss.backward()
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten()
                      for p in net.parameters()]).cpu()
    before = [p.detach().clone() for p in net.parameters()]
    adamw(net.parameters(), dev, lr=1e-3, weight_decay=0.0).step()      # fused on CUDA
    move = max((p.detach() - q).abs().max().item() for p, q in zip(net.parameters(), before))
    return loss.item(), grad, move


def phase_equivalence(ph):
    dev, cuda = ph.dev, ph.dev.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # a float32 reference
    backend = "inductor" if cuda else "aot_eager"
    cdtype = "bf16" if cuda else "float32"
    if not cuda:
        ph.note("compiled step on CPU: torch.compile with backend aot_eager (TorchDynamo graph capture and "
                "AOTAutograd, no generated code); inductor's code generation runs on the GPU only")
    need = 45 if cuda else 5                       # seconds, until the first model is measured
    for model_name, name, side, ch, batch in ph.sizes["equiv"]:
        label = f"{model_name}-{name} on {side}x{side}x{ch}, batch {batch}"
        if not ph.fits(label, need):
            continue
        t_model = time.time()
        ref = one_step(model_name, name, side, ch, batch, dev, False)
        variants = [("bf16 autocast", "bf16", dict(bf16=True)),
                    (f"compiled ({backend}, {cdtype})", cdtype, dict(bf16=cuda, backend=backend))]
        for what, kind, kw in variants:
            t0 = time.time()
            loss, grad, move = one_step(model_name, name, side, ch, batch, dev, **kw)
            tl, tg = CHECK_TOL[kind]
            el = abs(loss - ref[0]) / abs(ref[0])
            eg = ((grad - ref[1]).norm() / ref[1].norm()).item()
            ph.item(model=label, variant=what, loss=loss, loss_float32=ref[0], loss_rel_err=el, grad_rel_err=eg,
                    tol_loss=tl, tol_grad=tg, adamw_max_update=move, seconds=time.time() - t0)
            ok = el <= tl and eg <= tg and math.isfinite(loss) and 0 < move <= 1e-3 * 1.01
            ph.check(f"{label}: {what} vs float32 eager", ok,
                     f"loss {loss:.6f} vs {ref[0]:.6f} (rel err {el:.1e}, tol {tl:.0e}); gradient rel err {eg:.1e} "
                     f"(tol {tg:.0e}); first AdamW update max {move:.2e} (<= lr 1e-3)")
        need = 1.2 * (time.time() - t_model)


# ---- phase 2: FreqWarm + FDA smoke run under torchrun, resumed; sampling to an npz

def checkpoint_tensors(ck):
    """(name, tensor) of the trained state of a Stage-2 checkpoint: model, EMA and optimizer."""
    out = [(f"model.{k}", v) for k, v in ck["model"].items()] + [(f"ema.{k}", v) for k, v in ck["ema"].items()]
    for i, st in ck["opt"]["state"].items():
        out += [(f"opt.{i}.{k}", v) for k, v in st.items() if isinstance(v, torch.Tensor)]
    return out


def same_run(dir_a, dir_b):
    """(equal, what differs): losses of every step and every tensor of the final checkpoints, bit for bit."""
    la, lb = ([r for r in read_jsonl(os.path.join(d, "metrics.jsonl")) if "loss" in r] for d in (dir_a, dir_b))
    if [r["loss"] for r in la] != [r["loss"] for r in lb]:
        return False, f"losses {[r['loss'] for r in la]} vs {[r['loss'] for r in lb]}"
    ta, tb = (checkpoint_tensors(load_checkpoint(os.path.join(d, "last.pt"), "sit")) for d in (dir_a, dir_b))
    if [k for k, _ in ta] != [k for k, _ in tb]:
        return False, "the checkpoints hold different tensors"
    diff = [(k, (x.double() - y.double()).abs().max().item()) for (k, x), (_, y) in zip(ta, tb) if not torch.equal(x, y)]
    if diff:
        k, m = max(diff, key=lambda kv: kv[1])
        return False, f"{len(diff)} of {len(ta)} tensors differ (largest: {k}, {m:.2e})"
    return True, f"{len(la)} losses and all {len(ta)} tensors (model, EMA, optimizer) equal"


def probe_backend(ph, backend):
    """init_process_group + all_reduce + broadcast with one process: the collective backend itself runs."""
    store = os.path.join(ph.work, "pg-store")
    try:
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
        x = torch.arange(4.0, device=ph.dev)
        dist.all_reduce(x)
        dist.broadcast(x, 0)
        ok = torch.equal(x.cpu(), torch.arange(4.0))
        return ok, f"init_process_group, all_reduce and broadcast of a 4-vector on {ph.dev}: {'equal' if ok else 'changed'}"
    except Exception as e:                          # noqa: BLE001 - reported as a failed check, the phase goes on
        return False, f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def phase_train_resume(ph):
    dev, cuda, w = ph.dev, ph.dev.type == "cuda", ph.work
    backend = "nccl" if cuda else "gloo"
    os.makedirs(w, exist_ok=True)
    ph.check(f"{backend} process group, 1 process", *probe_backend(ph, backend))
    ok, sec, _ = ph.run(["train_vae.py", "--preset", "smoke", "--out", f"{w}/vae", "--gan-weight", "0", "--steps", "3",
                         "--val-every", "0", *device_flags(dev)], what="smoke VAE for the Stage-2 run")
    if not ok:
        return
    flags = ["train_diffusion.py", "--preset", "smoke", "--vae", f"{w}/vae/last.pt", "--freqwarm", "--r0", "0.2",
             "--warmup-steps", "2", "--fda", "--cache-latents", "--val-every", "0", "--sample-every", "100",
             *device_flags(dev), *(["--compile"] if cuda else [])]
    if not cuda:
        ph.note("the torchrun run on CPU runs eager float32 (the trainers' CPU path); on a GPU it adds --compile")
    ph.note(f"under torchrun with 1 process the trainer runs without DDP (a process group is made only for 2+ "
            f"ranks); the {backend} check above runs the backend itself")
    runs = [("uninterrupted, 4 steps", "run-a", 4), ("first 2 steps", "run-b", 2), ("resumed to 4 steps", "run-b", 4)]
    for what, d, steps in runs:
        ok, sec, shown = ph.run(flags + ["--steps", steps, "--out", f"{w}/{d}"], torchrun=True,
                                what=f"FreqWarm + FDA + --cache-latents under torchrun: {what}")
        ph.item(run=what, command=shown, seconds=sec, ok=ok)
        if not ok:
            return
    phases = [r.get("phase") for r in read_jsonl(f"{w}/run-b/metrics.jsonl") if "loss" in r]
    ph.check("resumed run's FreqWarm phases", phases == ["warmup", "warmup", "full", "full"], f"per step: {phases}")
    equal, detail = same_run(f"{w}/run-a", f"{w}/run-b")
    ph.check("resume is bit-exact (run of 2 + 2 steps == run of 4 steps)", equal, detail)
    if not equal and ph.fits("control run", 30):    # is it the resume, or are the kernels not deterministic?
        done = ph.run(flags + ["--steps", 4, "--out", f"{w}/run-c"], torchrun=True, what="control: a second 4-step run")[0]
        same, d2 = same_run(f"{w}/run-a", f"{w}/run-c") if done else (False, "the control run failed")
        ph.note(f"control, two uninterrupted 4-step runs: {'equal' if same else 'differ too: ' + d2} (if they "
                f"differ, the kernels are not deterministic here and resume cannot be bit-exact)")
    n = 8
    ok, sec, shown = ph.run(["evaluate.py", "sample", "--ckpt", f"{w}/run-a/last.pt", "--num-samples", n, "--batch", 4,
                             "--sample-steps", 3, "--sampler", "euler", "--out", f"{w}/samples", *device_flags(dev)],
                            what="evaluate.py sample")
    ph.item(run="evaluate.py sample", command=shown, seconds=sec, ok=ok)
    if ok:
        from PIL import Image
        ck = load_checkpoint(f"{w}/run-a/last.pt", "sit")
        with np.load(f"{w}/samples.npz") as f:
            arr = f["arr_0"]
        side = ck["config"]["image_size"]
        first = np.asarray(Image.open(f"{w}/samples/000000.png").convert("RGB"))
        good = (arr.dtype == np.uint8 and arr.shape == (n, side, side, 3) and np.array_equal(arr[0], first)
                and arr.std() > 0)
        ph.check("evaluate.py sample wrote a valid npz", good,
                 f"arr_0 {arr.dtype} {tuple(arr.shape)} (want uint8 ({n}, {side}, {side}, 3)), image 0 equal to "
                 f"000000.png: {np.array_equal(arr[0], first)}, pixel std {arr.std():.1f}")


# ---- phase 3: throughput of SiT-XL/1 and SiT-XL/2 at 256 tokens, ours and the official SiT

def profile_step(step, dev, n=3):
    """Where one step's time goes: on CUDA the 8 costliest GPU kernels and how busy the GPU was over the profiled
    wall time (well below 100 %: the host, not the GPU, limits the step); on CPU the 8 costliest ops."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(dev)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync(dev)
    wall = time.perf_counter() - t0
    if cuda:      # kernels only: an op's device time is its kernels' again
        ev = [(e.key, e.self_device_time_total) for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    else:
        ev = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    ev = [(k, us) for k, us in ev if us > 0]
    total = sum(us for _, us in ev) or 1e-9
    top = sorted(ev, key=lambda kv: kv[1], reverse=True)[:8]
    return dict(clock="GPU kernel" if cuda else "CPU op", wall_ms_per_step=wall / n * 1e3,
                busy=total / 1e6 / wall if cuda else None,
                top=[dict(op=k[:80], ms_per_step=us / 1e3 / n, share=us / total) for k, us in top])


def throughput_row(ph, name, side, ch, batch, mode, who, flops):
    """Time one step of ours or the official SiT (a Bench row); FLOPs counted on the eager step and reused for
    the compiled one. Returns (row, configuration, profile or None); the models go with this frame."""
    dev, s, cuda = ph.dev, ph.sizes, ph.dev.type == "cuda"
    ns = types.SimpleNamespace(compile=mode == "compiled", no_bf16=False, warmup=s["warmup"], repeats=s["repeats"],
                               iters=s["iters"])
    b = Bench(ns, dev, tmp=ph.work, backend="inductor" if cuda else "aot_eager")
    b.cfg = {"dit": (name, side, ch, batch)}
    loop = None
    try:
        if who == "ours":
            step, images, _, config, _, loop = stage2_step(b, "SiT", STAGE2["SiT"])
        else:
            step, images, _, config = official_step(b)
        known = flops.get((who, name))
        r = b.measure(f"{who} SiT-{name} {mode}", config, step, images,
                      flops_fn=step if known is None and mode == "eager" else None,
                      flops=known * images if known else None)
        if r["gflop_img"]:
            flops[(who, name)] = r["gflop_img"] * 1e9
        prof = None
        if (who == "ours" and name == s["throughput"][0][0] and mode == ("compiled" if cuda else "eager")
                and (not cuda or r["img_s"] < TARGET_IMG_S) and ph.left() > 20):
            prof = profile_step(step, dev)
        return r, config, prof
    finally:
        if loop is not None:
            loop.close()


def phase_throughput(ph):
    cuda, s = ph.dev.type == "cuda", ph.sizes
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # as the trainers set it
    modes = ["eager", "compiled"] if cuda else ["eager"]
    if not cuda:
        ph.note("compiled rows: not run on CPU (inductor on CPU compiles C++ for minutes; the equivalence phase "
                "runs the compiled step); CPU rows time the smoke sizes only")
    need = {"eager": 30 if cuda else 3, "compiled": 150}       # seconds, until one item of the kind is measured
    flops = {}
    os.makedirs(ph.work, exist_ok=True)
    for mode in modes:                             # every eager row first: compiling is what may not fit
        for name, side, ch, batch in s["throughput"]:
            for who in ("ours", "official"):
                label = f"{who} SiT-{name} {mode}"
                if not ph.fits(label, need[mode]):
                    continue
                t0 = time.time()
                try:
                    r, config, prof = throughput_row(ph, name, side, ch, batch, mode, who, flops)
                except torch.OutOfMemoryError as e:
                    ph.note(f"{label}: out of memory at batch {batch} ({str(e)[:120]})")
                    continue
                finally:
                    torch._dynamo.reset()                  # drop compiled graphs (and the models they hold)
                    if cuda:
                        torch.cuda.empty_cache()
                need[mode] = 1.2 * (time.time() - t0)
                ph.item(model=f"SiT-{name}", who=who, mode=mode, dtype="bf16 autocast" if cuda else "float32",
                        batch=batch, tokens=(side // int(name.split("/")[1])) ** 2, latents=f"{side}x{side}x{ch}",
                        config=config, img_s=r["img_s"], step_ms=r["step_ms"], spread_ms=[r["lo_ms"], r["hi_ms"]],
                        gflop_img=r["gflop_img"], tflop_s=r["tflop_s"], mfu=r["mfu"], mem_mib=r["mem_mib"],
                        mem_kind=r["mem_kind"], seconds=time.time() - t0, profile=prof)


# ---- phase 4: latent-cache encoding with a diffusers autoencoder stand-in

def standin_autoencoder(kind):
    """A randomly initialised diffusers AutoencoderKL: the SD-VAE architecture (f8, 4 channels, 84M parameters)
    or a tiny one for the smoke size. Its latents mean nothing; its encoding speed is that of the architecture."""
    import diffusers
    torch.manual_seed(0)
    if kind == "SD-VAE":
        return diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                       down_block_types=("DownEncoderBlock2D",) * 4,
                                       up_block_types=("UpDecoderBlock2D",) * 4)
    return diffusers.AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4)


def phase_cache_encode(ph):
    dev, (n, w, h, res, kind), workers = ph.dev, ph.sizes["cache"], ph.sizes["workers"]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    folder, ae_dir = os.path.join(ph.work, "jpegs"), os.path.join(ph.work, "ae-standin")
    make_jpegs(folder, n, w, h)
    standin_autoencoder(kind).save_pretrained(ae_dir)
    spec = "diffusers:" + ae_dir
    ae = load_autoencoder(spec, dev)                    # the path a run takes with --vae diffusers:FOLDER
    ds = ImageFolder(folder, res)
    args = td.get_args(["--out", ph.work, "--image-size", str(res), "--workers", str(workers), "--vae", spec])
    encode = cache_encoder(ae, ds, args, dev, os.path.join(ph.work, "cache"))
    ns = types.SimpleNamespace(compile=False, no_bf16=False, warmup=1, repeats=2, iters=1)
    b = Bench(ns, dev, tmp=ph.work)
    label = (f"diffusers AutoencoderKL STAND-IN ({kind} architecture, random weights), {n} JPEGs {w}x{h} -> "
             f"{res} px, both flips ({2 * n} latents {ae.latent_dim}x{res // ae.downsample}x{res // ae.downsample}), "
             f"float32 encode, {workers} workers")
    r = b.measure("cache-encode", label, encode, 2 * n)
    ph.item(what=label, latents_per_s=r["img_s"], seconds_per_cache=r["step_ms"] / 1e3, mem_mib=r["mem_mib"],
            mem_kind=r["mem_kind"])


# ---- phase 5: the study's setting, each of its training commands for a few steps

def phase_study(ph):
    dev, setting, steps = ph.dev, ph.sizes["study"], ph.sizes["study_steps"]
    s, w = study.SETTINGS[setting], ph.work
    short = ["--steps", steps, "--log-every", max(1, steps // 2), "--ckpt-every", steps, "--val-every", 0,
             "--sample-every", 10 ** 6, "--n-images", 1000 if setting == "gpu" else 64, *device_flags(dev)]
    cmds = [("VAE", "train_vae.py", train_vae.get_args, [*s["vae"], *short, "--stats-images", 256, "--out", f"{w}/study-vae"]),
            ("SiT", "train_diffusion.py", td.get_args,
             [*s["sit"], *short, "--vae", f"{w}/study-vae/last.pt", "--out", f"{w}/study-sit"])]
    for what, script, parse, args in cmds:
        full = parse([str(x) for x in s["vae" if what == "VAE" else "sit"]])
        if not ph.fits(f"the study's {what} command", 5):
            continue
        ok, sec, shown = ph.run([script, *args], what=f"study setting {setting}: {what} command")
        if not ok:
            continue
        lines = [r for r in read_jsonl(os.path.join(args[args.index("--out") + 1], "metrics.jsonl")) if "loss" in r]
        rate = lines[-1]["img_per_s"]                    # the last window: after start-up and compilation
        ph.item(setting=setting, model=what, command=shown, seconds=sec, img_s=rate, batch=full.global_batch,
                steps_in_study=full.steps, minutes_per_study_run=full.steps * full.global_batch / rate / 60)


# ---- phase 6: the memory plan measured: a few steps of the largest paper denoiser that fits one GPU

def memory_steps(name, side, ch, batch, dev, checkpointed, steps):
    """Peak memory (PeakMemory: MiB, kind) of `steps` Stage-2 steps as the trainer takes them on one GPU: bf16
    autocast, the velocity loss (Eq. 5), backward, clipping, AdamW (fused on CUDA), the EMA update; and the
    last loss."""
    mem = PeakMemory(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    mem.reset()
    torch.manual_seed(0)
    with dev:
        net = build_denoiser(name, side, ch, 1000)
    net.grad_checkpoint = checkpointed
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = adamw(net.parameters(), dev, lr=1e-4)
    student, args = td.Student(net, None), types.SimpleNamespace(denoise_level=0, fda=False)
    for _ in range(steps):
        z, eps = torch.randn(batch, ch, side, side, device=dev), torch.randn(batch, ch, side, side, device=dev)
        t, y = torch.rand(batch, device=dev), torch.randint(0, 1000, (batch,), device=dev)
        with autocast(dev):
            loss, _ = td.diffusion_loss(student, None, z, y, t, eps, args, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step(), opt.zero_grad(set_to_none=True)
        ema_update(ema, net, 0.9999)
    sync(dev)
    return mem.read(), mem.kind, loss.item()


def phase_memory(ph):
    dev, cuda, s = ph.dev, ph.dev.type == "cuda", ph.sizes["memory"]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    card = torch.cuda.get_device_properties(dev).total_memory if cuda else None
    ph.note("--shard-optimizer splits the AdamW state over 2+ ranks only: on one GPU the plan's sharded rows equal "
            "its plain ones and these steps run plain AdamW; the plan's figures here are for 1 GPU (no DDP buckets)")
    if not cuda:
        ph.note("on CPU the peak is the process's resident set (libraries included), not comparable with the plan: "
                "the comparison is made on a GPU (CUDA max_memory_allocated)")
    plans = {name: memory_plan(name, s["side"], (1, s["ch"]), s["batch"], 1) for name in s["models"]}
    fitting = [n for n in s["models"] if card is None or plans[n][2]["total"] <= FIT_SHARE * card]   # checkpointed
    if not fitting:
        ph.check("a paper denoiser fits this GPU", False, f"none of {s['models']} fits {card / GIB:.0f} GiB with "
                                                          f"--grad-checkpoint at batch {s['batch']}")
        return
    name = max(fitting, key=lambda n: plans[n][0]["params"])
    for row in plans[name]:
        if row["sharded"] or (card is not None and row["total"] > FIT_SHARE * card):
            continue
        label = f"{row['label']} on {row['latents']}, batch {s['batch']}, {row['setting']}"
        if not ph.fits(label, 15 if cuda else 5):
            continue
        t0 = time.time()
        try:
            mib, kind, loss = memory_steps(name, s["side"], s["ch"], s["batch"], dev, row["checkpointed"], s["steps"])
        except torch.OutOfMemoryError as e:
            ph.check(f"{label}: the plan's {row['total'] / GIB:.1f} GiB fits", False, f"out of memory: {str(e)[:160]}")
            continue
        peak = mib * 2 ** 20
        ph.item(model=row["label"], setting=row["setting"], batch=s["batch"], latents=row["latents"], peak=peak,
                peak_kind=kind, plan=row["total"], plan_terms=row, seconds=time.time() - t0, loss=loss)
        ok = math.isfinite(loss) and (not cuda or peak <= row["total"] / FIT_SHARE)
        ph.check(f"{label}: {s['steps']} steps", ok, f"measured peak {size_text(peak)} ({kind}) beside the plan's "
                 f"{size_text(row['total'])}" + (f" (ratio {peak / row['total']:.2f}; the plan plus its "
                                                 f"{100 - 100 * FIT_SHARE:.0f} % reserve must cover it)" if cuda else "")
                 + f"; loss {loss:.4f}")


def size_text(b):
    return f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2 ** 20:.1f} MiB"


PHASE_FNS = {"equivalence": phase_equivalence, "train-resume": phase_train_resume, "throughput": phase_throughput,
             "cache-encode": phase_cache_encode, "study": phase_study, "memory": phase_memory}


def run_phase(a):
    dev = pick_device(a)
    ph = Phase(a, a.gpu_check_phase, dev)
    PHASE_FNS[a.gpu_check_phase](ph)


def stop_group(p):
    """End a phase's process group (the phase, its torchrun and trainers): SIGTERM (a trainer saves and stops),
    then SIGKILL to whatever is left after 5 s. Returns whether the whole group has ended."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return True
        t0 = time.time()
        while time.time() - t0 < 5:
            time.sleep(0.1)
            if p.poll() is None:                   # the phase itself first (reaped here), then its children
                continue
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                return True
    return False


def gpu_check(a, argv):
    t_start = time.time()
    dev = pick_device(a)
    phases = a.phases.split(",")
    unknown = set(phases) - set(CHECK_PHASES)
    if unknown:
        raise UserError(f"--phases: unknown {sorted(unknown)}; use a subset of {','.join(CHECK_PHASES)}")
    machine = preflight(a, dev)
    ours = {"gpu-check.json", "gpu-check.txt", "phases", "work"}
    other = sorted(set(os.listdir(a.out)) - ours)
    if other:                                               # only a check's own folder is cleared and reused
        raise UserError(f"--out {a.out} holds files that are not a GPU check's ({', '.join(other[:3])}); "
                        f"use an empty or new folder")
    for f in ("gpu-check.json", "gpu-check.txt"):          # a rerun leaves nothing of an earlier one
        if os.path.exists(os.path.join(a.out, f)):
            os.remove(os.path.join(a.out, f))
    for d in ("phases", "work"):
        shutil.rmtree(os.path.join(a.out, d), ignore_errors=True)
    os.makedirs(os.path.join(a.out, "phases"))
    results = {}
    for name in [p for p in CHECK_PHASES if p in phases]:
        budget = CHECK_PHASES[name][a.smoke] * a.budget_scale
        cmd = [sys.executable, os.path.abspath(__file__), "--gpu-check-phase", name, "--out", a.out,
               "--budget-scale", str(a.budget_scale)] + ["--smoke"] * a.smoke + (["--device", a.device] if a.device else [])
        print(f"phase {name} (budget {budget:.0f} s) ...", file=sys.stderr, flush=True)
        t0 = time.time()
        log = os.path.join(a.out, "phases", f"{name}.log")
        with open(log, "a") as f:
            p = subprocess.Popen(cmd, cwd=HERE, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                 env=dict(os.environ, **OFFLINE))
            try:
                rc = p.wait(timeout=budget)
                status = "done" if rc == 0 else f"failed (exit {rc}): {last_line(log)}"
            except subprocess.TimeoutExpired:
                status = f"stopped at its budget of {budget:.0f} s" + ("" if stop_group(p) else
                                                                         " (some of its processes did not end)")
        path = os.path.join(a.out, "phases", f"{name}.json")
        rec = json.load(open(path)) if os.path.isfile(path) else dict(phase=name, items=[], checks=[], notes=[])
        rec.update(status=status, seconds=round(time.time() - t0, 1), budget_s=budget, pid=p.pid)
        results[name] = rec
    report = assemble(a, argv, machine, results, time.time() - t_start)
    write_json(os.path.join(a.out, "gpu-check.json"), report)
    with atomic_write(os.path.join(a.out, "gpu-check.txt"), text=True) as f:
        f.write("\n".join(report["text"]) + "\n")
    print("\n".join(report["text"]))
    if report["verdict"] != "PASS":
        raise UserError(f"gpu-check {report['verdict']}: {report['why']}; see {os.path.join(a.out, 'gpu-check.txt')}")


def last_line(path):
    lines = [l for l in open(path).read().splitlines() if l.strip()]
    return lines[-1][-300:] if lines else ""


def fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def assemble(a, argv, m, results, total):
    """The report: verdict, machine, every phase's checks, tables and notes, as json and as text."""
    failed = [f"{n}: {c['name']}" for n, r in results.items() for c in r["checks"] if not c["ok"]]
    failed += [f"{n} {r['status']}" for n, r in results.items() if r["status"].startswith("failed")]
    stopped = [f"{n} {r['status']}" for n, r in results.items() if r["status"].startswith("stopped")]
    stopped += [f"{n}: skipped {w}" for n, r in results.items() for w in r.get("skipped", [])]
    verdict = "FAIL" if failed else "INCOMPLETE" if stopped else "PASS"
    bound = sum(CHECK_PHASES[n][a.smoke] * a.budget_scale for n in results)
    peak = m["peak_flops"]
    peak_line = (f"MFU = counted FLOP/s over a dense bf16 peak of {peak / 1e12:.0f} TFLOP/s assumed for {m['name']} "
                 f"(datasheet)" if peak else f"MFU: none (no peak FLOP/s is known for {m['name']})")
    text = [f"FreqLDM GPU check: {verdict}" + (f" ({'; '.join(failed or stopped)})" if verdict != "PASS" else ""),
            f"command: python bench.py {' '.join(argv)}",
            f"machine: {m['device']} ({m['name']}" + (f", {m['capability']}, {m['memory_gib']} GiB, CUDA {m['cuda']}, "
                                                        f"cuDNN {m['cudnn']}" if 'cuda' in m else "")
            + f"), {m['cpus']} CPUs; torch {m['torch']}, Python {m['python']}; collectives {m['dist_backend']}; "
              f"torch.compile backend {m['compile_backend']}",
            peak_line, f"time: {total:.0f} s in all; the phases' budgets sum to {bound:.0f} s", ""]
    ratios, target = [], None
    for name, r in results.items():
        text.append(f"## {name}: {r['status']} ({r['seconds']:.0f} s used of its {r['budget_s']:.0f} s budget)")
        text += [f"- [{'ok' if c['ok'] else 'FAILED'}] {c['name']}: {c['detail']}" for c in r["checks"]]
        if name == "throughput" and r["items"]:
            text += ["", "| model | who | mode | dtype | batch | tokens | img/s | step ms (median) | GFLOP/img | "
                         "TFLOP/s | MFU | peak mem MiB |", "|---" * 12 + "|"]
            for i in r["items"]:
                text.append(f"| {i['model']} on {i['latents']} | {i['who']} | {i['mode']} | {i['dtype']} | {i['batch']} "
                            f"| {i['tokens']} | {i['img_s']:.1f} | {i['step_ms']:.1f} | {fmt(i['gflop_img'], '.3g')} "
                            f"| {fmt(i['tflop_s'], '.3g')} | {'-' if i['mfu'] is None else format(100 * i['mfu'], '.1f') + ' %'} "
                            f"| {i['mem_mib']:.0f} ({i['mem_kind']}) |")
            by = {(i["model"], i["mode"], i["who"]): i for i in r["items"]}
            for (model, mode, who), i in by.items():
                ref = by.get((model, mode, "official"))
                if who == "ours" and ref:
                    ratios.append(dict(model=model, mode=mode, ours_over_official=i["img_s"] / ref["img_s"]))
            text += [""] + [f"- img/s ours / official SiT, {x['model']} {x['mode']}: {x['ours_over_official']:.3f}"
                            for x in ratios]
            first = CHECK_SIZES["gpu"]["throughput"][0][0]
            best = max((i for i in r["items"] if i["who"] == "ours" and i["model"] == f"SiT-{first}"
                        and "cuda" in m["device"]), key=lambda i: i["img_s"], default=None)
            target = dict(img_s=TARGET_IMG_S, model=f"SiT-{first}", measured=best and best["img_s"],
                          met=None if best is None else best["img_s"] >= TARGET_IMG_S)
            text.append(f"- target {TARGET_IMG_S} img/s for SiT-{first} at 256 tokens in bf16 on one GPU: " + (
                "not measured (no GPU row of it here)" if best is None else
                f"{'met' if target['met'] else 'missed'} ({best['img_s']:.0f} img/s, {best['mode']})"))
            for i in r["items"]:
                if i.get("profile"):
                    pr = i["profile"]
                    text.append(f"- profile of {i['who']} {i['model']} {i['mode']}: {pr['wall_ms_per_step']:.1f} ms "
                                f"per step" + (f", device busy {100 * pr['busy']:.0f} % of it" if pr["busy"] else "")
                                + f"; the costliest by own time ({pr['clock']}): " + ", ".join(
                                    f"{t['op']} {t['ms_per_step']:.2f} ms ({100 * t['share']:.0f} %)" for t in pr["top"][:6]))
        if name == "cache-encode":
            text += [f"- {i['what']}: {i['latents_per_s']:.1f} latents/s ({i['seconds_per_cache']:.2f} s per cache), "
                     f"peak mem {i['mem_mib']:.0f} MiB ({i['mem_kind']})" for i in r["items"]]
        if name == "study":
            text += [f"- study setting {i['setting']}, {i['model']}: {i['img_s']:.1f} img/s at batch {i['batch']} "
                     f"(last metrics window of `{i['command']}`); its {i['steps_in_study']} steps take about "
                     f"{i['minutes_per_study_run']:.3g} min per run at that rate" for i in r["items"]]
        if name == "memory":
            text += [f"- {i['model']} on {i['latents']}, batch {i['batch']}, {i['setting']}: measured peak "
                     f"{size_text(i['peak'])} ({i['peak_kind']}), plan {size_text(i['plan'])}" for i in r["items"]]
        if name == "train-resume":
            text += [f"- {i['run']}: {'ok' if i['ok'] else 'FAILED'} in {i['seconds']:.0f} s: `{i['command']}`"
                     for i in r["items"]]
        text += [f"- note: {n}" for n in r["notes"]] + [""]
    why = "; ".join(failed or stopped)
    return dict(verdict=verdict, why=why, command=f"python bench.py {' '.join(argv)}", machine=m, seconds=total,
                budget_bound_s=bound, tolerances=CHECK_TOL, ratios_ours_over_official=ratios, target=target,
                phases=results, text=text)


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
    p.add_argument("--gpu-check", action="store_true",
                   help="the GPU check instead of the table: correctness, throughput, cache, study (one GPU, < 10 min)")
    p.add_argument("--smoke", action="store_true", help="--gpu-check at the smoke size (CPU or GPU, CI)")
    p.add_argument("--out", default="runs/gpu-check", help="--gpu-check: folder of the report and its work files")
    p.add_argument("--phases", default=",".join(CHECK_PHASES), help="--gpu-check: comma-separated subset of phases")
    p.add_argument("--budget-scale", type=float, default=1.0, help="--gpu-check: multiply every phase's time budget")
    p.add_argument("--gpu-check-phase", default=None, choices=tuple(CHECK_PHASES),
                   help="run one phase of --gpu-check (what --gpu-check starts for each phase)")
    p.add_argument("--memory", action="store_true",
                   help="the memory plan instead of the table: per-GPU bytes of a Stage-2 run, plain, checkpointed, "
                        "sharded and both, against 40 and 80 GB cards (counted on the meta device: seconds, no GPU)")
    p.add_argument("--models", default=",".join(PLAN_MODELS), help="--memory: comma-separated denoisers (--model)")
    p.add_argument("--image-size", type=int, default=512, help="--memory: image side")
    p.add_argument("--ae", default="f32c32", help="--memory: autoencoder compression fFcC (factor, channels)")
    p.add_argument("--global-batch", type=int, default=4096, help="--memory: images per step over all GPUs")
    p.add_argument("--gpus", default="8,32", help="--memory: comma-separated GPU counts")
    p.add_argument("--micro-batch", type=int, default=None, help="--memory: per-GPU forward batch (accumulation)")
    a = p.parse_args(argv)
    if a.budget_scale <= 0:
        p.error("--budget-scale must be positive")
    check_only = [f"--{k.replace('_', '-')}" for k in ("smoke", "out", "phases", "budget_scale")
                  if getattr(a, k) != p.get_default(k)]
    if check_only and not (a.gpu_check or a.gpu_check_phase):      # else the full-size table would start
        verb = "applies" if len(check_only) == 1 else "apply"
        raise UserError(f"{', '.join(check_only)} {verb} only with --gpu-check (e.g. bench.py --gpu-check --smoke); "
                        f"the throughput table at toy sizes is bench.py --quick")
    table_only = [f"--{k.replace('_', '-')}" for k in ("quick", "rows", "compile", "no_bf16", "repeats", "iters",
                                                       "warmup") if getattr(a, k) != p.get_default(k)]
    if table_only and a.gpu_check:                  # the check runs its own sizes, rows and modes
        raise UserError(f"{', '.join(table_only)} {'sets' if len(table_only) == 1 else 'set'} the throughput table, "
                        f"not --gpu-check (its sizes are fixed; its small size is --gpu-check --smoke)")
    a.out = os.path.abspath(a.out)
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = get_args(argv)
    for name in ("repeats", "iters"):
        check_range(a, name, 1, optional=True)
    check_range(a, "warmup", 0, optional=True)
    if a.gpu_check_phase:
        return run_phase(a)
    if a.gpu_check:
        return gpu_check(a, argv)
    if a.memory:
        a.argv = argv
        for name in ("image_size", "global_batch"):
            check_range(a, name, 1)
        check_range(a, "micro_batch", 1, optional=True)
        return print(memory_table(a))
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
