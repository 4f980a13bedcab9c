"""fft_ops against independent numpy / scipy references."""
import numpy as np
import pytest
import scipy.ndimage
import torch

import fft_ops

SIZES = [(16, 16), (17, 23), (32, 20), (9, 9)]


def numpy_lowpass(x, r0):
    """Reference: full numpy FFT, fftshift, hard circle radius <= r0 in cycles/pixel."""
    H, W = x.shape[-2:]
    X = np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1))
    fy = np.fft.fftshift(np.fft.fftfreq(H))
    fx = np.fft.fftshift(np.fft.fftfreq(W))
    mask = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) <= r0
    return np.fft.ifft2(np.fft.ifftshift(X * mask, axes=(-2, -1))).real


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("r0", [0.05, 0.2, 0.4, 0.55, 0.65])
def test_lowpass_matches_numpy(hw, r0):
    """0.55 and 0.65 lie in the corner band between axis Nyquist (0.5) and the corner (0.707)."""
    x = np.random.default_rng(1).standard_normal((3, 3, *hw))
    got = fft_ops.lowpass(torch.from_numpy(x).float(), r0).numpy()
    np.testing.assert_allclose(got, numpy_lowpass(x, r0), atol=1e-5)


@pytest.mark.parametrize("kind", fft_ops.MASK_KINDS)
def test_rfft_path_equals_full_fft(kind):
    x = torch.randn(2, 3, 15, 18)
    m = fft_ops.lowpass_mask(15, 18, 0.2, kind)
    full = torch.fft.ifft2(torch.fft.fft2(x) * m)
    assert full.imag.abs().max() < 1e-5            # symmetric mask -> real output
    half = fft_ops.apply_mask(x, fft_ops.lowpass_mask(15, 18, 0.2, kind, half=True))
    torch.testing.assert_close(half, full.real, atol=1e-5, rtol=0)


