"""SiT, flow matching and samplers against closed forms and direct computation."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from dit import (SiT, build_sit, guided_velocity, interpolate, sample_ode, sample_sde, velocity_loss,
                 velocity_target)


def perturbed_sit(**kw):
    """A SiT whose zero-initialised layers are randomised, so outputs depend on x, t and y."""
    torch.manual_seed(0)
    m = SiT(**{**dict(input_size=4, in_channels=3, patch=2, width=32, depth=2, heads=2, num_classes=5), **kw})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def test_fresh_sit_outputs_zeros():
    m = build_sit("tiny/1", 8, 4, 10)
    out = m(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10]))
    assert out.shape == (3, 4, 8, 8) and torch.count_nonzero(out) == 0


def test_sit_xl2_parameter_count_is_675m():
    n = sum(p.numel() for p in build_sit("XL/2", 32, 4, 1000).parameters())
    print(f"SiT-XL/2 parameters: {n / 1e6:.1f}M (published 675M)")
    assert abs(n - 675e6) / 675e6 < 0.01


def test_channel_mismatch_error():
    with pytest.raises(ValueError, match="expects 3 latent channels"):
        perturbed_sit()(torch.randn(1, 4, 4, 4), torch.rand(1), torch.zeros(1, dtype=torch.long))


def test_return_hidden_and_hidden_only():
    m = perturbed_sit(depth=3)
    x, t, y = torch.randn(2, 3, 4, 4), torch.rand(2), torch.tensor([1, 2])
    out, h = m(x, t, y, return_hidden=2)
    torch.testing.assert_close(out, m(x, t, y))
    torch.testing.assert_close(m(x, t, y, return_hidden=2, hidden_only=True), h)
    # block-2 output computed by hand
    from vae import patchify
    tok = m.x_embed(patchify(x, 2)) + m.pos
    c = m.t_embed(t) + m.y_embed(y)
    torch.testing.assert_close(m.blocks[1](m.blocks[0](tok, c), c), h)


def test_interpolant_and_target():
    x0, eps, t = torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0.0, 1.0, 0.25, 0.5])
    xt = interpolate(x0, eps, t)
    torch.testing.assert_close(xt[0], x0[0]), torch.testing.assert_close(xt[1], eps[1])
    torch.testing.assert_close(xt[2], 0.75 * x0[2] + 0.25 * eps[2])
    # the target is the time derivative of x_t
    dt = 1e-3
    torch.testing.assert_close((interpolate(x0, eps, t + dt) - xt) / dt, velocity_target(x0, eps), atol=1e-3, rtol=0)


class ToyVelocity(nn.Module):
    """MLP velocity field on 2-D points with the SiT call signature (y ignored)."""

    num_classes = 1

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))

    def forward(self, x, t, y):
        return self.net(torch.cat([x, t[:, None]], dim=1))


def test_flow_matching_learns_a_2d_gaussian_and_samplers_agree():
    torch.manual_seed(0)
    mu = torch.tensor([2.0, -1.0])
    L = torch.tensor([[0.6, 0.0], [0.4, 0.3]])
    cov = L @ L.T
    model = ToyVelocity()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    y = torch.zeros(512, dtype=torch.long)
    for _ in range(700):
        x0 = mu + torch.randn(512, 2) @ L.T
        t, eps = torch.rand(512), torch.randn(512, 2)
        loss = velocity_loss(model(interpolate(x0, eps, t), t, y), x0, eps).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    noise = torch.randn(4000, 2)
    v = guided_velocity(model, torch.zeros(4000, dtype=torch.long))
    euler = sample_ode(v, noise, steps=200, method="euler")
    heun = sample_ode(v, noise, steps=20, method="heun")
    print(f"toy flow matching: sample mean {euler.mean(0).tolist()}, cov {torch.cov(euler.T).flatten().tolist()}")
    assert (euler.mean(0) - mu).abs().max() < 0.1
    assert (torch.cov(euler.T) - cov).abs().max() < 0.1
    assert (euler - heun).abs().mean() < 0.02


def test_heun_is_second_order_on_a_linear_field():
    """dx/dt = -x from t=1 to 0 has x(0) = x(1) * e; Heun's error shrinks ~4x per step doubling."""
    f = lambda x, t: -x
    x1 = torch.ones(1)
    err = [abs(sample_ode(f, x1, n, "heun").item() - torch.e) for n in (4, 8)]
    assert 3.5 < err[0] / err[1] < 4.5
    err_e = [abs(sample_ode(f, x1, n, "euler").item() - torch.e) for n in (8, 16)]
    assert 1.7 < err_e[0] / err_e[1] < 2.3


