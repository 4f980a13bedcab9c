"""Stage-2 model: SiT (DiT blocks with adaLN-Zero), flow-matching pieces and ODE samplers.

    python dit.py                       # CPU: parameter counts of the named sizes (SiT-XL/2 = 675M)
    (library module: trained by train_diffusion.py, sampled by evaluate.py; the single-GPU,
     torchrun and multi-node commands are in those scripts)

Time convention (DESIGN.md section 2) -- the OPPOSITE of SiT's released code:
    x_t = (1 - t) x0 + t eps,  t in [0, 1],  t = 0 is data, t = 1 is pure noise,
    the network predicts the velocity v = d x_t / dt = eps - x0,
    samplers integrate dx/dt = v from t = 1 down to t = 0 (Euler or Heun).
The Denoising-VAE paper writes its objective in DDPM form (Eq. 5); with a linear
interpolant the same latents z^(l) simply take the place of x0 here.

Shapes, latents (B, C, h, w) with patch p and width D, tokens N = (h/p)(w/p):
    x (B, C, h, w) -> patchify (B, N, p*p*C) -> linear (B, N, D) + pos -> blocks(c) -> final(c) -> (B, C, h, w)
    c = t_embed(t) + y_embed(y)  (B, D), y = num_classes is the null class for guidance
"""
import math

import torch
import torch.nn as nn

from vae import Attention, Mlp, patchify, sincos_2d, unpatchify

# depth, width, heads (DiT / SiT Table 1) plus small CPU sizes
SIZES = {"smoke": (1, 32, 2), "tiny": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12),
         "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def modulate(x, shift, scale):
    """adaLN: x (B, N, D) * (1 + scale) + shift, with shift / scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of 1000 t (t in [0, 1]) followed by a 2-layer MLP -> (B, D)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]                  # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=1))


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
    def __init__(self, input_size=16, in_channels=4, patch=2, width=1152, depth=28, heads=16, num_classes=1000,
                 mlp_ratio=4.0):
        super().__init__()
        if input_size % patch:
            raise ValueError(f"latent size {input_size} is not a multiple of the patch size {patch}")
        self.config = dict(input_size=input_size, in_channels=in_channels, patch=patch, width=width, depth=depth,
                           heads=heads, num_classes=num_classes, mlp_ratio=mlp_ratio)
        self.patch, self.in_channels, self.num_classes = patch, in_channels, num_classes
        self.x_embed = nn.Linear(patch * patch * in_channels, width)
        self.t_embed = TimestepEmbedder(width)
        self.y_embed = nn.Embedding(num_classes + 1, width)               # index num_classes = null class
        g = input_size // patch
        self.register_buffer("pos", sincos_2d(width, g, g)[None], persistent=False)   # (1, N, D)
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
            tok = blk(tok, c)
            if i == return_hidden:
                hidden = tok
                if hidden_only:
                    return hidden
        out = unpatchify(self.final(tok, c), self.patch, h // self.patch, w // self.patch)   # (B, C, h, w)
        return (out, hidden) if return_hidden else out


def build_sit(name, input_size, in_channels, num_classes):
    """name is SIZE/PATCH, e.g. 'XL/2' (SiT-XL/2) or 'tiny/1'."""
    size, _, patch = name.partition("/")
    if size not in SIZES or not patch.isdigit() or int(patch) < 1:
        raise ValueError(f"unknown SiT model {name!r}; use SIZE/PATCH with SIZE in {sorted(SIZES)} and PATCH >= 1")
    if input_size % int(patch):
        raise ValueError(f"SiT patch {patch} does not divide the {input_size}x{input_size} latent grid")
    depth, width, heads = SIZES[size]
    return SiT(input_size, in_channels, int(patch), width, depth, heads, num_classes)


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


def flow_matching_loss(model, x0, y, t, eps):
    """Mean squared velocity error (per sample (B,)) at times t."""
    v = model(interpolate(x0, eps, t), t, y)
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


if __name__ == "__main__":
    for name in ("S/2", "B/2", "L/2", "XL/2", "XL/1"):
        m = build_sit(name, 32, 4, 1000)
        print(f"SiT-{name:5s} {sum(p.numel() for p in m.parameters()) / 1e6:8.1f}M parameters (4x32x32 latents)")
