"""Frequency toolbox shared by every stage of FreqLDM.

    python fft_ops.py                      # CPU: print a small self-check of the conventions
    (library module: imported by train_vae.py, train_diffusion.py and evaluate.py;
     it has no single-GPU / torchrun / multi-node entry point of its own)

Conventions (the README's "Conventions"):
- Radius is measured in cycles per pixel from torch.fft.fftfreq: 0.5 is the Nyquist
  frequency along one axis, sqrt(0.5) ~ 0.707 the corner of the spectrum.
- Every mask here is a function of the radius only, so it is Hermitian-symmetric
  (M[k] == M[-k]) and the filtered signal stays real. That lets us use rfft2/irfft2,
  which give the same result as the full fft2 definition at about half the cost.
- FFTs are computed in float32 whatever the input dtype (bfloat16 has no FFT and too
  little precision); outputs are cast back to the input dtype.

Contents, in the order the papers use them:
  radius_grid, centered_fft2 / centered_ifft2   -- the basic grid and spectra
  lowpass_mask, apply_mask, split_frequencies   -- FreqWarm Sec. 3 (Z_low / Z_high)
  lowpass                                       -- FreqWarm Sec. 4 (RGB low-pass at r0)
  attenuation_mask, attenuate                   -- Denoising-VAE Eq. 3 (latent S_l)
  gaussian_blur                                 -- Denoising-VAE Eq. 4 (image G_l)
  radial_power_spectrum, high_freq_energy_ratio,
  latent_hf_ratio                               -- diagnostics (FreqWarm Findings 1-3)
"""
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

MAX_RADIUS = math.sqrt(0.5)          # corner of the spectrum in cycles/pixel (~0.7071)
R0_RANGE = (0.0, 0.71)               # valid FreqWarm radii: (0, 0.71]
MLSR_FRACTIONS = (0.0, 0.25, 0.5, 0.75)   # p_l: fraction of latent bins removed by S_l
MLSR_SIGMAS = (0.0, 0.05, 0.25, 0.5)      # sigma_l in pixels for G_l (Eq. 4)
MASK_KINDS = ("ideal", "butterworth", "gaussian")


def check_r0(r0):
    """Raise a one-line ValueError unless r0 is in (0, 0.71]."""
    if not (R0_RANGE[0] < r0 <= R0_RANGE[1]):
        raise ValueError(f"r0 must be in (0, 0.71] cycles/pixel (0.5 = Nyquist, 0.707 = corner); got {r0}")
    return r0


def check_fractions(fractions, where="--mlsr-fractions"):
    """The MLSR fractions p_0..p_3 of Eq. 3 as a tuple of floats, or a one-line ValueError naming `where` (the flag
    or file they came from): four finite numbers in [0, 1), p_0 = 0 (level 0 is the autoencoder itself), each
    level removing at least as much as the one below."""
    try:
        p = tuple(float(v) for v in fractions)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: the MLSR fractions must be {len(MLSR_FRACTIONS)} numbers; "
                         f"got {fractions!r}") from None
    why = (f"{len(MLSR_FRACTIONS)} numbers are needed, one per level" if len(p) != len(MLSR_FRACTIONS) else
           "each must be a finite number" if not all(math.isfinite(v) for v in p) else
           "each must be in [0, 1) (a fraction of the latent bins removed)" if not all(0 <= v < 1 for v in p) else
           "p_0 must be 0 (level 0 is the unattenuated latent)" if p[0] != 0 else
           "they must not decrease from level to level" if any(b < a for a, b in zip(p, p[1:])) else None)
    if why:
        raise ValueError(f"{where}: invalid MLSR fractions {' '.join(f'{v:g}' for v in p)}: {why}")
    return p


# ----------------------------------------------------------------------------- grids and spectra

def radius_grid(h, w, device=None, half=False):
    """Radius sqrt(fy^2 + fx^2) in cycles/pixel, in fft (unshifted) order.

    Returns (h, w), or (h, w // 2 + 1) with half=True to match rfft2's output.
    """
    fy = torch.fft.fftfreq(h, device=device)                                        # (h,)
    fx = torch.fft.rfftfreq(w, device=device) if half else torch.fft.fftfreq(w, device=device)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)                          # (h, w')


def centered_fft2(x):
    """2-D FFT over the last two axes with the DC bin moved to the centre. (..., H, W) complex."""
    return torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))


def centered_ifft2(X):
    """Inverse of centered_fft2; returns the real part. (..., H, W) float32."""
    return torch.fft.ifft2(torch.fft.ifftshift(X, dim=(-2, -1))).real


# ----------------------------------------------------------------------------- radial masks