def gaussian_velocity(m, s):
    """Exact velocity E[eps - x0 | x_t] for 1-D data x0 ~ N(m, s^2): x_t ~ N((1 - t) m, (1 - t)^2 s^2 + t^2)."""
    def v(x, t):
        var = (1 - t) ** 2 * s ** 2 + t ** 2
        r = x - (1 - t) * m                                    # x_t minus its mean
        return t / var * r - (m + (1 - t) * s ** 2 / var * r)  # E[eps | x_t] - E[x0 | x_t]
    return v


def test_sde_and_ode_samplers_recover_a_gaussian_from_its_exact_velocity():
    """From N(0, 1) noise, every sampler driven by the closed-form velocity of N(1.5, 0.5^2) data must end at
    that distribution; the SDE really injects noise (its output decorrelates from the initial noise, the ODE's
    is a monotone map of it) and its per-image generators make a sample independent of the batch split."""
    m, s, n = 1.5, 0.5, 40000
    v = gaussian_velocity(m, s)
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    noise = (noise - noise.mean()) / noise.std()               # exact N(0, 1) moments: only the sampler errs
    out = {"euler": sample_ode(v, noise, 100, "euler"), "heun": sample_ode(v, noise, 25, "heun"),
           "sde": sample_sde(v, noise, 100, generator=torch.Generator().manual_seed(1)),
           "sde-250": sample_sde(v, noise, 250, generator=torch.Generator().manual_seed(2))}
    for name, x in out.items():
        assert abs(x.mean().item() - m) < 0.015, (name, x.mean().item())
        assert abs(x.std().item() - s) < 0.01, (name, x.std().item())
    corr = lambda x: torch.corrcoef(torch.stack([x.flatten(), noise.flatten()]))[0, 1].item()
    assert corr(out["heun"]) > 0.999 and corr(out["sde"]) < 0.5
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(6)]
    whole = sample_sde(v, noise[:6], 10, generator=gens())
    split = torch.cat([sample_sde(v, noise[:4], 10, generator=gens()[:4]), sample_sde(v, noise[4:6], 10, generator=gens()[4:])])
    assert torch.equal(whole, split)


def test_sde_sampler_is_sits_euler_maruyama_in_reversed_time():
    """One step written out in SiT's time t_SiT = 1 - t (x = t_SiT x1 + (1 - t_SiT) x0, v_SiT = -v, diffusion
    sigma_t = 1 - t_SiT, score (t_SiT v_SiT - x) / (1 - t_SiT)): x + (v_SiT + D score) dt + sqrt(2 D dt) w,
    then SiT's 'Mean' last step of size 0.04; 2 steps = grid t_SiT in {0, 0.96} then the last step."""
    v = gaussian_velocity(0.3, 0.7)
    x = torch.randn(5, 1, 1, 1, generator=torch.Generator().manual_seed(3))
    w = torch.randn(5, 1, 1, 1, generator=torch.Generator().manual_seed(4))
    ours = sample_sde(v, x, 2, generator=torch.Generator().manual_seed(4))

    def sit_drift(x, ts):                                      # SiT's sde_drift with diffusion form 'sigma'
        v_sit = -v(x, 1 - ts)
        score = (ts * v_sit - x) / (1 - ts)
        return v_sit + (1 - ts) * score
    dt = 0.96
    x1 = x + sit_drift(x, 0.0) * dt + (2 * (1 - 0.0)) ** 0.5 * w * dt ** 0.5
    ref = x1 + sit_drift(x1, 0.96) * 0.04
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_guidance_scale_one_is_conditional_and_batched_cfg_equals_two_forwards():
    m = perturbed_sit()
    x, y = torch.randn(3, 3, 4, 4), torch.tensor([0, 3, 4])
    t = 0.7
    tb = torch.full((3,), t)
    cond = m(x, tb, y)
    torch.testing.assert_close(guided_velocity(m, y, 1.0)(x, t), cond)
    uncond = m(x, tb, torch.full_like(y, 5))
    expected = uncond + 2.5 * (cond - uncond)
    torch.testing.assert_close(guided_velocity(m, y, 2.5)(x, t), expected, atol=1e-5, rtol=1e-5)
    # guidance interval: outside it the conditional velocity is used
    torch.testing.assert_close(guided_velocity(m, y, 2.5, interval=(0.0, 0.5))(x, t), cond)
    assert not torch.allclose(cond, uncond)


