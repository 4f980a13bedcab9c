"""Stage-1 models: ViT VAE, PatchGAN discriminator, VGG16 perceptual distance.

    python vae.py                       # CPU: build every named size and print parameter counts
    (library module: trained by train_vae.py; single GPU / torchrun / multi-node commands are there)

Denoising-VAE (Sec. 3.1, Sec. 4 "Training") uses a ViT encoder-decoder with spatial
downsampling f and d latent channels (f16d16 / f16d32 / f16d64, ~171M parameters in all).
Shapes, for an image of side S and patch f (tokens N = (S/f)^2, width D):

    x (B, 3, S, S) --patchify--> (B, N, D) --blocks--> (B, N, 2d) --> posterior over z (B, d, S/f, S/f)
    z (B, d, S/f, S/f) --> (B, N, D) --blocks--> (B, N, f*f*3) --unpatchify--> (B, 3, S, S) --3x3 refine--> x_hat
"""
import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import fft_ops
from common import UserError

# Named sizes. The paper sizes are ViT-B-like encoder and decoder (~86M each).
SIZES = {
    "smoke": dict(patch=4, width=32, depth=1, heads=2, latent_dim=4),
    "tiny": dict(patch=4, width=96, depth=2, heads=4, latent_dim=8),
    "f16d16": dict(patch=16, width=768, depth=12, heads=12, latent_dim=16),
    "f16d32": dict(patch=16, width=768, depth=12, heads=12, latent_dim=32),
    "f16d64": dict(patch=16, width=768, depth=12, heads=12, latent_dim=64),
}

LOGVAR_RANGE = (-30.0, 20.0)
VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/" + VGG16_FILE


# ----------------------------------------------------------------------------- transformer pieces

@functools.lru_cache(maxsize=16)
def sincos_2d(dim, h, w):
    """Fixed 2-D sin-cos position embedding (h * w, dim): half the channels encode rows, half columns."""
    assert dim % 4 == 0, "embedding width must be divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))   # (dim/4,)
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    out = [f(g.flatten()[:, None] * omega[None]) for g in (gy, gx) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1).float()                                                 # (h*w, dim)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                              # (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, D/h)
        x = F.scaled_dot_product_attention(q, k, v)                    # (B, h, N, D/h)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def patchify(x, p):
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), row-major over patches."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, h, w):
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p); the inverse of patchify."""
    B, N, K = x.shape
    C = K // (p * p)
    x = x.view(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, h * p, w * p)


# ----------------------------------------------------------------------------- posterior

class DiagonalGaussian:
    """q(z | x) = N(mean, exp(logvar)) from moments (B, 2d, h, w); computed in float32."""

    def __init__(self, moments):
        self.mean, logvar = moments.float().chunk(2, dim=1)            # (B, d, h, w) each
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, noise=None):
        noise = torch.randn_like(self.mean) if noise is None else noise
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) summed over latent elements, averaged over the batch."""
        kl = 0.5 * (self.mean ** 2 + self.logvar.exp() - 1.0 - self.logvar)
        return kl.sum(dim=(1, 2, 3)).mean()


# ----------------------------------------------------------------------------- the VAE

