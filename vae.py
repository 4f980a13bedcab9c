"""Stage-1 models (ViT VAE, PatchGAN discriminator, VGG16 perceptual distance) and the frozen autoencoders of
Stages 2-3: our ViT VAE checkpoints and pretrained diffusers autoencoders (--vae diffusers:HUB_ID_OR_FOLDER[#SUB]).

    python vae.py                       # CPU: build every named size and print parameter counts
    (library module: trained by train_vae.py; single GPU / torchrun / multi-node commands are there)

Denoising-VAE (Sec. 3.1, Sec. 4 "Training") uses a ViT encoder-decoder with spatial
downsampling f and d latent channels (f16d16 / f16d32 / f16d64, ~171M parameters in all).
Shapes, for an image of side S and patch f (tokens N = (S/f)^2, width D):

    x (B, 3, S, S) --patchify--> (B, N, D) --blocks--> (B, N, 2d) --> posterior over z (B, d, S/f, S/f)
    z (B, d, S/f, S/f) --> (B, N, D) --blocks--> (B, N, f*f*3) --unpatchify--> (B, 3, S, S) --3x3 refine--> x_hat
"""
import copy
import functools
import hashlib
import inspect
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import fft_ops
from common import UserError, checkpoint_path, file_hash, load_checkpoint, read_export
from data import fingerprint, image_batches, random_subset, train_val_split

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
    """Fixed 2-D sin-cos position embedding (h * w, dim): half the channels encode rows, half columns. Always on
    the CPU (it is cached: a model built under `with torch.device("meta")` must not leave a meta copy behind)."""
    assert dim % 4 == 0, "embedding width must be divisible by 4"
    cpu = dict(dtype=torch.float64, device="cpu")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, **cpu) / (dim // 4))                # (dim/4,)
    gy, gx = torch.meshgrid(torch.arange(h, **cpu), torch.arange(w, **cpu), indexing="ij")
    out = [f(g.flatten()[:, None] * omega[None]) for g in (gy, gx) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1).float()                                                 # (h*w, dim)


class Attention(nn.Module):
    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
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


def call_block(block, *inputs, checkpoint=False):
    """block(*inputs); with checkpoint (--grad-checkpoint) while autograd records, the block keeps none of its
    activations for backward but only its inputs, and runs its forward again in backward (torch.utils.checkpoint,
    non-reentrant): the same gradients for one more forward per block. Without autograd (EMA teacher, sampling,
    validation, frozen encoders) it is a plain call."""
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


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

class PatchLatents(nn.Module):
    """What Stage 1's autoencoders share: `patch` is the downsampling factor f, latents are (d, S/f, S/f)."""

    @property
    def downsample(self):
        return self.patch

    def latent_shape(self, image_size=None):
        s = (image_size or self.config["image_size"]) // self.patch
        return (self.latent_dim, s, s)


class ViTVAE(PatchLatents):
    grad_checkpoint = False          # --grad-checkpoint: blocks recompute their activations in backward (call_block)

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

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over z (B, d, H/f, W/f)."""
        B, _, H, W = x.shape
        h, w = H // self.patch, W // self.patch
        t = self.embed(patchify(x, self.patch)) + sincos_2d(self.width, h, w).to(x)    # (B, N, D)
        for blk in self.enc_blocks:
            t = call_block(blk, t, checkpoint=self.grad_checkpoint)
        m = self.to_moments(self.enc_norm(t))                                          # (B, N, 2d)
        return DiagonalGaussian(m.transpose(1, 2).reshape(B, 2 * self.latent_dim, h, w))

    def decode(self, z):
        """z (B, d, h, w) -> image (B, 3, h f, w f)."""
        B, d, h, w = z.shape
        if d != self.latent_dim:
            raise ValueError(f"latent has {d} channels but this VAE decodes {self.latent_dim}")
        t = self.from_latent(z.flatten(2).transpose(1, 2)) + sincos_2d(self.width, h, w).to(z)   # (B, N, D)
        for blk in self.dec_blocks:
            t = call_block(blk, t, checkpoint=self.grad_checkpoint)
        x = unpatchify(self.to_pixels(self.dec_norm(t)), self.patch, h, w)                     # (B, 3, H, W)
        return x + self.refine(x)


def _init_linear(m):
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


def build_vae(size, image_size, latent_dim=None):
    cfg = dict(SIZES[size])
    if latent_dim:
        cfg["latent_dim"] = latent_dim
    return ViTVAE(image_size=image_size, **cfg)


# ----------------------------------------------------------------------------- DC-AE-style convolutional autoencoder

def _dcae(latent, widths, enc_layers, dec_layers, blocks, dec_norm="rms_norm", dec_act="silu", qkv=None):
    """Keyword arguments of diffusers.AutoencoderDC, one entry per stage (stage i works at 1/2^i resolution)."""
    n = len(widths)
    qkv = qkv or [[] for _ in range(n)]
    return dict(latent_channels=latent, attention_head_dim=32, encoder_block_types=list(blocks),
                decoder_block_types=list(blocks), encoder_block_out_channels=list(widths),
                decoder_block_out_channels=list(widths), encoder_layers_per_block=list(enc_layers),
                decoder_layers_per_block=list(dec_layers), encoder_qkv_multiscales=qkv, decoder_qkv_multiscales=qkv,
                downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
                decoder_norm_types=dec_norm if isinstance(dec_norm, str) else list(dec_norm),
                decoder_act_fns=dec_act if isinstance(dec_act, str) else list(dec_act))


_RES, _VIT = "ResBlock", "EfficientViTBlock"
# Named DC-AE layouts. f = 2^(stages - 1). The CPU ones are residual-conv only; their last width (128 for the
# tiny ones) must be a multiple of the latent channels (the encoder's out shortcut averages groups of channels).
# f32c32 / f64c128: the published dc-ae-f32c32-in-1.0 / dc-ae-f64c128-in-1.0 layouts (DC-AE, Chen et al. 2024):
# stage 0 has no blocks (a space-to-channel input conv), 3 ResBlock stages with batch-norm / ReLU in the
# decoder, then EfficientViT (linear-attention) stages with RMS-norm / SiLU.
DCAE_CONFIGS = {
    "smoke": _dcae(4, (8, 16, 16), (1, 1, 1), (1, 1, 1), (_RES,) * 3),
    "tiny-f4": _dcae(16, (32, 64, 128), (1, 1, 1), (1, 1, 1), (_RES,) * 3),
    "tiny-f8": _dcae(16, (32, 64, 128, 128), (1, 1, 1, 1), (1, 1, 1, 1), (_RES,) * 4),
    "tiny-f4w256": _dcae(16, (32, 64, 256), (1, 1, 1), (1, 1, 1), (_RES,) * 3),     # study part E: c up to 256
    "f32c32": _dcae(32, (128, 256, 512, 512, 1024, 1024), (0, 4, 8, 2, 2, 2), (0, 5, 10, 2, 2, 2),
                    (_RES,) * 3 + (_VIT,) * 3, ("batch_norm",) * 3 + ("rms_norm",) * 3, ("relu",) * 3 + ("silu",) * 3),
    "f64c128": _dcae(128, (128, 256, 512, 512, 1024, 1024, 2048), (0, 4, 8, 2, 2, 2, 2), (0, 5, 10, 2, 2, 2, 2),
                     (_RES,) * 3 + (_VIT,) * 4, ("batch_norm",) * 3 + ("rms_norm",) * 4,
                     ("relu",) * 3 + ("silu",) * 4),
}


class DeterministicLatent:
    """The 'posterior' of a deterministic encoder: z itself. sample() ignores the noise; there is no KL term."""

    def __init__(self, z):
        self.mean = z.float()

    def sample(self, noise=None):
        return self.mean

    def mode(self):
        return self.mean


class DCAE(PatchLatents):
    """A DC-AE-style autoencoder for Stage 1 (train_vae.py --arch dcae): a diffusers AutoencoderDC from a named
    layout, wrapped with the ViTVAE interface (encode -> .mean, decode; train_vae.MLSRPath adds S_l of Eq. 3).

        x (B, 3, S, S) --encoder--> z (B, c, S/f, S/f), deterministic --decoder--> x_hat (B, 3, S, S)

    `save_pretrained(folder)` writes the diffusers model itself: Stages 2-3 read it as --vae diffusers:FOLDER.
    """

    def __init__(self, preset="tiny-f4", image_size=32, latent_dim=None):
        super().__init__()
        import diffusers
        cfg = copy.deepcopy(DCAE_CONFIGS[preset])
        if latent_dim:
            cfg["latent_channels"] = latent_dim
        last, c = cfg["encoder_block_out_channels"][-1], cfg["latent_channels"]
        if last % c:
            raise UserError(f"DC-AE {preset}: {c} latent channels do not divide its last width {last} "
                            f"(the encoder and decoder shortcuts group channels): use a divisor of {last}")
        self.patch = 2 ** (len(cfg["encoder_block_out_channels"]) - 1)
        if image_size % self.patch:
            raise UserError(f"image size {image_size} is not divisible by the downsampling factor {self.patch} "
                            f"of DC-AE {preset}")
        self.config = dict(arch="dcae", preset=preset, image_size=image_size, diffusers=cfg)
        self.latent_dim = c
        self.model = diffusers.AutoencoderDC(**cfg)

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> DeterministicLatent over z (B, c, H/f, W/f)."""
        return DeterministicLatent(self.model.encode(x).latent)

    def decode(self, z):
        return self.model.decode(z).sample

    def save_pretrained(self, folder):
        self.model.save_pretrained(folder, safe_serialization=True)


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

def find_vgg_weights(path=None, flag="--perceptual-weights", needed_by="perceptual loss",
                     otherwise=", or set --perceptual-weight 0"):
    """Path to torchvision's VGG16 weights: `path` if given, else torchvision's hub cache; one line otherwise."""
    if path:
        if not os.path.isfile(path):
            raise UserError(f"{flag} {path} does not exist")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)
    if os.path.isfile(cached):
        return cached
    raise UserError(f"{needed_by} needs VGG16 weights: download {VGG16_URL} to {cached} "
                    f"(or pass {flag} PATH){otherwise}")


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