def test_modulate_zero_is_identity_and_closed_form():
    from dit import modulate
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 8)).astype(np.float32)
    shift, scale = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    xt = torch.from_numpy(x)
    assert torch.equal(modulate(xt, torch.zeros(3, 8), torch.zeros(3, 8)), xt)
    ref = x * (1 + scale[:, None, :]) + shift[:, None, :]            # per sample, broadcast over the tokens
    np.testing.assert_allclose(modulate(xt, torch.from_numpy(shift), torch.from_numpy(scale)).numpy(), ref,
                               rtol=1e-6, atol=1e-6)


def test_timestep_features_are_the_dit_closed_form():
    """cos / sin of 1000 t times exp(-ln(10000) i / half), i = 0..half-1 (DiT / SiT TimestepEmbedder)."""
    from dit import TimestepEmbedder
    emb = TimestepEmbedder(32, freq_dim=256)
    emb.mlp = nn.Identity()                                          # expose the sinusoidal features
    t = np.array([0.0, 1e-3, 0.25, 0.5, 0.999, 1.0], dtype=np.float32)
    half = 128
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
    args = 1000.0 * t.astype(np.float64)[:, None] * freqs[None]
    ref = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    got = emb(torch.from_numpy(t)).double().numpy()
    assert got.shape == (6, 256)
    np.testing.assert_allclose(got, ref, atol=3e-4, rtol=0)          # float32 phases up to 1000 rad


# ----------------------------------------------------------------------------- U-ViT

def uvit(**kw):
    from dit import UViT
    torch.manual_seed(0)
    return UViT(**{**dict(input_size=4, in_channels=3, patch=2, width=32, depth=5, heads=2, num_classes=5), **kw})