def test_centered_fft_roundtrip_and_dc_position():
    x = torch.randn(2, 4, 11, 12)
    X = fft_ops.centered_fft2(x)
    torch.testing.assert_close(X[..., 11 // 2, 12 // 2].real, x.sum(dim=(-2, -1)), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(fft_ops.centered_ifft2(X), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", fft_ops.MASK_KINDS)
@pytest.mark.parametrize("hw", SIZES)
def test_split_sums_to_input_and_keeps_dc(kind, hw):
    x = torch.randn(2, 3, *hw) + 5.0
    low, high = fft_ops.split_frequencies(x, 0.15, kind)
    torch.testing.assert_close(low + high, x, atol=1e-5, rtol=0)
    # the low band itself against a numpy filter with the closed-form transfer function
    H, W = hw
    rad = np.sqrt(np.fft.fftfreq(H)[:, None] ** 2 + np.fft.fftfreq(W)[None, :] ** 2)   # radius 0.15 is on the 32x20 grid
    m = {"ideal": rad <= 0.15 + 1e-9, "butterworth": 1 / (1 + (rad / 0.15) ** 4),
         "gaussian": 0.5 ** ((rad / 0.15) ** 2)}[kind]
    ref = np.fft.ifft2(np.fft.fft2(x.double().numpy()) * m).real
    np.testing.assert_allclose(low.numpy(), ref, atol=1e-4)
    # DC (the mean) is entirely in the low band
    torch.testing.assert_close(high.mean(dim=(-2, -1)), torch.zeros(2, 3), atol=1e-4, rtol=0)


def test_parseval_energy_split_ideal():
    x = torch.randn(4, 3, 24, 31)
    low, high = fft_ops.split_frequencies(x, 0.2)
    e = lambda t: t.pow(2).sum().item()
    assert e(low) + e(high) == pytest.approx(e(x), rel=1e-5)
    # the low band holds exactly the spectral energy inside the circle (numpy, Parseval)
    X = np.fft.fft2(x.double().numpy())
    inside = np.sqrt(np.fft.fftfreq(24)[:, None] ** 2 + np.fft.fftfreq(31)[None, :] ** 2) <= 0.2
    assert e(low) == pytest.approx((np.abs(X) ** 2 * inside).sum() / (24 * 31), rel=1e-5)


@pytest.mark.parametrize("r0", [0.71, 1.0])
def test_lowpass_full_radius_is_identity(r0):
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(fft_ops.lowpass(x, r0), x)
    # r0 just above the corner keeps every bin with the explicit FFT path too
    torch.testing.assert_close(fft_ops.apply_mask(x, fft_ops.lowpass_mask(16, 16, 0.7072, half=True)), x,
                               atol=1e-5, rtol=0)


def test_r0_validation():
    for bad in (0.0, -0.1, 0.72, 2.0):
        with pytest.raises(ValueError, match="r0 must be in"):
            fft_ops.check_r0(bad)
    assert fft_ops.check_r0(0.2) == 0.2 and fft_ops.check_r0(0.71) == 0.71


def test_r0_02_keeps_about_12_6_percent_of_256_bins():
    frac = (fft_ops.radius_grid(256, 256) <= 0.2).float().mean().item()
    assert abs(frac - np.pi * 0.2 ** 2) < 0.002          # circle area in the unit square


def test_masks_shapes_values():
    ideal = fft_ops.lowpass_mask(32, 32, 0.25, "ideal")
    bw = fft_ops.lowpass_mask(32, 32, 0.25, "butterworth")
    ga = fft_ops.lowpass_mask(32, 32, 0.25, "gaussian")
    rad = fft_ops.radius_grid(32, 32)
    at_r = (rad - 0.25).abs() < 1e-6
    assert at_r.any()
    assert torch.allclose(bw[at_r], torch.tensor(0.5))        # Butterworth is 1/2 at the cut-off
    assert torch.allclose(ga[at_r], torch.tensor(0.5))        # so is the Gaussian: one meaning of r for every kind
    at_2r = (rad - 0.5).abs() < 1e-6                           # 2 r: the Gaussian's 1/16, Butterworth's 1/17
    assert torch.allclose(ga[at_2r], torch.tensor(1 / 16)) and torch.allclose(bw[at_2r], torch.tensor(1 / 17))
    assert ideal[0, 0] == bw[0, 0] == ga[0, 0] == 1.0
    # ideal is a hard circle, inclusive at the radius
    torch.testing.assert_close(ideal, (rad <= 0.25).float())
    with pytest.raises(ValueError):
        fft_ops.lowpass_mask(8, 8, 0.2, "box")


def test_bfloat16_input_is_computed_in_float32():
    x = torch.randn(2, 3, 16, 16)
    out = fft_ops.lowpass(x.bfloat16(), 0.2)
    assert out.dtype == torch.bfloat16
    ref = torch.from_numpy(numpy_lowpass(x.bfloat16().double().numpy(), 0.2))
    # the float32 result rounded once to bfloat16: within half a bfloat16 ulp (2^-8 relative)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=2 ** -8)


# ----------------------------------------------------------------------------- MLSR S_l

def test_attenuate_level0_identity():
    z = torch.randn(2, 8, 16, 16)
    assert fft_ops.attenuate(z, 0) is z


@pytest.mark.parametrize("hw", [(16, 16), (8, 8), (15, 12), (7, 9)])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_attenuation_counts_symmetry_and_dc(hw, level):
    h, w = hw
    keep = fft_ops.attenuation_mask(h, w, level).numpy().astype(bool)
    removed = (~keep).sum()
    target = round(fft_ops.MLSR_FRACTIONS[level] * h * w)
    assert target - 1 <= removed <= target                # whole conjugate pairs only
    assert keep[0, 0]                                      # DC kept
    iy, ix = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    assert np.array_equal(keep, keep[(-iy) % h, (-ix) % w])   # Hermitian symmetric
    rad = fft_ops.radius_grid(h, w).numpy()
    assert rad[~keep].min() >= rad[keep].max() - 1e-9     # removed bins are the outermost


@pytest.mark.parametrize("level", [1, 2, 3])
def test_attenuate_matches_full_fft_and_is_real(level):
    z = torch.randn(2, 4, 12, 10, dtype=torch.float64)
    m = fft_ops.attenuation_mask(12, 10, level).double()
    full = torch.fft.ifft2(torch.fft.fft2(z) * m)
    assert full.imag.abs().max() < 1e-10
    out = fft_ops.attenuate(z.float(), level)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), full.real, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.mean(dim=(-2, -1)).double(), z.mean(dim=(-2, -1)), atol=1e-5, rtol=0)


def test_attenuation_deterministic_and_nested():
    m = [fft_ops.attenuation_mask(16, 16, l) for l in range(4)]
    for a, b in zip(m, m[1:]):
        assert torch.all(b <= a)                         # higher level removes a superset
    fft_ops._attenuation_mask_np.cache_clear()          # recompute rather than read the cache
    assert torch.equal(m[2], fft_ops.attenuation_mask(16, 16, 2))


