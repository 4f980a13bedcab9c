"""Stage-2 models: SiT (DiT blocks with adaLN-Zero) and U-ViT, flow-matching pieces and ODE samplers.

    python dit.py                       # CPU: parameter counts of the named sizes (SiT-XL/2 = 675M, U-ViT-H/2 = 501M,
                                        # U-ViT-2B/1 = 1580M on 32x16x16 latents)
    (library module: trained by train_diffusion.py, sampled by evaluate.py; the single-GPU,
     torchrun and multi-node commands are in those scripts)

Time convention (README, "Conventions") -- the OPPOSITE of SiT's released code:
    x_t = (1 - t) x0 + t eps,  t in [0, 1],  t = 0 is data, t = 1 is pure noise,
    the network predicts the velocity v = d x_t / dt = eps - x0,
    samplers integrate dx/dt = v from t = 1 down to t = 0 (Euler or Heun), or the reverse SDE (sample_sde).
SiT's released code runs the same linear interpolant with t_SiT = 1 - t (t_SiT = 1 is data) and
predicts v_SiT = x0 - eps = -v; sample_sde is SiT's Euler-Maruyama sampler written in our t.
The Denoising-VAE paper writes its objective in DDPM form (Eq. 5); with a linear
interpolant the same latents z^(l) simply take the place of x0 here.

Shapes, latents (B, C, h, w) with patch p and width D, tokens N = (h/p)(w/p):
    x (B, C, h, w) -> patchify (B, N, p*p*C) -> linear (B, N, D) + pos -> blocks(c) -> final(c) -> (B, C, h, w)
    c = t_embed(t) + y_embed(y)  (B, D), y = num_classes is the null class for guidance

U-ViT (Bao et al. 2023; with this flow-matching objective it is the FreqWarm paper's USiT): time and class
are tokens, and block i of the first half feeds block depth-1-i of the second by a long skip connection:
    tokens [y_embed(y), sincos(1000 t), linear(patches)] + learned pos   (B, 2 + N, D)
    in blocks -> mid block -> out blocks (x = linear(cat[x, skip])) -> LayerNorm -> linear -> drop the 2 extras
"""
import math

import torch
import torch.nn as nn

from vae import Attention, Mlp, call_block, patchify, sincos_2d, unpatchify

# depth, width, heads (DiT / SiT Table 1) plus small CPU sizes
SIZES = {"smoke": (1, 32, 2), "tiny": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12),
         "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def modulate(x, shift, scale):
    """adaLN: x (B, N, D) * (1 + scale) + shift, with shift / scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_features(t, dim):
    """Sinusoidal features of 1000 t: cos / sin of 1000 t exp(-ln(10000) i / half), (B, dim), no parameters."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of 1000 t (t in [0, 1]) followed by a 2-layer MLP -> (B, D)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_features(t, self.freq_dim))