# ----------------------------------------------------------------------------- frozen autoencoders (Stages 2 and 3)

class FrozenAutoencoder(nn.Module):
    """What Stages 2 and 3 need of an autoencoder, whoever trained it.

        encode(x (B, 3, H, W) in [-1, 1]) -> deterministic latent (B, C, H/f, W/f), float32
        decode(z (B, C, h, w))            -> image (B, 3, h f, w f) in about [-1, 1], float32
    plus `name`, `latent_dim` C, `downsample` f, `content_hash` (provenance), `mlsr_fractions` (the p_l
    its S_l uses), `stats`: per-channel latent statistics the source carries, or None, and
    `scaling_factor` / `shift_factor`: the one scalar latent scale of its config (diffusers), or None / 0, and
    `scale_source`: where that scale comes from (or, when it is None, why there is none).
    Both directions run in float32 with autocast off: latents for training and images for metrics.
    """

    name, content_hash, stats, mlsr_fractions = "autoencoder", "", None, tuple(fft_ops.MLSR_FRACTIONS)
    scaling_factor, shift_factor, scale_source = None, 0.0, "it has none of its own"
    image_size = None                          # the one image side it serves, or None: any multiple of downsample

    def check_image_size(self, size):
        """One clear error unless images of side `size` can go through this autoencoder."""
        if size % self.downsample:
            raise UserError(f"image size {size} is not divisible by the downsampling factor {self.downsample} "
                            f"of {self.name}")

    def latent_shape(self, size):
        return (self.latent_dim, size // self.downsample, size // self.downsample)

    @property
    def device(self):
        return next(self.parameters()).device


def checkpoint_identity(path, ck):
    """The content hash of a Stage-1 checkpoint: its file's sha256, or, after `train_vae.py --stats-only` rewrote
    it with the same weights and new latent statistics, the hash it had before (stored as `content_hash`), so
    the Stage-2 runs trained on it still recognise it. Stage 2 keeps its own statistics, not these."""
    return ck.get("content_hash") or file_hash(path)


class ViTVAEAutoencoder(FrozenAutoencoder):
    """Our ViT VAE (Stage 1): posterior mean as the latent, its MLSR fractions, the statistics it carries."""

    def __init__(self, vae, fractions=fft_ops.MLSR_FRACTIONS, name="ViT-VAE", stats=None, content_hash="", path=None):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.name, self.stats, self.content_hash, self.path = name, stats, content_hash, path
        self.latent_dim, self.downsample = vae.latent_dim, vae.patch
        self.image_size = vae.config["image_size"]
        self.mlsr_fractions = tuple(fractions)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", use_ema=True):
        """A Stage-1 checkpoint (kind 'vae'): EMA weights, its MLSR fractions, its latent statistics."""
        ck = load_checkpoint(path, "vae")
        if ck["model_config"].get("arch") == "dcae":
            folder = os.path.join(os.path.dirname(path), DCAE_FOLDER)
            raise UserError(f"{path} is a DC-AE (train_vae.py --arch dcae): use its diffusers folder, "
                            f"--vae {DIFFUSERS_PREFIX}{folder}")
        vae = ViTVAE(**ck["model_config"])
        vae.load_state_dict(ck["ema" if use_ema else "model"])
        name = f"ViT-VAE {os.path.basename(os.path.dirname(os.path.abspath(path)))}/{os.path.basename(path)}"
        fractions = fft_ops.check_fractions(ck["config"].get("mlsr_fractions", fft_ops.MLSR_FRACTIONS),
                                            f"{path} (its --mlsr-fractions)")
        ae = cls(vae.to(device), fractions, name, ck.get("latent_stats"), checkpoint_identity(path, ck), path)
        ae.checkpoint = ck
        return ae

    @classmethod
    def from_export(cls, folder, device="cpu"):
        """A Stage-1 export (evaluate.py export of a 'vae' checkpoint): the same EMA weights, MLSR fractions and
        latent statistics, and the checkpoint's content hash, so Stage 2 and 3 see the same autoencoder."""
        cfg, weights = read_export(folder, ("vae",))
        vae = ViTVAE(**cfg["model_config"])
        vae.load_state_dict(weights)
        name = f"ViT-VAE export {os.path.basename(os.path.abspath(folder))} (step {cfg['step']})"
        fractions = fft_ops.check_fractions(cfg["mlsr_fractions"], f"{folder}/config.json (mlsr_fractions)")
        return cls(vae.to(device), fractions, name, cfg["latent_stats"], cfg["content_hash"], folder)

    def check_image_size(self, size):
        if size != self.image_size:            # fixed sin-cos positions were only ever trained at this size
            raise UserError(f"{self.path or self.name} was trained on {self.image_size}-px images and cannot serve {size}-px "
                            f"ones: train a VAE with --image-size {size}, or use a convolutional autoencoder")

    def encode(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.vae.encode(x.float()).mean                         # posterior mean (B, d, h, w)

    def decode(self, z):
        with torch.autocast(z.device.type, enabled=False):
            return self.vae.decode(z.float())


# ----------------------------------------------------------------------------- diffusers autoencoders

DIFFUSERS_PREFIX = "diffusers:"
DCAE_FOLDER = "diffusers"           # train_vae.py --arch dcae writes OUT/diffusers beside OUT/last.pt
MLSR_FILE = "freqldm.json"          # ... with its --mlsr-fractions and where its scaling_factor came from
DEFAULT_IMAGE_SIZE = 256            # image side for autoencoders without a native one, unless --image-size
DIFFUSERS_CLASSES = ("AutoencoderKL", "AutoencoderDC", "AutoencoderKLWan", "AutoencoderKLLTXVideo")
VIDEO_CLASSES = ("AutoencoderKLWan", "AutoencoderKLLTXVideo")


def parse_diffusers_spec(spec):
    """'diffusers:SOURCE[#SUBFOLDER]' -> (SOURCE, SUBFOLDER or None). SOURCE is a local folder or a hub id."""
    body = spec[len(DIFFUSERS_PREFIX):]
    if "#" in body and not os.path.isdir(body):
        source, _, sub = body.rpartition("#")
    else:
        source, sub = body, ""
    if not source:
        raise UserError(f"--vae {spec}: name a hub id or a local folder after 'diffusers:', e.g. "
                        f"diffusers:stabilityai/sd-vae-ft-ema or diffusers:/models/Wan2.2-TI2V-5B-Diffusers#vae")
    return source, sub.strip("/") or None


def weights_hash(model, class_name):
    """sha256 (16 hex digits) of the class, its architecture config and every weight tensor as loaded.

    The same weights give the same hash wherever they are read from (a hub cache or a local copy,
    safetensors or .bin, sharded or not); any changed weight or architecture gives another.
    """
    h = hashlib.sha256(class_name.encode())
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    h.update(repr(sorted(cfg.items())).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


class DiffusersAutoencoder(FrozenAutoencoder):
    """A pretrained diffusers autoencoder, frozen, in float32 with autocast off.

        AutoencoderKL (SD-VAE, SDXL, FLUX f8c16)  encode: posterior mean            decode: .sample
        AutoencoderDC (DC-AE)                     encode: its deterministic latent  decode: .sample
        AutoencoderKLWan (Wan2.1 / 2.2)           one frame: (B, 3, 1, H, W) in, the frame axis squeezed out
        AutoencoderKLLTXVideo (LTX-Video)         one frame; decoded at timestep 0 without noise when the
                                                  decoder is timestep-conditioned, with seeded injected noise
    Decoded images are clamped to [-1, 1]. The latent statistics in the model's config are ignored: the run
    computes per-channel statistics of its own latents (stats is None); its `scaling_factor` and
    `shift_factor` are kept for --latent-norm scalar (z_n = (z - shift) * scale, as diffusers' pipelines).
    """

    def __init__(self, model, class_name, name, content_hash, spec):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.class_name, self.name, self.content_hash, self.spec = class_name, name, content_hash, spec
        cfg = model.config
        self.latent_dim = cfg["z_dim"] if class_name == "AutoencoderKLWan" else cfg["latent_channels"]
        self.downsample = int(getattr(model, "spatial_compression_ratio", 0) or 2 ** (len(cfg["block_out_channels"]) - 1))
        self.video = class_name in VIDEO_CLASSES
        self.scaling_factor, self.shift_factor = cfg.get("scaling_factor"), cfg.get("shift_factor") or 0.0

    @classmethod
    def from_pretrained(cls, spec, device="cpu"):
        """Load `diffusers:SOURCE[#SUBFOLDER]` with diffusers' from_pretrained (hub ids need the network or its cache)."""
        source, sub = parse_diffusers_spec(spec)
        where = source + (f" (subfolder {sub})" if sub else "")
        try:
            import diffusers
        except ImportError:
            raise UserError(f"--vae {spec} needs the diffusers package: pip install diffusers==0.42.1") from None
        if os.path.isdir(source):
            folder = os.path.join(source, sub) if sub else source
            if not os.path.isfile(os.path.join(folder, "config.json")):
                hint = (f"; the autoencoder of a pipeline folder is in its vae/ subfolder: diffusers:{source}#vae"
                        if not sub and os.path.isfile(os.path.join(source, "vae", "config.json")) else "")
                raise UserError(f"{folder} is not a diffusers model folder (it has no config.json){hint}")
        elif os.path.isabs(source) or source.startswith(".") or source.count("/") != 1:
            raise UserError(f"--vae {spec}: there is no folder {source}, and it is not a hub id (OWNER/NAME)")
        quiet = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()
        try:
            try:
                config = diffusers.AutoencoderKL.load_config(source, subfolder=sub)
            except Exception as e:
                hint = ("its config.json is not a readable diffusers config" if os.path.isdir(source) else
                        "offline, download it once and pass the local folder")
                raise UserError(f"cannot read the config of {where} ({type(e).__name__}: {_first_line(e)}); "
                                f"{hint}") from None
            found = config.get("_class_name")
            if found is not None and found not in DIFFUSERS_CLASSES:
                raise UserError(f"{where} holds a {found}, not an autoencoder this project can use "
                                f"({', '.join(DIFFUSERS_CLASSES)})")
            errors, keys = [], {k for k in config if not k.startswith("_")}
            # without _class_name: in turn, each class whose constructor takes every key of the config
            fits = [c for c in DIFFUSERS_CLASSES if keys <= set(inspect.signature(getattr(diffusers, c)).parameters)]
            for class_name in ([found] if found else fits):
                try:
                    model, info = getattr(diffusers, class_name).from_pretrained(
                        source, subfolder=sub, torch_dtype=torch.float32, output_loading_info=True)
                except Exception as e:
                    errors.append(f"{class_name}: {type(e).__name__}: {_first_line(e)}")
                    continue
                bad = {k: v for k, v in info.items() if v}           # missing / unexpected / mismatched weights
                if not bad:
                    break
                errors.append(f"{class_name}: weights do not fit ({', '.join(sorted(bad))})")
            else:
                raise UserError(f"{where} does not load as a diffusers autoencoder ({', '.join(DIFFUSERS_CLASSES)})"
                                + (f": {'; '.join(errors)[:300]}" if errors else ""))
        finally:
            diffusers.utils.logging.set_verbosity(quiet)
        model = model.float()
        ae = cls(model, class_name, f"{class_name} {where}", weights_hash(model, class_name), spec)
        ae.scale_source = ("as its diffusers config gives it (its publisher's value, not measured here)"
                           if ae.scaling_factor is not None else "its diffusers config has no scaling_factor")
        mlsr = os.path.join(source, sub or "", MLSR_FILE)
        if os.path.isfile(mlsr):                   # a DC-AE of train_vae.py: S_l with the p_l it was trained with
            ae.read_training_record(mlsr)
        return ae.to(device)

    def read_training_record(self, path):
        """A DC-AE of train_vae.py (its folder's freqldm.json): the MLSR fractions it was trained with, which S_l
        uses and which join its content hash (another p_l gives other latents at every level > 0), and the
        scaling_factor Stage 1 measured, if it did (until then its config holds diffusers' default: no scale)."""
        try:
            with open(path) as f:
                rec = json.load(f)
            fractions = rec["mlsr_fractions"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a readable freqldm.json of train_vae.py ({type(e).__name__}: "
                            f"{_first_line(e)})") from None
        self.mlsr_fractions = fft_ops.check_fractions(fractions, f"{path} (mlsr_fractions)")
        if self.mlsr_fractions != tuple(fft_ops.MLSR_FRACTIONS):
            key = f"{self.content_hash}:{self.mlsr_fractions!r}".encode()
            self.content_hash = hashlib.sha256(key).hexdigest()[:16]
        scale, config_scale = rec.get("scaling_factor"), self.scaling_factor
        if isinstance(scale, dict) and scale.get("value") == config_scale:
            self.scale_source = f"measured by train_vae.py: {scale['source']}"
            return
        self.scaling_factor = None
        self.scale_source = (f"its config's scaling_factor {config_scale} is not the {scale['value']} measured by "
                             f"train_vae.py, which {path} records: the folder was edited"
                             if isinstance(scale, dict) else
                             f"its config's scaling_factor {config_scale} is not a measurement ({path} records none: "
                             f"Stage 1 measures it at its last step)")

    def _check_latent(self, x, z):
        if z.shape[-1] * self.downsample != x.shape[-1] or z.shape[-2] * self.downsample != x.shape[-2]:
            raise UserError(f"{self.name} turned a {tuple(x.shape[-2:])} image into a {tuple(z.shape[-2:])} latent, "
                            f"not the 1/{self.downsample} its config declares")
        return z

    @torch.no_grad()
    def encode(self, x):
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.class_name == "AutoencoderDC":
                z = self.model.encode(x).latent
            elif self.video:
                z = self.model.encode(x[:, :, None]).latent_dist.mean[:, :, 0]        # one frame
            else:
                z = self.model.encode(x).latent_dist.mean
            return self._check_latent(x, z.float())

    @torch.no_grad()
    def decode(self, z):
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            if z.shape[1] != self.latent_dim:
                raise ValueError(f"latent has {z.shape[1]} channels but {self.name} decodes {self.latent_dim}")
            if self.class_name == "AutoencoderKLLTXVideo":
                x = self._decode_ltx(z[:, :, None])[:, :, 0]
            elif self.video:
                x = self.model.decode(z[:, :, None]).sample[:, :, 0]
            else:
                x = self.model.decode(z).sample
            return x.float().clamp(-1, 1)

    def _decode_ltx(self, z):
        """LTX at decode timestep 0 (its pipeline's default); the decoder's injected noise from a fixed seed."""
        temb = torch.zeros(z.shape[0], device=z.device) if self.model.config["timestep_conditioning"] else None
        devices = [z.device] if z.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            return self.model.decode(z, temb).sample


def _first_line(e):
    return (str(e).strip().splitlines() or [""])[0][:200]


def load_autoencoder(spec, device="cpu"):
    """The frozen autoencoder named by --vae: a Stage-1 checkpoint path or run folder, its exported folder
    (evaluate.py export), or diffusers:HUB_ID_OR_FOLDER[#SUBFOLDER]."""
    if spec.startswith(DIFFUSERS_PREFIX):
        return DiffusersAutoencoder.from_pretrained(spec, device)
    if not os.path.exists(spec):
        raise UserError(f"no VAE at {spec}: train one with `python train_vae.py` (it writes runs/vae/last.pt), "
                        f"pass --vae PATH, or a pretrained one as --vae diffusers:HUB_ID_OR_FOLDER")
    spec = checkpoint_path(spec, "--vae")                       # a run folder: its last.pt
    if os.path.isdir(spec):                                     # evaluate.py export of a Stage-1 checkpoint
        return ViTVAEAutoencoder.from_export(spec, device)
    return ViTVAEAutoencoder.from_checkpoint(spec, device)


def resolve_image_size(ae, size=None):
    """The image side for `ae`: `size` if given, else its native size, else DEFAULT_IMAGE_SIZE; checked."""
    size = size or ae.image_size or DEFAULT_IMAGE_SIZE
    ae.check_image_size(size)
    return size


def _map_path(spec, fn):
    """Apply fn to the local path inside an autoencoder spec (a checkpoint path, or a diffusers folder)."""
    if spec.startswith(DIFFUSERS_PREFIX):
        source, sub = parse_diffusers_spec(spec)
        return DIFFUSERS_PREFIX + fn(source) + (f"#{sub}" if sub else "")
    return fn(spec)


def spec_exists(spec):
    if spec.startswith(DIFFUSERS_PREFIX):
        return os.path.isdir(parse_diffusers_spec(spec)[0])
    return os.path.exists(spec)


def absolute_spec(spec):
    """The spec with its local path made absolute (hub ids unchanged): recorded in SiT checkpoints."""
    if spec.startswith(DIFFUSERS_PREFIX) and not spec_exists(spec):
        return spec
    return _map_path(spec, os.path.abspath)


def locate_autoencoder(rec, ckpt_path):
    """The autoencoder spec recorded in a SiT checkpoint (rec = ck['autoencoder']), found on this machine: the
    absolute spec, then as given (relative to the working directory), then relative to the checkpoint's
    folder; a hub id (or a spec found nowhere) is returned as recorded."""
    base = os.path.dirname(os.path.abspath(ckpt_path))
    candidates = (rec.get("abs_spec"), rec["spec"], _map_path(rec["spec"], lambda p: os.path.join(base, p)))
    return next((s for s in candidates if s and spec_exists(s)), rec["spec"])


def load_vae(path, device="cpu", use_ema=True):
    """A frozen ViTVAE module from a Stage-1 checkpoint, and the checkpoint dict."""
    ae = ViTVAEAutoencoder.from_checkpoint(path, device, use_ema)
    return ae.vae, ae.checkpoint


class LatentSpace:
    """The diffusion model's view of an autoencoder's latents, from the run's statistics.

    normalize:       z_n = (z - mean) / std, per channel; with one scalar scale (scalar_stats, --latent-norm
                     scalar) mean = shift and std = 1 / scale in every channel: z_n = (z - shift) * scale
    at_level:        z^(l) = S_l(z_n) with the autoencoder's p_l (Denoising-VAE Eq. 3, 5), divided by its
                     per-channel std when `renorm` (S_l lowers the variance: ~1.0 / .94 / .87 / .78 for l = 0..3)
    to_autoencoder:  a generated z^(l) at the run's level back to z, for decoding
    """

    def __init__(self, stats, fractions, level=0, renorm=False, device="cpu"):
        self.mean = stats["mean"].view(1, -1, 1, 1).to(device)
        self.std = stats["std"].view(1, -1, 1, 1).to(device)
        self.fractions, self.level, self.renorm = tuple(fractions), level, renorm
        if renorm and stats.get("level_std") is None:
            raise UserError("per-level re-normalisation needs per-level statistics, which these statistics lack")
        self.level_std = stats["level_std"].to(device) if renorm else None

    def normalize(self, z):
        return (z - self.mean) / self.std

    def denormalize(self, z):
        return z * self.std + self.mean

    def level_scale(self, level):
        """Per-channel divisor of S_l(z_n): its std with renorm, else 1. (1, C, 1, 1)."""
        return self.level_std[level].view(1, -1, 1, 1) if self.renorm else torch.ones_like(self.std)

    def at_level(self, z, level):
        return fft_ops.attenuate(z, level, self.fractions) / self.level_scale(level)

    def to_autoencoder(self, z):
        return self.denormalize(z * self.level_scale(self.level))


def scalar_stats(ae, scale=None):
    """Latent 'statistics' of one scalar scale for all channels (SD-VAE's 0.18215, DC-AE's scaling_factor):
    `scale` if given, else the autoencoder's own scaling_factor (with its shift_factor); a LatentSpace of
    them computes z_n = (z - shift) * scale."""
    shift = ae.shift_factor if scale is None else 0.0
    if scale is None:
        scale = ae.scaling_factor
        if scale is None:
            raise UserError(f"{ae.name} has no scaling factor to use ({ae.scale_source}): pass --latent-scale "
                            f"VALUE with --latent-norm scalar")
        what = (f"the scaling_factor {scale:g}" + (f" and shift_factor {shift:g}" if shift else "")
                + f" of {ae.name}, {ae.scale_source}")
    else:
        what = f"the given --latent-scale {scale:g}"
    C = ae.latent_dim
    return {"norm": "scalar", "scale": float(scale), "shift": float(shift),
            "mean": torch.full((C,), float(shift)), "std": torch.full((C,), 1.0 / float(scale)),
            "source": f"one scalar for all {C} channels: z_n = (z - {shift:g}) * {scale:g}, {what}"}


def psnr(x, y):
    """PSNR in dB of images in [-1, 1] (data range 2), per image (B,)."""
    mse = (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-12))


@torch.no_grad()
def level_scores(ae, x, hf_radius=0.25):
    """Per MLSR level l: PSNR of D(S_l(z)) against x and the latent HF ratio of S_l(z), per image (B,) each.

    The validation reconstruction of Stage 1 and the rows of `evaluate.py recon` (Denoising-VAE Table 4).
    """
    z = ae.encode(x)                                                       # (B, C, h, w)
    out = []
    for level in range(len(ae.mlsr_fractions)):
        zl = fft_ops.attenuate(z, level, ae.mlsr_fractions)
        r = ae.decode(zl).clamp(-1, 1)
        out.append((r, psnr(r, x), fft_ops.latent_hf_ratio(zl, hf_radius)))
    return out


# ----------------------------------------------------------------------------- FreqWarm Finding 3

R0_SWEEP = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.71)     # RGB low-pass radii r0 (cycles/pixel) of F3


@torch.no_grad()
def f3_scores(ae, x, normalize, r0, hf_radius=0.25):
    """FreqWarm Finding 3 at one r0, per image (B,) each: the high-frequency energy of z_n = normalize(E(lowpass(x,
    r0))) (mean square of its band at radius > hf_radius, per-channel spatial mean removed first) and its HF ratio.

    Finding 3: past some r0, more RGB high frequency *lowers* this energy (encoder aliasing); FreqWarm's r0 sits
    at the peak. `evaluate.py diagnose` plots it over R0_SWEEP; `train_diffusion.py --r0 auto` picks its peak.
    """
    zr = normalize(ae.encode(fft_ops.lowpass(x, r0)))                      # (B, C, h, w)
    zr = zr - zr.mean(dim=(-2, -1), keepdim=True)
    _, high = fft_ops.split_frequencies(zr, hf_radius)
    return high.pow(2).mean(dim=(1, 2, 3)), fft_ops.latent_hf_ratio(zr, hf_radius)


@torch.no_grad()
def f3_curve(ae, batches, normalize, device, r0_sweep=R0_SWEEP, hf_radius=0.25):
    """F3's latent HF energy per r0 of `r0_sweep`, averaged over image `batches` (this rank's share; summed over
    ranks, so every rank gets the same curve). A list of floats."""
    acc = torch.zeros(len(r0_sweep) + 1, dtype=torch.float64, device=device)     # per-r0 sums, image count
    for x in batches:
        x = x.to(device, non_blocking=True).float()
        for i, r0 in enumerate(r0_sweep):
            acc[i] += f3_scores(ae, x, normalize, r0, hf_radius)[0].double().sum()
        acc[-1] += len(x)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(acc)
    if acc[-1].item() == 0:
        raise UserError("no images to compute the F3 curve from")
    return (acc[:-1] / acc[-1]).tolist()


def f3_peak(r0_sweep, energy):
    """The r0 at the F3 curve's interior peak (its argmax, when that is at neither end of the sweep), else None:
    a curve highest at the largest r0 rises throughout (no aliasing turn-over), one highest at the smallest falls."""
    i = max(range(len(energy)), key=lambda j: energy[j])
    return r0_sweep[i] if 0 < i < len(r0_sweep) - 1 else None


F3_SUBSETS = 4          # disjoint image subsets the F3 curve is measured on, for its spread (our rule, see below)


def f3_peak_test(r0_sweep, subset_curves):
    """Does F3's interior peak stand above the curve's own noise? (Our rule for --r0 auto, not the paper's: it
    chose r0 = 0.2 by a gFID ablation over 0.05 / 0.2 / 0.4.)

    subset_curves (K, len(r0_sweep)): the curve measured on K >= 2 disjoint image subsets. The candidate is the
    interior argmax of their mean; its height above the curve's higher end is taken per subset,
    h_k = c_k[peak] - max(c_k[first], c_k[last]), and the peak stands when mean(h) > std(h) (sample std over
    the subsets): higher than the subset-to-subset spread of that very height, with no tuned constant.
    Returns a dict: mean / std curves, the candidate peak (None: no interior maximum), height, its std, stands.
    """
    c = np.asarray(subset_curves, dtype=np.float64)                                   # (K, R)
    if c.ndim != 2 or len(c) < 2:
        raise ValueError(f"f3_peak_test needs curves of at least 2 image subsets, got shape {c.shape}")
    out = {"n_subsets": len(c), "mean": c.mean(0).tolist(), "std": c.std(0, ddof=1).tolist(),
           "peak": f3_peak(list(r0_sweep), c.mean(0).tolist()), "height": None, "height_std": None, "stands": False}
    if out["peak"] is not None:
        h = c[:, list(r0_sweep).index(out["peak"])] - np.maximum(c[:, 0], c[:, -1])    # (K,)
        out.update(height=float(h.mean()), height_std=float(h.std(ddof=1)), stands=bool(h.mean() > h.std(ddof=1)))
    return out


def describe_peak_height(test):
    """The F3 test's peak in words: 'peak at r0 = R, H ± S above the higher end' (or that there is none)."""
    if test["peak"] is None:
        return "no interior peak"
    return f"peak at r0 = {test['peak']:g}, {test['height']:.3g} ± {test['height_std']:.2g} above the higher end"


def describe_f3(r0_sweep, test):
    """One line: the F3 curve as mean ± std over its image subsets, and the peak with its height."""
    curve = ", ".join(f"{r:g}: {m:.4g} ± {s:.2g}" for r, m, s in zip(r0_sweep, test["mean"], test["std"]))
    return f"{curve} (mean ± std over {test['n_subsets']} disjoint image subsets; {describe_peak_height(test)})"


# ----------------------------------------------------------------------------- latent statistics

@torch.no_grad()
def latent_stats(encode, latent_dim, batches, device, fractions=fft_ops.MLSR_FRACTIONS):
    """Per-channel mean / std of latents over image `batches` (this rank's share; summed over ranks).

    Also, per MLSR level l, the per-channel std of S_l(z_n) with z_n = (z - mean) / std: the variance
    that --denoise-level removes (S_l keeps DC, so S_l(z_n) keeps mean 0). Sums are float64.
    """
    L = len(fractions)
    acc = torch.zeros(2 + L, latent_dim, dtype=torch.float64, device=device)   # sum, sum sq, sum sq of S_l(z)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    for x in batches:
        z = encode(x.to(device, non_blocking=True)).float()                    # (b, C, h, w)
        count += z.shape[0] * z.shape[2] * z.shape[3]
        acc[0] += z.double().sum(dim=(0, 2, 3))
        acc[1] += z.double().pow(2).sum(dim=(0, 2, 3))
        for level in range(L):
            acc[2 + level] += fft_ops.attenuate(z, level, fractions).double().pow(2).sum(dim=(0, 2, 3))
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(acc), torch.distributed.all_reduce(count)
    if count.item() == 0:
        raise UserError("no images to compute latent statistics from")
    mean = acc[0] / count
    std = (acc[1] / count - mean ** 2).clamp(min=1e-12).sqrt()
    level_std = (acc[2:] / count - mean ** 2).clamp(min=1e-12).sqrt() / std    # (L, C)
    return {"mean": mean.float().cpu(), "std": std.float().cpu(), "level_std": level_std.float().cpu()}


def dataset_latent_stats(ae, dataset, n_images, seed, d, batch=64, workers=0, val_images=0):
    """latent_stats over a seeded random subset of n_images of the *training* images of `dataset` (all
    classes), sharded over ranks: the `val_images` held out for validation (data.train_val_split with `seed`)
    are never among them.

    The result records what it was computed from (subset size and seed, the held-out split, resolution, data
    fingerprint), so a consumer can tell whether the statistics belong to its data and split.
    """
    train_idx, _ = train_val_split(len(dataset), val_images, seed)
    idx = [train_idx[i] for i in random_subset(len(train_idx), n_images, seed)]
    batches = image_batches(dataset, idx[d.rank::d.world_size], batch, workers)
    stats = latent_stats(ae.encode, ae.latent_dim, batches, d.device, ae.mlsr_fractions)
    stats.update(n_images=len(idx), seed=seed, val_images=val_images, image_size=dataset.resolution,
                 data=fingerprint(dataset),
                 source=f"computed over {len(idx)} random training images (seed {seed}; the {val_images} "
                        f"held-out validation images excluded)")
    return stats


if __name__ == "__main__":
    for name in SIZES:
        n = sum(p.numel() for p in build_vae(name, 256 if name.startswith("f16") else 32).parameters())
        print(f"{name:8s} {n / 1e6:8.2f}M parameters")