def lowpass_mask(h, w, r, kind="ideal", order=2, device=None, half=False):
    """Radial low-pass transfer function M(radius) on the fft grid. One meaning of r for every kind: the
    radius where the gain crosses 1/2, the middle of the hard circle's step, so the three kinds at one r0 cut
    the band at the same place and differ only in how sharply.

    ideal:       1 where radius <= r, else 0         (the FreqWarm authors' hard circle)
    butterworth: 1 / (1 + (radius / r)^(2 * order))   (order 2 by default; 1/2 at r)
    gaussian:    2^-(radius / r)^2 = exp(-ln 2 (radius / r)^2)   (1/2 at r; std r / sqrt(2 ln 2) = 0.85 r)
    """
    if r <= 0:
        raise ValueError(f"mask radius must be > 0, got {r}")
    rad = radius_grid(h, w, device=device, half=half)
    if kind == "ideal":
        return (rad <= r).float()
    if kind == "butterworth":
        return 1.0 / (1.0 + (rad / r) ** (2 * order))
    if kind == "gaussian":
        return torch.exp(-math.log(2.0) * (rad / r) ** 2)
    raise ValueError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")


def apply_mask(x, mask_half):
    """Filter x (..., H, W) by a Hermitian-symmetric mask given on the rfft grid (H, W//2+1).

    Equals ifft2(M * fft2(x)).real with the full mask, computed with rfft2/irfft2.
    """
    H, W = x.shape[-2:]
    X = torch.fft.rfft2(x.float())                       # (..., H, W//2+1) complex64
    return torch.fft.irfft2(X * mask_half, s=(H, W))     # (..., H, W) float32


def split_frequencies(x, r, kind="ideal"):
    """FreqWarm Sec. 3: split x (..., H, W) into (low, high) at radius r; low + high == x.

    DC is always in `low`. For the ideal mask the two parts are orthogonal, so their
    energies add up to the energy of x (Parseval).
    """
    H, W = x.shape[-2:]
    xf = x.float()
    low = apply_mask(xf, lowpass_mask(H, W, r, kind, device=x.device, half=True))
    high = xf - low
    return low.to(x.dtype), high.to(x.dtype)


def lowpass(images, r0, kind="ideal"):
    """FreqWarm: low-pass RGB images (B, 3, H, W) at radius r0 before the frozen encoder.

    Vectorised over batch and channels. With the ideal mask, r0 >= 0.7071 keeps every
    bin, so the input is returned unchanged.
    """
    if kind == "ideal" and r0 >= MAX_RADIUS:
        return images
    H, W = images.shape[-2:]
    out = apply_mask(images, lowpass_mask(H, W, r0, kind, device=images.device, half=True))
    return out.to(images.dtype)


# ----------------------------------------------------------------------------- MLSR: latent operator S_l

@functools.lru_cache(maxsize=64)
def _attenuation_mask_np(h, w, fraction):
    """Boolean keep-mask (h, w) in fft order removing ~fraction of the bins with largest radius.

    Bins are grouped into conjugate orbits {k, -k} (size 1 or 2) so the mask stays
    Hermitian-symmetric. Orbits are ranked by exact integer radius^2 (descending), ties
    broken by the orbit's smallest flat index (ascending), and removed in that order
    while the total stays <= round(fraction * h * w). DC is never removed.
    """
    ky = np.fft.fftfreq(h, 1.0 / h).astype(np.int64)     # integer frequencies
    kx = np.fft.fftfreq(w, 1.0 / w).astype(np.int64)
    r2 = (ky[:, None] * w) ** 2 + (kx[None, :] * h) ** 2  # radius^2 * (h w)^2, exact integers
    iy, ix = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    flat = iy * w + ix
    conj = ((-iy) % h) * w + ((-ix) % w)                  # flat index of -k
    rep = np.minimum(flat, conj).ravel()                  # orbit representative
    order = np.lexsort((rep, -r2.ravel()))                # radius desc, then rep asc
    budget = int(round(fraction * h * w))
    keep = np.ones(h * w, dtype=bool)
    removed, seen = 0, set()
    for idx in order:
        o = rep[idx]
        if o in seen:
            continue
        members = {int(flat.ravel()[idx]), int(conj.ravel()[idx])}
        if removed + len(members) > budget or o == 0:      # o == 0 is the DC orbit
            break
        seen.add(o)
        for m in members:
            keep[m] = False
        removed += len(members)
    return keep.reshape(h, w)


def attenuation_mask(h, w, level, fractions=MLSR_FRACTIONS, device=None):
    """Denoising-VAE Eq. 3 mask M_l as float (h, w) in fft order (1 = keep); kept per device (read only),
    so a training step copies nothing from the host."""
    return _attenuation_mask_on(h, w, float(fractions[level]), torch.device(device or "cpu"))


@functools.lru_cache(maxsize=64)
def _attenuation_mask_on(h, w, fraction, device):
    return torch.from_numpy(_attenuation_mask_np(h, w, fraction).astype(np.float32)).to(device)