class SiTBlock(nn.Module):
    """DiT block with adaLN-Zero: the modulation that produces gates starts at zero."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, int(dim * mlp_ratio))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):                                              # x (B, N, D), c (B, D)
        s1, g1, b1, s2, g2, b2 = self.ada(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), b1, s1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), b2, s2))


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, c):
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class SiT(nn.Module):
    grad_checkpoint = False          # --grad-checkpoint: blocks recompute their activations in backward (call_block)

    def __init__(self, input_size=16, in_channels=4, patch=2, width=1152, depth=28, heads=16, num_classes=1000,
                 mlp_ratio=4.0):
        super().__init__()
        if input_size % patch:
            raise ValueError(f"latent size {input_size} is not a multiple of the patch size {patch}")
        self.config = dict(arch="sit", input_size=input_size, in_channels=in_channels, patch=patch, width=width,
                           depth=depth, heads=heads, num_classes=num_classes, mlp_ratio=mlp_ratio)
        self.patch, self.in_channels, self.num_classes = patch, in_channels, num_classes
        self.x_embed = nn.Linear(patch * patch * in_channels, width)
        self.t_embed = TimestepEmbedder(width)
        self.y_embed = nn.Embedding(num_classes + 1, width)               # index num_classes = null class
        g = input_size // patch
        self.register_buffer("pos", sincos_2d(width, g, g)[None].to(torch.get_default_device()),   # (1, N, D)
                             persistent=False)
        self.blocks = nn.ModuleList(SiTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(width, patch * patch * in_channels)
        self._init()

    def _init(self):
        """DiT initialisation: Xavier linears, N(0, 0.02) embeddings, zeros for adaLN and the output."""
        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(xavier)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[1].weight), nn.init.zeros_(blk.ada[1].bias)
        for lin in (self.final.ada[1], self.final.linear):
            nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)

    def forward(self, x, t, y, return_hidden=None, hidden_only=False):
        """x (B, C, h, w), t (B,) in [0, 1], y (B,) labels -> velocity (B, C, h, w).

        With return_hidden=k (1..depth) also returns the output of block k, (B, N, D) (for FDA);
        hidden_only=True stops there and returns just that hidden state (the FDA teacher).
        """
        B, C, h, w = x.shape
        if C != self.in_channels:
            raise ValueError(f"SiT expects {self.in_channels} latent channels, got {C}")
        tok = self.x_embed(patchify(x, self.patch)) + self.pos               # (B, N, D)
        c = self.t_embed(t) + self.y_embed(y)                                # (B, D)
        hidden = None
        for i, blk in enumerate(self.blocks, start=1):
            tok = call_block(blk, tok, c, checkpoint=self.grad_checkpoint)
            if i == return_hidden:
                hidden = tok
                if hidden_only:
                    return hidden
        out = unpatchify(self.final(tok, c), self.patch, h // self.patch, w // self.patch)   # (B, C, h, w)
        return (out, hidden) if return_hidden else out


def build_sit(name, input_size, in_channels, num_classes):
    """name is SIZE/PATCH, e.g. 'XL/2' (SiT-XL/2) or 'tiny/1'."""
    size, patch = _size_and_patch(name, SIZES, "SiT", "", input_size)
    depth, width, heads = SIZES[size]
    return SiT(input_size, in_channels, patch, width, depth, heads, num_classes)


def _size_and_patch(name, sizes, what, prefix, input_size):
    size, _, patch = name[len(prefix):].partition("/")
    if size not in sizes or not patch.isdigit() or int(patch) < 1:
        raise ValueError(f"unknown {what} model {name!r}; use {prefix}SIZE/PATCH with SIZE in {sorted(sizes)} "
                         f"and PATCH >= 1")
    if input_size % int(patch):
        raise ValueError(f"{what} patch {patch} does not divide the {input_size}x{input_size} latent grid")
    return size, int(patch)


# ----------------------------------------------------------------------------- U-ViT

# blocks (in + mid + out), width, heads: U-ViT Table (S 44M, M 131M, L 287M, H 501M at /2 on 4x32x32 latents).
# 2B: DC-AE's UViT-2B / USiT-2B (the FreqWarm paper's USiT-2B), from mit-han-lab/efficientvit,
# efficientvit/diffusion_model_zoo.py (dc_ae_usit_2b_in_512px: uvit.depth=28 uvit.hidden_size=2048
# uvit.num_heads=32 uvit.patch_size=1), where depth=28 means 14 in + 1 mid + 14 out blocks
# (efficientvit/diffusioncore/models/uvit.py), i.e. 29 here; its README lists UViT-2B on DC-AE-f32c32 at
# 1580.40M parameters and UViT-H at 500.87M, which uvit-2B/1 and uvit-H/1 on 32x16x16 latents give here.
UVIT_SIZES = {"smoke": (3, 32, 2), "tiny": (5, 128, 4), "S": (13, 512, 8), "M": (17, 768, 12),
              "L": (21, 1024, 16), "H": (29, 1152, 16), "2B": (29, 2048, 32)}
UVIT_PREFIX = "uvit-"


class UViTBlock(nn.Module):
    """Pre-norm transformer block; in the second half it first merges its long skip: x = linear(cat[x, skip])."""

    def __init__(self, dim, heads, mlp_ratio=4.0, qkv_bias=False, skip=False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads, qkv_bias), Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """U-ViT denoiser with SiT's interface: forward(x, t, y, return_hidden=None, hidden_only=False).

    depth blocks in all (odd): (depth - 1) / 2 in, one mid, (depth - 1) / 2 out; qkv without bias, no time
    MLP (as the published ImageNet latent models); `conv` adds U-ViT's optional 3x3 output convolution.
    Initialisation as U-ViT (truncated normal 0.02 for linears, embeddings and positions), except the output
    projection (and conv), which starts at zero as SiT's does: a fresh model predicts v = 0.
    """
    grad_checkpoint = False          # --grad-checkpoint: blocks recompute their activations in backward (call_block)

    def __init__(self, input_size=32, in_channels=4, patch=2, width=1152, depth=29, heads=16, num_classes=1000,
                 mlp_ratio=4.0, qkv_bias=False, conv=False):
        super().__init__()
        if input_size % patch:
            raise ValueError(f"latent size {input_size} is not a multiple of the patch size {patch}")
        if depth < 1 or depth % 2 == 0:
            raise ValueError(f"U-ViT needs an odd number of blocks (in + mid + out), got {depth}")
        self.config = dict(arch="uvit", input_size=input_size, in_channels=in_channels, patch=patch, width=width,
                           depth=depth, heads=heads, num_classes=num_classes, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           conv=conv)
        self.patch, self.in_channels, self.num_classes, self.width = patch, in_channels, num_classes, width
        self.extras = 2                                                    # class token, time token
        self.x_embed = nn.Linear(patch * patch * in_channels, width)
        self.y_embed = nn.Embedding(num_classes + 1, width)               # index num_classes = null class
        n = (input_size // patch) ** 2
        self.pos = nn.Parameter(torch.zeros(1, self.extras + n, width))
        half = depth // 2
        self.blocks = nn.ModuleList(UViTBlock(width, heads, mlp_ratio, qkv_bias, skip=i > half) for i in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, patch * patch * in_channels)
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1) if conv else None
        self._init()

    def _init(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)
        for m in (self.out, self.conv):
            if m is not None:
                nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)

    def forward(self, x, t, y, return_hidden=None, hidden_only=False):
        """x (B, C, h, w), t (B,) in [0, 1], y (B,) labels -> velocity (B, C, h, w).

        return_hidden=k (1..depth) also returns the patch tokens after block k, (B, N, D) (for FDA);
        hidden_only=True stops there and returns just that hidden state.
        """
        B, C, h, w = x.shape
        if C != self.in_channels:
            raise ValueError(f"U-ViT expects {self.in_channels} latent channels, got {C}")
        tok = self.x_embed(patchify(x, self.patch))                          # (B, N, D)
        extras = torch.stack([self.y_embed(y), timestep_features(t, self.width)], dim=1).to(tok.dtype)  # (B, 2, D)
        tok = torch.cat([extras, tok], dim=1) + self.pos                     # (B, 2 + N, D)
        half, skips, hidden = len(self.blocks) // 2, [], None
        for i, blk in enumerate(self.blocks):
            tok = call_block(blk, tok, skips.pop() if i > half else None, checkpoint=self.grad_checkpoint)
            if i < half:
                skips.append(tok)
            if i + 1 == return_hidden:
                hidden = tok[:, self.extras:]
                if hidden_only:
                    return hidden
        out = self.out(self.norm(tok))[:, self.extras:]                       # (B, N, p*p*C)
        out = unpatchify(out, self.patch, h // self.patch, w // self.patch)   # (B, C, h, w)
        if self.conv is not None:
            out = self.conv(out)
        return (out, hidden) if return_hidden else out


def build_uvit(name, input_size, in_channels, num_classes):
    """name is uvit-SIZE/PATCH, e.g. 'uvit-H/2' (U-ViT-H/2) or 'uvit-smoke/1'."""
    size, patch = _size_and_patch(name, UVIT_SIZES, "U-ViT", UVIT_PREFIX, input_size)
    depth, width, heads = UVIT_SIZES[size]
    return UViT(input_size, in_channels, patch, width, depth, heads, num_classes)


def build_denoiser(name, input_size, in_channels, num_classes):
    """--model: 'uvit-SIZE/PATCH' builds a U-ViT, 'SIZE/PATCH' a SiT."""
    build = build_uvit if name.startswith(UVIT_PREFIX) else build_sit
    return build(name, input_size, in_channels, num_classes)


def denoiser_from_config(config):
    """Rebuild a denoiser from its `config` (a checkpoint's model_config; without 'arch' it is a SiT)."""
    cfg = dict(config)
    arch = cfg.pop("arch", "sit")
    if arch not in ("sit", "uvit"):
        raise ValueError(f"unknown denoiser architecture {arch!r} in the checkpoint")
    return (UViT if arch == "uvit" else SiT)(**cfg)


class Projector(nn.Module):
    """FDA projector on the student side: token-wise MLP (B, N, D) -> (B, N, D_teacher)."""

    def __init__(self, dim, out_dim=None, hidden=None):
        super().__init__()
        hidden = hidden or 2 * dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim or dim))

    def forward(self, h):
        return self.net(h)