def perturbed_uvit(**kw):
    """A U-ViT whose zero-initialised output is randomised, so outputs depend on x, t and y."""
    m = uvit(**kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def uvit_by_hand(m, x, t, y):
    """U-ViT written out: tokens [class, time, patches] + positions, block i < D/2 saved, block D-1-i merges it by
    linear(cat[x, skip]), final LayerNorm and linear on the patch tokens only, patches back to (B, C, h, w)."""
    import torch.nn.functional as F
    B, C, H, W = x.shape
    p, D = m.patch, m.width
    patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
    half = D // 2
    freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    ang = 1000.0 * t[:, None] * freqs[None]
    seq = torch.cat([m.y_embed.weight[y][:, None], torch.cat([ang.cos(), ang.sin()], 1)[:, None],
                     F.linear(patches, m.x_embed.weight, m.x_embed.bias)], dim=1) + m.pos
    n = len(m.blocks)
    saved = {}
    for i, blk in enumerate(m.blocks):
        if i > n // 2:
            seq = F.linear(torch.cat([seq, saved[n - 1 - i]], -1), blk.skip_linear.weight, blk.skip_linear.bias)
        seq = seq + blk.attn(F.layer_norm(seq, (D,), blk.norm1.weight, blk.norm1.bias))
        seq = seq + blk.mlp(F.layer_norm(seq, (D,), blk.norm2.weight, blk.norm2.bias))
        saved[i] = seq
    out = F.linear(F.layer_norm(seq, (D,), m.norm.weight, m.norm.bias), m.out.weight, m.out.bias)[:, 2:]
    return out.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


def test_fresh_uvit_outputs_zeros_and_its_forward_is_the_written_out_uvit():
    m = uvit()
    x, t, y = torch.randn(3, 3, 4, 4), torch.rand(3), torch.tensor([0, 4, 5])
    assert torch.count_nonzero(m(x, t, y)) == 0                       # zero output projection, as SiT
    inner = m(x, t, y, return_hidden=5)[1]
    assert inner.abs().min() > 0 and inner.std() > 1e-3              # ... while everything before it is live
    assert all(blk.skip_linear is None for blk in m.blocks[:3]) and all(blk.skip_linear for blk in m.blocks[3:])
    q = perturbed_uvit()
    torch.testing.assert_close(q(x, t, y), uvit_by_hand(q, x, t, y), atol=1e-5, rtol=1e-5)


def test_uvit_long_skips_carry_signal():
    m = perturbed_uvit()
    x, t, y = torch.randn(2, 3, 4, 4), torch.rand(2), torch.tensor([1, 2])
    ref = m(x, t, y)
    for blk in m.blocks[3:]:                                          # drop one skip: the skip half of its linear
        saved = blk.skip_linear.weight.detach().clone()
        with torch.no_grad():
            blk.skip_linear.weight[:, 32:] = 0
        assert (m(x, t, y) - ref).abs().max() > 1e-3
        with torch.no_grad():
            blk.skip_linear.weight.copy_(saved)
    torch.testing.assert_close(m(x, t, y), ref)


def test_uvit_published_parameter_counts():
    """U-ViT-M/2 131M, U-ViT-L/2 287M, U-ViT-H/2 501M on 4x32x32 latents with 1000 classes (+ null), to 1 %."""
    from dit import build_denoiser
    for name, published in (("uvit-M/2", 131e6), ("uvit-L/2", 287e6), ("uvit-H/2", 501e6)):
        with torch.device("meta"):
            m = build_denoiser(name, 32, 4, 1000)
        n = sum(p.numel() for p in m.parameters())
        assert abs(n - published) / published < 0.01, (name, n)
        assert m.config["arch"] == "uvit" and len(m.blocks) == {"M": 17, "L": 21, "H": 29}[name[5]]


def test_uvit_2b_matches_dc_ae_published_layout():
    """DC-AE's README (mit-han-lab/efficientvit) lists UViT-2B at 1580.40M and UViT-H at 500.87M parameters at
    patch 1 on DC-AE-f32c32's 32x16x16 latents (512 px); its depth 28 is 14 in + 1 mid + 14 out blocks."""
    from dit import build_denoiser
    for name, published in (("uvit-2B/1", 1580.40e6), ("uvit-H/1", 500.87e6)):
        with torch.device("meta"):
            m = build_denoiser(name, 16, 32, 1000)
        assert round(sum(p.numel() for p in m.parameters()) / 1e4) == round(published / 1e4), name
        assert len(m.blocks) == 29
    assert (m.width, m.blocks[0].attn.heads) == (1152, 16)


def test_uvit_hidden_state_cfg_and_rebuild_from_config():
    from dit import build_denoiser, denoiser_from_config
    m = perturbed_uvit()
    x, t, y = torch.randn(3, 3, 4, 4), torch.rand(3), torch.tensor([0, 3, 4])
    out, h = m(x, t, y, return_hidden=2)
    assert h.shape == (3, 4, 32)                                      # patch tokens only
    torch.testing.assert_close(out, m(x, t, y))
    torch.testing.assert_close(m(x, t, y, return_hidden=2, hidden_only=True), h)
    tb = torch.full((3,), 0.6)
    cond, uncond = m(x, tb, y), m(x, tb, torch.full_like(y, 5))
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(guided_velocity(m, y, 3.0)(x, 0.6), uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)
    again = denoiser_from_config(m.config)
    again.load_state_dict(m.state_dict())
    torch.testing.assert_close(again.eval()(x, t, y), m(x, t, y))
    sit_cfg = {k: v for k, v in build_sit("smoke/1", 4, 3, 5).config.items() if k != "arch"}
    assert type(denoiser_from_config(sit_cfg)).__name__ == "SiT"      # checkpoints from before the arch key
    assert type(build_denoiser("uvit-smoke/1", 4, 3, 5)).__name__ == "UViT"
    with pytest.raises(ValueError, match="unknown U-ViT model"):
        build_denoiser("uvit-XL/2", 32, 4, 10)