def attenuate(z, level, fractions=MLSR_FRACTIONS):
    """Denoising-VAE Eq. 3: S_l(z) = F^-1(M_l * F(z)) on latents (B, C, h, w).

    Level l removes the fraction p_l of latent frequency bins with the largest radius
    (our reading of "attenuate the highest frequencies"; README, "Known ambiguities"). l = 0 is the identity.
    """
    level = int(level)
    if not 0 <= level < len(fractions):
        raise ValueError(f"MLSR level must be in 0..{len(fractions) - 1}, got {level}")
    if fractions[level] == 0:
        return z
    h, w = z.shape[-2:]
    m = attenuation_mask(h, w, level, fractions, device=z.device)[:, : w // 2 + 1]
    return apply_mask(z, m).to(z.dtype)


# ----------------------------------------------------------------------------- MLSR: image operator G_l

def _reflect_index(n, pad, device):
    """Indices of a length-n axis padded by `pad` on both sides, scipy 'reflect' (d c b a | a b c d)."""
    idx = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def gaussian_kernel1d(sigma, truncate=4.0):
    """Normalised 1-D Gaussian taps with radius int(truncate * sigma + 0.5), as scipy.ndimage."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


@functools.lru_cache(maxsize=64)
def _gaussian_taps_on(sigma, truncate, device):
    """gaussian_kernel1d kept per device (read only): a training step copies nothing from the host."""
    return gaussian_kernel1d(sigma, truncate).to(device)


def gaussian_blur(x, sigma, truncate=4.0):
    """Denoising-VAE Eq. 4: separable Gaussian blur of x (B, C, H, W), reflect padding.

    Matches scipy.ndimage.gaussian_filter(mode='reflect') per channel. sigma == 0 is the
    identity. Note: with truncate 4, sigma < 0.125 px has a single tap (also the identity).
    """
    if sigma == 0:
        return x
    k = _gaussian_taps_on(float(sigma), float(truncate), x.device)      # (K,)
    pad = (k.numel() - 1) // 2
    if pad == 0:
        return x
    B, C, H, W = x.shape
    with torch.autocast(x.device.type, enabled=False):          # a target: float32 even inside bf16 autocast
        xf = x.float()
        xf = xf.index_select(2, _reflect_index(H, pad, x.device))     # (B, C, H + 2p, W)
        xf = F.conv2d(xf, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
        xf = xf.index_select(3, _reflect_index(W, pad, x.device))     # (B, C, H, W + 2p)
        xf = F.conv2d(xf, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return xf.to(x.dtype)


# ----------------------------------------------------------------------------- diagnostics

def radial_power_spectrum(x, nbins=None):
    """Radially averaged power spectrum of x (B, C, H, W), averaged over batch and channels.

    Uses the orthonormal FFT, so white noise of variance s^2 has flat power s^2.
    Bins are 1 / min(H, W) wide. Returns (radius centres, power), each (nbins,).
    """
    H, W = x.shape[-2:]
    n = min(H, W)
    P = torch.fft.fft2(x.float(), norm="ortho").abs().pow(2).mean(dim=tuple(range(x.dim() - 2)))  # (H, W)
    b = torch.round(radius_grid(H, W, device=x.device) * n).long()                              # (H, W)
    nbins = nbins or int(b.max().item()) + 1
    b = b.clamp(max=nbins - 1).flatten()
    total = torch.zeros(nbins, device=x.device).index_add_(0, b, P.flatten())
    count = torch.zeros(nbins, device=x.device).index_add_(0, b, torch.ones_like(P.flatten()))
    radii = torch.arange(nbins, device=x.device, dtype=torch.float32) / n
    return radii, total / count.clamp(min=1)


def high_freq_energy_ratio(x, r):
    """Fraction of spectral energy at radius > r, per sample of x (B, C, H, W) -> (B,)."""
    H, W = x.shape[-2:]
    P = torch.fft.fft2(x.float()).abs().pow(2)                 # (B, C, H, W)
    high = (radius_grid(H, W, device=x.device) > r).float()
    return (P * high).sum(dim=(1, 2, 3)) / P.sum(dim=(1, 2, 3)).clamp(min=1e-20)


def latent_hf_ratio(z, r):
    """The latent high-frequency ratio used everywhere: high_freq_energy_ratio of z with each channel's
    mean (DC) removed first, per sample of z (B, C, h, w) -> (B,)."""
    return high_freq_energy_ratio(z - z.float().mean(dim=(-2, -1), keepdim=True), r)


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g)
    low, high = split_frequencies(x, 0.2)
    print(f"split: max |low + high - x| = {(low + high - x).abs().max():.2e}")
    frac = (radius_grid(256, 256) <= 0.2).float().mean()
    print(f"r0 = 0.2 keeps {100 * frac:.1f}% of the bins of a 256x256 image")
    for lvl in range(4):
        kept = attenuation_mask(16, 16, lvl).mean()
        print(f"S_{lvl} on a 16x16 latent keeps {100 * kept:.1f}% of the bins")