# ----------------------------------------------------------------------------- flow matching

def interpolate(x0, eps, t):
    """Linear interpolant x_t = (1 - t) x0 + t eps; t (B,)."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * eps


def velocity_target(x0, eps):
    """d x_t / dt for the linear interpolant."""
    return eps - x0


def velocity_loss(v, x0, eps):
    """Squared error of a predicted velocity v = model(x_t, t, y) against eps - x0, per sample (B,), in float32:
    the flow-matching objective (Denoising-VAE Eq. 5 with z^(l) as x0), used by training and validation alike."""
    return (v.float() - velocity_target(x0, eps)).pow(2).mean(dim=tuple(range(1, x0.dim())))


# ----------------------------------------------------------------------------- guidance and samplers

def guided_velocity(model, y, scale=1.0, interval=(0.0, 1.0)):
    """Velocity field v(x, t) with classifier-free guidance on all channels.

    Conditional and unconditional halves go through one batched forward. Guidance applies
    only for t inside `interval` (a guidance interval); elsewhere, and for scale 1, the
    conditional velocity is returned.
    """
    null = torch.full_like(y, model.num_classes)

    def v(x, t):                                                     # x (B, C, h, w), t python float
        tb = torch.full((x.shape[0],), t, device=x.device)
        if scale == 1.0 or not (interval[0] <= t <= interval[1]):
            return model(x, tb, y).float()
        out = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([y, null])).float()
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)
    return v


@torch.no_grad()
def sample_ode(velocity, noise, steps=50, method="heun"):
    """Integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data) on a uniform grid."""
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = noise.float()
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t                                              # negative
        v = velocity(x, t)
        if method == "euler":
            x = x + dt * v
        elif method == "heun":
            x_pred = x + dt * v
            x = x + 0.5 * dt * (v + velocity(x_pred, t_next))
        else:
            raise ValueError(f"unknown sampler {method!r}; use euler or heun")
    return x


def score_from_velocity(x, v, t):
    """grad log p_t(x) from the velocity of the linear interpolant (t > 0): x_t = eps - (1 - t)(eps - x0) and
    v = E[eps - x0 | x_t], so E[eps | x_t] = x_t + (1 - t) v and the score is -E[eps | x_t] / t
    (SiT's ICPlan.get_score_from_velocity, in its time t_SiT = 1 - t)."""
    return -(x + (1 - t) * v) / t


def _gaussian(x, generator):
    """Standard normal like x (B, ...): from one torch.Generator, or row b from generator[b] (per-image noise
    that does not depend on the batch split), or torch's global stream when generator is None."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device) for g in generator]).to(x.device)
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)


SDE_LAST_STEP = 0.04        # SiT's --last-step-size: the final noise-free step goes from t = 0.04 to t = 0


@torch.no_grad()
def sample_sde(velocity, noise, steps=250, last_step=SDE_LAST_STEP, generator=None):
    """Euler-Maruyama on the reverse SDE of the linear interpolant: SiT's SDE sampler with the defaults of its
    sample.py / sample_ddp.py (diffusion form 'sigma', norm 1, last step 'Mean' of size 0.04), `steps`
    network evaluations in all (SiT's --num-sampling-steps).

    Every SDE  dx = [v - w(t) grad log p_t(x)] dt + sqrt(2 w(t)) dW,  run from t = 1 down to t = 0, has the
    marginals p_t of the probability-flow ODE dx/dt = v. SiT's 'sigma' form is w = sigma_t, the noise
    coefficient of x_t, which is t here. Grid: `steps` points from t = 1 down to t = last_step (steps - 1
    Euler-Maruyama steps with fresh noise), then one step of the same drift without noise from last_step to
    t = 0 (SiT's 'Mean' last step; the score's 1 / t keeps the grid away from t = 0).
    """
    if steps < 2:
        raise ValueError(f"the SDE sampler needs at least 2 steps, got {steps}")
    ts = torch.linspace(1.0, last_step, steps).tolist() + [0.0]
    x = noise.float()
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t                                              # negative
        v = velocity(x, t)
        w = t                                                        # diffusion coefficient w(t) = sigma_t = t
        x_mean = x + (v - w * score_from_velocity(x, v, t)) * dt
        x = x_mean if i == len(ts) - 2 else x_mean + math.sqrt(2 * w * -dt) * _gaussian(x, generator)
    return x


SAMPLERS = ("euler", "heun", "sde")          # --sampler: sample_ode methods and sample_sde


if __name__ == "__main__":
    rows = [(n, 32, 4) for n in ("S/2", "B/2", "L/2", "XL/2", "XL/1", "uvit-S/2", "uvit-M/2", "uvit-L/2", "uvit-H/2",
                                 "uvit-2B/2")]
    rows += [(n, 16, 32) for n in ("XL/1", "uvit-H/1", "uvit-2B/1")]          # 512 px on an f32c32 autoencoder
    for name, side, ch in rows:
        with torch.device("meta"):
            m = build_denoiser(name, side, ch, 1000)
        print(f"{m.config['arch']:4s} {name:9s} {sum(p.numel() for p in m.parameters()) / 1e6:8.1f}M parameters "
              f"({ch}x{side}x{side} latents)")