@pytest.mark.parametrize("fraction", [0.999, 1.0])
def test_attenuation_that_would_reach_dc_keeps_dc(fraction):
    """A fraction that would remove every bin stops at DC: only the per-channel mean is left."""
    fractions = (0.0, fraction, 0.0, 0.0)
    keep = fft_ops.attenuation_mask(6, 8, 1, fractions)
    assert keep[0, 0] == 1 and keep.sum() == 1
    z = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    out = fft_ops.attenuate(z.float(), 1, fractions)
    torch.testing.assert_close(out.double(), z.mean(dim=(-2, -1), keepdim=True).expand_as(z), atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_butterworth_shape_away_from_the_cutoff(order):
    """1 / (1 + (rho / r)^(2n)): at twice the radius 1 / (1 + 4^n), at half the radius 1 / (1 + 4^-n)."""
    rad = fft_ops.radius_grid(32, 32)
    m = fft_ops.lowpass_mask(32, 32, 0.125, "butterworth", order=order)
    for ratio in (2.0, 0.5):
        at = (rad - ratio * 0.125).abs() < 1e-6
        assert at.any()
        torch.testing.assert_close(m[at], torch.full_like(m[at], 1 / (1 + ratio ** (2 * order))))
    if order == 2:                                       # the default order is 2
        torch.testing.assert_close(fft_ops.lowpass_mask(32, 32, 0.125, "butterworth"), m)


# ----------------------------------------------------------------------------- MLSR G_l

@pytest.mark.parametrize("sigma", [0.05, 0.25, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("hw", [(16, 16), (13, 19)])
def test_gaussian_blur_matches_scipy(sigma, hw):
    x = np.random.default_rng(2).standard_normal((2, 3, *hw)).astype(np.float32)
    got = fft_ops.gaussian_blur(torch.from_numpy(x), sigma).numpy()
    ref = scipy.ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect")
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_gaussian_blur_radius_larger_than_image():
    x = np.random.default_rng(3).standard_normal((1, 1, 5, 6)).astype(np.float32)
    got = fft_ops.gaussian_blur(torch.from_numpy(x), 3.0).numpy()
    ref = scipy.ndimage.gaussian_filter(x, sigma=(0, 0, 3.0, 3.0), mode="reflect")
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_gaussian_blur_sigma0_identity():
    x = torch.randn(1, 3, 8, 8)
    assert fft_ops.gaussian_blur(x, 0) is x


# ----------------------------------------------------------------------------- diagnostics

def test_radial_power_spectrum_white_noise_is_flat():
    x = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2.0
    r, p = fft_ops.radial_power_spectrum(x)
    assert r[0] == 0 and r.shape == p.shape
    inner = p[1:33]                                      # inside the Nyquist circle
    assert (inner / 4.0 - 1).abs().max() < 0.1           # flat at the variance 4


def test_radial_power_spectrum_known_sinusoid():
    H = W = 32
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    x = torch.cos(2 * np.pi * 4 * xx / W).float()[None, None]   # 4/32 = 0.125 cycles/pixel
    r, p = fft_ops.radial_power_spectrum(x)
    assert r[p.argmax()].item() == pytest.approx(0.125)


def test_high_freq_energy_ratio():
    H = W = 32
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    lo = torch.cos(2 * np.pi * 2 * xx / W).float()   # 0.0625 cycles/pixel
    hi = torch.cos(2 * np.pi * 12 * xx / W).float()  # 0.375 cycles/pixel
    x = torch.stack([lo, hi, lo + hi])[:, None]      # (3, 1, H, W)
    ratio = fft_ops.high_freq_energy_ratio(x, 0.2)
    torch.testing.assert_close(ratio, torch.tensor([0.0, 1.0, 0.5]), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fft_ops.lowpass(x.cuda(), 0.2).cpu(), fft_ops.lowpass(x, 0.2), atol=1e-5, rtol=0)
    torch.testing.assert_close(fft_ops.attenuate(x.cuda(), 2).cpu(), fft_ops.attenuate(x, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(fft_ops.gaussian_blur(x.cuda(), 0.5).cpu(), fft_ops.gaussian_blur(x, 0.5),
                               atol=1e-5, rtol=0)