class ViTVAE(nn.Module):
    def __init__(self, image_size=32, patch=4, width=128, depth=3, heads=4, latent_dim=8, mlp_ratio=4.0):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.config = dict(image_size=image_size, patch=patch, width=width, depth=depth, heads=heads,
                           latent_dim=latent_dim, mlp_ratio=mlp_ratio)
        self.patch, self.width, self.latent_dim = patch, width, latent_dim
        # encoder
        self.embed = nn.Linear(patch * patch * 3, width)
        self.enc_blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.enc_norm = nn.LayerNorm(width)
        self.to_moments = nn.Linear(width, 2 * latent_dim)
        # decoder
        self.from_latent = nn.Linear(latent_dim, width)
        self.dec_blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.dec_norm = nn.LayerNorm(width)
        self.to_pixels = nn.Linear(width, patch * patch * 3)
        self.refine = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 3, 3, padding=1))
        nn.init.zeros_(self.refine[2].weight)
        nn.init.zeros_(self.refine[2].bias)
        self.apply(_init_linear)

    @property
    def downsample(self):
        return self.patch

    def latent_shape(self, image_size=None):
        s = (image_size or self.config["image_size"]) // self.patch
        return (self.latent_dim, s, s)

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over z (B, d, H/f, W/f)."""
        B, _, H, W = x.shape
        h, w = H // self.patch, W // self.patch
        t = self.embed(patchify(x, self.patch)) + sincos_2d(self.width, h, w).to(x)    # (B, N, D)
        for blk in self.enc_blocks:
            t = blk(t)
        m = self.to_moments(self.enc_norm(t))                                          # (B, N, 2d)
        return DiagonalGaussian(m.transpose(1, 2).reshape(B, 2 * self.latent_dim, h, w))

    def decode(self, z):
        """z (B, d, h, w) -> image (B, 3, h f, w f)."""
        B, d, h, w = z.shape
        if d != self.latent_dim:
            raise ValueError(f"latent has {d} channels but this VAE decodes {self.latent_dim}")
        t = self.from_latent(z.flatten(2).transpose(1, 2)) + sincos_2d(self.width, h, w).to(z)   # (B, N, D)
        for blk in self.dec_blocks:
            t = blk(t)
        x = unpatchify(self.to_pixels(self.dec_norm(t)), self.patch, h, w)                     # (B, 3, H, W)
        return x + self.refine(x)

    def forward(self, x, noise=None, level=0, fractions=fft_ops.MLSR_FRACTIONS):
        """MLSR path of Eq. 2: x -> z ~ q(z|x) -> S_l(z) (Eq. 3) -> D(S_l(z)). Returns (x_hat, posterior)."""
        post = self.encode(x)
        z = fft_ops.attenuate(post.sample(noise), level, fractions)      # (B, d, h, w)
        return self.decode(z), post


def _init_linear(m):
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


def build_vae(size, image_size, latent_dim=None):
    cfg = dict(SIZES[size])
    if latent_dim:
        cfg["latent_dim"] = latent_dim
    return ViTVAE(image_size=image_size, **cfg)


# ----------------------------------------------------------------------------- discriminator

class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN style) with GroupNorm instead of BatchNorm (DDP-safe): (B,3,H,W) -> (B,1,h,w) logits."""

    def __init__(self, channels=64, n_layers=3):
        super().__init__()
        layers, c = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for i in range(1, n_layers + 1):
            c_out = channels * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1), nn.GroupNorm(8, c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def hinge_d_loss(real_logits, fake_logits):
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits):
    return -fake_logits.mean()


# ----------------------------------------------------------------------------- perceptual distance

def find_vgg_weights(path=None):
    """Path to torchvision's VGG16 weights: `path` if given, else torchvision's hub cache."""
    if path:
        if not os.path.isfile(path):
            raise UserError(f"--perceptual-weights {path} does not exist")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)
    if os.path.isfile(cached):
        return cached
    raise UserError(
        f"perceptual loss needs VGG16 weights: download {VGG16_URL} to {cached} "
        f"(or pass --perceptual-weights PATH), or set --perceptual-weight 0")


class VGGPerceptual(nn.Module):
    """Distance between unit-normalised VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.

    The LPIPS construction without its learned linear heads (those are another download).
    `weights=None` keeps random weights: a stand-in for tests only.
    """

    TAPS = (3, 8, 15, 22, 29)

    def __init__(self, weights="torchvision"):
        super().__init__()
        import torchvision
        vgg = torchvision.models.vgg16(weights=None)
        if weights is not None:
            path = find_vgg_weights(None if weights == "torchvision" else weights)
            vgg.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.features = vgg.features[: self.TAPS[-1] + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode=True):
        return super().train(False)            # always in eval mode

    def forward(self, x, y):
        """x, y (B, 3, H, W) in [-1, 1] -> scalar distance."""
        h = ((torch.cat([x, y]).float() + 1) / 2 - self.mean) / self.std
        loss = 0.0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.TAPS:
                f = h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                fx, fy = f.chunk(2)
                loss = loss + (fx - fy).pow(2).sum(dim=1).mean()
        return loss


if __name__ == "__main__":
    for name in SIZES:
        n = sum(p.numel() for p in build_vae(name, 256 if name.startswith("f16") else 32).parameters())
        print(f"{name:8s} {n / 1e6:8.2f}M parameters")
