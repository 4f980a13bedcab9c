"""Behaviours that change a published number, each against an independent reference: the samplers' last
step, guidance on every channel, gradient clipping, EMA order, validation at the run's level, the ADM
Inception Score, and the flags of the three stages that nothing else pins."""
import json

import numpy as np
import pytest
import torch

import common
import evaluate as ev
import fft_ops
import train_diffusion as td
import train_vae
from common import load_checkpoint, save_checkpoint
from data import DeadLeaves, train_val_split
from dit import build_denoiser, guided_velocity, sample_ode
from helpers import Stage2Latents, read_metrics
from vae import load_autoencoder, load_vae


CPU = type("D", (), dict(device=torch.device("cpu"), rank=0, world_size=1, main=True))()


def smoke(models, out, *extra):
    return ["--preset", "smoke", "--vae", str(models / "vae" / "last.pt"), "--out", str(out), *extra]


def perturbed(name, channels, classes=5, size=4):
    """A denoiser whose zero-initialised layers are randomised, so it depends on x, t and y."""
    torch.manual_seed(1)
    m = build_denoiser(name, size, channels, classes)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


# ----------------------------------------------------------------------------- 1. samplers

def hand_heun(f, x, n):
    """Heun (trapezoid) from t = 1 to 0 on n uniform steps, every step including the last one to t = 0."""
    for k in range(n):
        t, t_next = 1 - k / n, 1 - (k + 1) / n
        v = f(x, t)
        x_pred = x + (t_next - t) * v
        x = x + 0.5 * (t_next - t) * (v + f(x_pred, t_next))
    return x


def hand_euler(f, x, n):
    for k in range(n):
        t, t_next = 1 - k / n, 1 - (k + 1) / n
        x = x + (t_next - t) * f(x, t)
    return x


def test_heun_is_exact_on_a_field_linear_in_t_down_to_t0():
    """dx/dt = 2t + 1 from t = 1 to 0: x(0) = x(1) - 2 exactly, and the trapezoid rule of every Heun step (the
    last one included) is exact for a linear integrand; an Euler step anywhere misses by (2t+1 - mean) dt."""
    x1 = torch.randn(3, 2)
    f = lambda x, t: torch.full_like(x, 2 * t + 1)
    for n in (1, 2, 3, 5):
        torch.testing.assert_close(sample_ode(f, x1, n, "heun"), x1 - 2, atol=1e-6, rtol=0)
        euler_err = (sample_ode(f, x1, n, "euler") - (x1 - 2)).abs().max().item()
        assert euler_err == pytest.approx(1 / n, rel=1e-5)                  # sum_k 2 t_k dt - 1 = 1/n


def test_samplers_equal_hand_loops_and_evaluate_at_the_grid_times():
    calls = []

    def f(x, t):
        calls.append(round(t, 6))
        return torch.sin(3 * x) * (1 + t ** 2) - x * t

    x1 = torch.randn(4, 3)
    for method, hand, times in (("heun", hand_heun, [1, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 0]),
                                ("euler", hand_euler, [1, 2 / 3, 1 / 3])):
        calls.clear()
        out = sample_ode(f, x1, 3, method)
        assert calls == [round(t, 6) for t in times], method              # 2 evaluations per Heun step, to t = 0
        torch.testing.assert_close(out, hand(lambda x, t: torch.sin(3 * x) * (1 + t ** 2) - x * t, x1, 3),
                                   atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- 2. guidance on every channel

@pytest.mark.parametrize("name,channels", [("smoke/1", 4), ("smoke/1", 8), ("uvit-smoke/1", 4)])
def test_guidance_moves_every_latent_channel(name, channels):
    """uncond + s (cond - uncond) on all C channels (not DiT's first 3 of 4), for t inside the closed interval."""
    m = perturbed(name, channels)
    x, y = torch.randn(3, channels, 4, 4), torch.tensor([0, 2, 4])
    for t in (0.3, 0.45, 0.6):
        tb = torch.full((3,), t)
        with torch.no_grad():
            cond, uncond = m(x, tb, y), m(x, tb, torch.full_like(y, 5))
            out = guided_velocity(m, y, 2.5, (0.3, 0.6))(x, t)
        expected = uncond + 2.5 * (cond - uncond)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        per_channel = (out - cond).abs().amax(dim=(0, 2, 3))                 # (C,): guidance changed each channel
        assert (per_channel > 1e-3).all(), per_channel
    with torch.no_grad():                                                     # just outside: conditional only
        for t in (0.29, 0.61):
            torch.testing.assert_close(guided_velocity(m, y, 2.5, (0.3, 0.6))(x, t), m(x, torch.full((3,), t), y))


# ----------------------------------------------------------------------------- 3. gradient clipping

def spy_optimizers(monkeypatch, module):
    """Record, for every optimizer the trainer builds, the gradients after the last backward of each step
    (raw) and those the optimizer steps with; the real adamw builds the optimizer."""
    records = []

    def adamw(params, device, *args, **kw):
        params = list(params)
        opt = common.adamw(params, device, *args, **kw)
        raw, rec = {}, {"params": params, "steps": []}
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: raw.__setitem__(p, p.grad.detach().clone()))

        def pre(*_):
            ps = [p for p in params if p.grad is not None]
            rec["steps"].append(([raw[p] for p in ps], [p.grad.detach().clone() for p in ps]))
            raw.clear()
        opt.register_step_pre_hook(pre)
        records.append(rec)
        return opt
    monkeypatch.setattr(module, "adamw", adamw)
    return records


def assert_clipped(steps, clip, logged=None):
    """Each step's gradients are torch's clip_grad_norm_(., clip) of the accumulated raw gradients."""
    active = 0
    for i, (raw, used) in enumerate(steps):
        copies = [torch.nn.Parameter(torch.zeros_like(g)) for g in raw]     # a copy of the model's gradients
        for c, g in zip(copies, raw):
            c.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(copies, clip)
        active += norm > clip
        for c, u in zip(copies, used):
            torch.testing.assert_close(u, c.grad, atol=1e-7, rtol=1e-5)
        if logged is not None:
            assert logged[i] == pytest.approx(norm.item(), rel=1e-5)         # grad_norm: the norm before clipping
    assert active == len(steps) > 0


def test_stage2_clips_the_accumulated_gradient_of_sit_and_projector(smoke_models, tmp_path, monkeypatch):
    records = spy_optimizers(monkeypatch, td)
    td.main(smoke(smoke_models, tmp_path, "--steps", "3", "--grad-clip", "0.05", "--micro-batch", "4", "--fda",
                  "--fda-depth", "1", "--sample-every", "100", "--ckpt-every", "100", "--val-every", "0"))
    (rec,) = records
    model = load_checkpoint(str(tmp_path / "last.pt"), "sit")["model"]
    assert any(k.startswith("projector.") for k in model) and len(rec["params"]) == len(model)   # SiT + projector
    assert_clipped(rec["steps"], 0.05, [r["grad_norm"] for r in read_metrics(tmp_path / "metrics.jsonl")])


def test_stage1_clips_the_vae_gradient(tmp_path, monkeypatch):
    records = spy_optimizers(monkeypatch, train_vae)
    train_vae.main(["--preset", "smoke", "--out", str(tmp_path), "--steps", "3", "--gan-start", "1",
                    "--grad-clip", "0.02", "--micro-batch", "4", "--sample-every", "100", "--val-every", "0"])
    vae_rec = records[0]
    assert_clipped(vae_rec["steps"], 0.02, [r["grad_norm"] for r in read_metrics(tmp_path / "metrics.jsonl")])


# ----------------------------------------------------------------------------- 4. EMA after the optimizer step

def assert_ema_follows_the_stepped_model(ck1, ck2, decay, prefix=""):
    """ema_2 = d ema_1 + (1 - d) w_2 with w_2 the weights after step 2's update (not w_1: the model before it)."""
    moved = 0
    for k, e2 in ck2["ema"].items():
        e1, w1, w2 = ck1["ema"][k], ck1["model"][prefix + k], ck2["model"][prefix + k]
        if not e2.is_floating_point():
            continue
        torch.testing.assert_close(e2, decay * e1 + (1 - decay) * w2, atol=1e-6, rtol=1e-5)
        moved += not torch.allclose(w1, w2)
    assert moved > 0


def test_stage2_ema_is_updated_after_the_optimizer_step(smoke_models, tmp_path):
    base = smoke(smoke_models, tmp_path, "--ema-decay", "0.7", "--ckpt-every", "1", "--sample-every", "100")
    td.main(base + ["--steps", "1"])
    ck1 = load_checkpoint(str(tmp_path / "last.pt"), "sit")
    td.main(base + ["--steps", "2"])
    ck2 = load_checkpoint(str(tmp_path / "last.pt"), "sit")
    assert (ck1["step"], ck2["step"]) == (1, 2)
    assert_ema_follows_the_stepped_model(ck1, ck2, 0.7, prefix="sit.")


def test_stage1_ema_is_updated_after_the_optimizer_step(tmp_path):
    base = ["--preset", "smoke", "--out", str(tmp_path), "--ema-decay", "0.6", "--ckpt-every", "1",
            "--sample-every", "100", "--gan-weight", "0"]
    train_vae.main(base + ["--steps", "1"])
    ck1 = load_checkpoint(str(tmp_path / "last.pt"), "vae")
    train_vae.main(base + ["--steps", "2"])
    assert_ema_follows_the_stepped_model(ck1, load_checkpoint(str(tmp_path / "last.pt"), "vae"), 0.6)


# ----------------------------------------------------------------------------- 5. validation at the run's level

class XOverT(torch.nn.Module):
    """v(x_t, t) = x_t / t = eps + (1 - t) / t z: its velocity error is z / t exactly, whatever the noise."""

    def forward(self, x, t, y):
        return x / t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("level,renorm", [(2, False), (1, True)])
def test_stage2_validation_is_at_the_run_level_on_full_frequency_held_out_latents(smoke_models, tmp_path, level, renorm):
    """val_loss_t = mean(z_val^(l)^2) / t^2 for the model x / t, with z_val^(l) = S_l((E(x) - mean) / std) of the
    held-out images at full frequency (FreqWarm warming up), divided by the level's std with --renorm-level."""
    vae_path = str(smoke_models / "vae" / "last.pt")
    args = td.get_args(smoke(smoke_models, tmp_path, "--denoise-level", str(level), "--freqwarm", "--r0", "0.1",
                             "--warmup-steps", "100", *(["--renorm-level"] if renorm else [])))
    ae, ds, _, _, _ = td.build(args, CPU)
    stats = td.training_stats(ae, ds, args, CPU)
    latents = Stage2Latents(ae, stats, args, 100)
    assert latents.radius(0) == 0.1
    _, val_idx = train_val_split(len(ds), args.val_images, args.seed)
    res = td.Validation(ae, latents.space, ds, val_idx, args, CPU.device)(XOverT())
    vae, ck = load_vae(vae_path)
    x = torch.stack([DeadLeaves(n=64, resolution=16)[i][0] for i in val_idx])
    with torch.no_grad():
        z = (vae.encode(x).mean - stats["mean"].view(1, -1, 1, 1)) / stats["std"].view(1, -1, 1, 1)
    zl = fft_ops.attenuate(z, level, ck["config"]["mlsr_fractions"])
    if renorm:
        zl = zl / stats["level_std"][level].view(1, -1, 1, 1)
    power = zl.pow(2).mean().item()
    for t in td.VAL_TS:
        assert res[f"val_loss_t{t:.4f}"] == pytest.approx(power / t ** 2, rel=1e-4), t
    assert res["val_loss"] == pytest.approx(np.mean([power / t ** 2 for t in td.VAL_TS]), rel=1e-4)
    wrong = fft_ops.attenuate(z, 0 if not renorm else level, ck["config"]["mlsr_fractions"]).pow(2).mean().item()
    assert abs(power - wrong) > 0.05 * wrong               # level 0 (or S_l without renorm) differs at this size


# ----------------------------------------------------------------------------- 6. Inception Score as ADM

def adm_inception_score(preds, split_size=5000):
    """guided-diffusion evaluations/evaluator.py compute_inception_score: consecutive chunks of 5000 samples,
    each with its own marginal p(y); the mean of exp(E KL(p(y|x) || p(y))) over the chunks."""
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores)), float(np.std(scores))


def drifting_probabilities(n=50000, k=12, seed=0):
    """Class probabilities whose class mix changes along the sample order (so every split has its own p(y))."""
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal((n, k))
    logits[np.arange(n), (np.arange(n) * k // n)] += 3.0
    p = np.exp(logits)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def test_inception_score_is_the_adm_formula_over_ten_splits_of_50000():
    p = drifting_probabilities()
    mean, std = ev.inception_score(p)
    ref_mean, ref_std = adm_inception_score(p.astype(np.float64))
    assert mean == pytest.approx(ref_mean, rel=1e-6) and std == pytest.approx(ref_std, rel=1e-4)
    whole = adm_inception_score(p.astype(np.float64), split_size=len(p))[0]          # one split
    py = p.astype(np.float64).mean(0)                                              # p(y) over all samples
    shared = np.mean([np.exp(np.mean(np.sum(c * (np.log(c) - np.log(py)), 1))) for c in np.split(p.astype(np.float64), 10)])
    assert abs(whole - ref_mean) > 0.05 * ref_mean and abs(shared - ref_mean) > 0.05 * ref_mean


class IndexedProbabilities:
    """A stand-in network (not Inception): image i carries i in its pixels; returns features and P[i]."""

    name = "stand-in (not Inception)"

    def __init__(self, probs):
        self.probs, self.feats = probs, np.random.default_rng(1).standard_normal((len(probs), 3))

    def __call__(self, imgs):
        idx = (imgs[:, 0, 0, 0].astype(np.int64) << 16) | (imgs[:, 0, 0, 1].astype(np.int64) << 8) | imgs[:, 0, 0, 2]
        return self.feats[idx], self.probs[idx].astype(np.float64)


def test_reported_inception_score_uses_the_adm_splits():
    p = drifting_probabilities()
    i = np.arange(len(p))
    imgs = np.stack([(i >> 16) & 255, (i >> 8) & 255, i & 255], 1).astype(np.uint8).reshape(-1, 1, 1, 3)
    res = ev.generation_metrics(IndexedProbabilities(p), imgs, ref_stats=(np.zeros(3), np.eye(3)))
    assert res["n_fake"] == len(p)
    assert res["is"] == pytest.approx(adm_inception_score(p.astype(np.float64))[0], rel=1e-6)


# ----------------------------------------------------------------------------- sampling flags, end to end

def hand_guided(model, y, scale, lo, hi, classes):
    """Classifier-free guidance written out: two separate forwards, guided for t in [lo, hi]."""
    def v(x, t):
        tb = torch.full((len(x),), t)
        cond = model(x, tb, y)
        if not lo <= t <= hi:
            return cond
        uncond = model(x, tb, torch.full_like(y, classes))
        return uncond + scale * (cond - uncond)
    return v


@pytest.fixture(scope="module")
def renorm_sit(smoke_models, tmp_path_factory):
    """A smoke SiT at denoise level 1 with --renorm-level: sampling must undo the level's std before decoding."""
    out = tmp_path_factory.mktemp("sit-renorm")
    td.main(smoke(smoke_models, out, "--denoise-level", "1", "--renorm-level", "--steps", "3",
                  "--sample-every", "100", "--val-every", "0"))
    ck = load_checkpoint(str(out / "last.pt"), "sit")
    torch.manual_seed(2)                              # move the EMA off its near-zero start: outputs depend on x, t, y
    ck["ema"] = {k: v + 0.2 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ck["ema"].items()}
    save_checkpoint(str(out / "last.pt"), ck)
    return out / "last.pt"


@pytest.mark.parametrize("sampler,steps,hand", [("euler", 3, hand_euler), ("heun", 2, hand_heun)])
def test_sample_images_equal_a_hand_written_sampler(smoke_models, renorm_sit, tmp_path, sampler, steps, hand):
    """Image i of `evaluate.py sample` = D(z * level_std * std + mean) of the hand-written sampler from image i's
    noise (seed --seed) with label i mod K, guided with --cfg-scale inside --cfg-interval."""
    from dit import denoiser_from_config
    ck = load_checkpoint(str(renorm_sit), "sit")
    out = tmp_path / "s"
    ev.main(["sample", "--ckpt", str(renorm_sit), "--num-samples", "3", "--batch", "2", "--sample-steps", str(steps),
             "--sampler", sampler, "--cfg-scale", "2.0", "--cfg-interval", "0.4", "1.0", "--seed", "3", "--out", str(out)])
    pngs = np.load(str(out) + ".npz")["arr_0"].astype(np.float64)
    ema = denoiser_from_config(ck["model_config"])
    ema.load_state_dict(ck["ema"])
    vae, _ = load_vae(str(smoke_models / "vae" / "last.pt"))
    st = ck["latent_stats"]
    K, C, h = ema.num_classes, ema.in_channels, ema.config["input_size"]
    idx = [0, 1, 2]
    y = torch.tensor([i % K for i in idx])
    scale = st["level_std"][1].view(1, -1, 1, 1) * st["std"].view(1, -1, 1, 1)

    def draw(seed):                                               # uint8-scale images (B, H, W, 3), unrounded
        with torch.no_grad():
            z = hand(hand_guided(ema.eval(), y, 2.0, 0.4, 1.0, K), ev.image_noise(idx, (C, h, h), seed), steps)
            x = vae.decode(z * scale + st["mean"].view(1, -1, 1, 1)).clamp(-1, 1)
        return (x.permute(0, 2, 3, 1).numpy() + 1) * 127.5
    assert np.abs(pngs - draw(3)).max() <= 0.51 + 1e-3                  # rounding to uint8 only
    other_seed = draw(0)
    assert np.abs(pngs - other_seed).max() > 5                           # the seed matters at this size


def test_training_grids_use_the_grid_sampler_flags(smoke_models, tmp_path, monkeypatch):
    seen = []
    real = td.sample_ode

    def spy(velocity, noise, steps=50, method="heun"):
        seen.append((steps, method))
        return real(velocity, noise, steps, method)
    monkeypatch.setattr(td, "sample_ode", spy)
    td.main(smoke(smoke_models, tmp_path, "--steps", "2", "--sample-every", "1", "--sample-steps", "3",
                  "--sampler", "euler", "--val-every", "0"))
    assert seen == [(3, "euler"), (3, "euler")]


# ----------------------------------------------------------------------------- Stage 1: the loss's flags, the GAN start

def test_stage1_loss_follows_every_weight_sigma_and_fraction_flag():
    """Eq. 2 written out: w_pix MSE(D(S_l(z)), G_l(x)) + w_kl KL + w_perc d_perc + w_gan (-D(recon)) from --gan-start,
    with S_l from --mlsr-fractions and G_l from --mlsr-sigmas (none of them the defaults)."""
    from vae import PatchDiscriminator, ViTVAE
    fr, sig = [0.0, 0.1, 0.3, 0.6], [0.0, 0.3, 0.7, 1.1]
    args = train_vae.get_args(["--preset", "smoke", "--pixel-weight", "0.5", "--kl-weight", "0.01",
                               "--perceptual-weight", "0.2", "--gan-weight", "0.3", "--gan-start", "5",
                               "--mlsr-fractions", *map(str, fr), "--mlsr-sigmas", *map(str, sig)])
    torch.manual_seed(0)
    vae, disc = ViTVAE(image_size=16, patch=4, width=32, depth=1, heads=2, latent_dim=4), PatchDiscriminator(16, 2)
    x, noise = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 4, 4)
    perc = lambda a, b: (a - b).abs().mean()                             # a stand-in perceptual distance
    for step, gan in ((4, False), (5, True)):
        loss, parts, target, recon = train_vae.generator_loss(train_vae.MLSRPath(vae), disc, perc, x, noise, 2, args, step)
        with torch.no_grad():
            post = vae.encode(x)
            ref_recon = vae.decode(fft_ops.attenuate(post.sample(noise), 2, fr))
            ref_target = fft_ops.gaussian_blur(x, sig[2])
            ref = 0.5 * (ref_recon - ref_target).pow(2).mean() + 0.01 * post.kl() + 0.2 * perc(ref_recon, ref_target)
            if gan:
                ref = ref - 0.3 * disc(ref_recon).mean()
        torch.testing.assert_close(target, ref_target)
        torch.testing.assert_close(recon, ref_recon)
        torch.testing.assert_close(loss.detach(), ref, atol=1e-6, rtol=1e-5)
        assert ("g_gan" in parts) == gan


def test_stage1_optimizer_and_discriminator_flags(tmp_path):
    """--weight-decay, --lr / --disc-lr, --disc-channels / --disc-layers reach the optimizers and the PatchGAN;
    the discriminator first steps at --gan-start."""
    from vae import PatchDiscriminator
    base = ["--preset", "smoke", "--out", str(tmp_path), "--weight-decay", "0.03", "--lr", "2e-3", "--disc-lr", "7e-4",
            "--disc-channels", "8", "--disc-layers", "1", "--gan-start", "1", "--ckpt-every", "1", "--val-every", "0"]
    train_vae.main(base + ["--steps", "1"])
    ck = load_checkpoint(str(tmp_path / "last.pt"), "vae")
    assert ck["opt_d"]["state"] == {} and ck["opt"]["state"]                  # step 0 < --gan-start: D untouched
    g, gd = ck["opt"]["param_groups"][0], ck["opt_d"]["param_groups"][0]
    assert (g["lr"], g["weight_decay"], gd["lr"]) == (2e-3, 0.03, 7e-4)       # a fresh run, then a resumed one
    train_vae.main(base + ["--steps", "2"])
    ck = load_checkpoint(str(tmp_path / "last.pt"), "vae")
    assert ck["opt_d"]["state"] and all(int(s["step"]) == 1 for s in ck["opt_d"]["state"].values())
    g, gd = ck["opt"]["param_groups"][0], ck["opt_d"]["param_groups"][0]
    assert (g["lr"], g["weight_decay"], gd["lr"]) == (2e-3, 0.03, 7e-4)
    assert {k: v.shape for k, v in ck["disc"].items()} == {k: v.shape for k, v in PatchDiscriminator(8, 1).state_dict().items()}
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [("d_gan" in r, "g_gan" in r) for r in lines] == [(False, False), (True, True)]


def test_stage2_optimizer_flags(smoke_models, tmp_path):
    td.main(smoke(smoke_models, tmp_path, "--steps", "1", "--weight-decay", "0.05", "--lr", "3e-3", "--val-every", "0",
                  "--sample-every", "100"))
    g = load_checkpoint(str(tmp_path / "last.pt"), "sit")["opt"]["param_groups"][0]
    assert (g["lr"], g["weight_decay"]) == (3e-3, 0.05)


# ----------------------------------------------------------------------------- Stage 1: augmentation and training set

@pytest.mark.parametrize("hflip", [True, False])
def test_stage1_trains_on_training_images_with_flips_only_when_asked(tmp_path, monkeypatch, hflip):
    """Every image Stage 1 trains on is a training image (never a held-out one), mirrored only with --hflip; the
    first epoch visits each training image once."""
    seen, real = [], train_vae.generator_loss

    def spy(model, disc, perceptual, x, *rest):
        seen.append(x.clone())
        return real(model, disc, perceptual, x, *rest)
    monkeypatch.setattr(train_vae, "generator_loss", spy)
    train_vae.main(["--preset", "smoke", "--out", str(tmp_path), "--steps", "7", "--gan-weight", "0", "--val-every", "0",
                    "--sample-every", "100", "--ckpt-every", "100", "--hflip" if hflip else "--no-hflip"])
    ds = DeadLeaves(n=64, resolution=16)
    imgs = torch.stack([ds[i][0] for i in range(64)])
    bank = torch.cat([imgs, imgs.flip(-1)]).flatten(1)                         # keys 0..127 as in FlipView
    x = torch.cat(seen).flatten(1)
    assert len(x) == 56
    d = torch.cdist(x, bank)
    keys = d.argmin(1)
    two = d.topk(2, dim=1, largest=False).values
    assert (two[:, 0] < 0.1).all() and (two[:, 1] > 1.0).all()               # each row is one image of the set
    train_idx, val_idx = train_val_split(64, 8, 0)
    assert sorted((keys % 64).tolist()) == train_idx                           # 56 = one epoch of the training set
    n_flipped = int((keys >= 64).sum())
    assert (n_flipped > 10) if hflip else n_flipped == 0


# ----------------------------------------------------------------------------- compare: which lines, which runs

def fake_run(folder, seed, lr, lines, step=4):
    """A run folder as the trainers leave it: last.pt (config, step) and metrics.jsonl."""
    folder.mkdir()
    save_checkpoint(str(folder / "last.pt"), {"kind": "sit", "config": {"seed": seed, "lr": lr, "out": str(folder),
                                                                        "steps": 4}, "step": step})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(folder)


def test_compare_takes_each_run_last_validation_line_and_groups_by_setting(tmp_path):
    a = fake_run(tmp_path / "a", 0, 1e-3, [{"step": 2, "val_loss": 5.0}, {"step": 2, "loss": 9.0},
                                           {"step": 4, "val_loss": 1.0}, {"step": 4, "loss": 0.1}])
    b = fake_run(tmp_path / "b", 1, 1e-3, [{"step": 2, "val_loss": 6.0}, {"step": 4, "val_loss": 2.0}])
    c = fake_run(tmp_path / "c", 0, 2e-3, [{"step": 4, "val_loss": 3.0}, {"step": 4, "loss": 0.5}])
    ev.main(["compare", a, c, b, "--out", str(tmp_path / "cmp")])
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert table[2:] == [f"| lr=0.001 | 0,1 | 4 | 1.5000 ± {np.std([1.0, 2.0], ddof=1):.4f} |", "| lr=0.002 | 0 | 4 | 3.0000 |"]


def test_compare_refuses_seeds_of_one_setting_at_different_steps(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 0, 1e-3, [{"step": 4, "val_loss": 1.0}])
    b = fake_run(tmp_path / "b", 1, 1e-3, [{"step": 2, "val_loss": 6.0}], step=2)        # stopped early
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: ev.main(["compare", a, b, "--out", str(tmp_path / "cmp")]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "steps 2 and 4" in err
    assert not (tmp_path / "cmp" / "compare.md").exists()


# ----------------------------------------------------------------------------- recon: the evaluated levels

def test_recon_evaluates_the_mlsr_fractions_it_is_given(smoke_models, tmp_path):
    """recon --mlsr-fractions: PSNR of D(S_l(z)) with those p_l on --seed's random subset of --n images."""
    from data import random_subset
    vae_path = str(smoke_models / "vae" / "last.pt")
    fr = [0.0, 0.2, 0.4, 0.9]
    ev.main(["recon", "--vae", vae_path, "--n", "5", "--n-images", "64", "--seed", "1", "--mlsr-fractions",
             *map(str, fr), "--out", str(tmp_path), "--inception-path", str(tmp_path / "none.pt")])
    rows = json.loads((tmp_path / "recon.json").read_text())["rows"]
    vae, _ = load_vae(vae_path)
    ds = DeadLeaves(n=64, resolution=16)
    x = torch.stack([ds[i][0] for i in random_subset(64, 5, 1)])
    with torch.no_grad():
        z = vae.encode(x).mean
        for level in (2, 3):
            r = vae.decode(fft_ops.attenuate(z, level, fr)).clamp(-1, 1)
            ref = (10 * torch.log10(4 / (r - x).pow(2).mean(dim=(1, 2, 3)))).mean().item()
            assert rows[level]["psnr"] == pytest.approx(ref, rel=1e-5), level
            assert rows[level]["n_images"] == 5


# ----------------------------------------------------------------------------- Stage 2: what one step trains on

@pytest.mark.parametrize("cache", [False, True])
def test_stage2_steps_pair_each_training_latent_with_its_label_and_draw_t_uniformly(smoke_models, tmp_path,
                                                                                 monkeypatch, cache):
    """Each row of a step's z is (E(x_k) - mean) / std of a training key k (flips allowed, never a held-out image)
    with the label of image k; t ~ U[0, 1) and eps ~ N(0, I), fresh each step."""
    from scipy import stats as sps
    seen, real = [], td.diffusion_loss

    def spy(student, ema, z, y, t, eps, *rest):
        seen.append((z.clone(), y.clone(), t.clone(), eps.clone()))
        return real(student, ema, z, y, t, eps, *rest)
    monkeypatch.setattr(td, "diffusion_loss", spy)
    td.main(smoke(smoke_models, tmp_path, "--steps", "7", "--class-dropout", "0", "--val-every", "0",
                  "--sample-every", "100", "--ckpt-every", "100", *(["--cache-latents"] if cache else [])))
    ck = load_checkpoint(str(tmp_path / "last.pt"), "sit")
    vae, _ = load_vae(str(smoke_models / "vae" / "last.pt"))
    ds = DeadLeaves(n=64, resolution=16)
    x = torch.stack([ds[i][0] for i in range(64)])
    st = ck["latent_stats"]
    with torch.no_grad():
        bank = (vae.encode(torch.cat([x, x.flip(-1)])).mean - st["mean"].view(1, -1, 1, 1)) / st["std"].view(1, -1, 1, 1)
    z = torch.cat([s[0] for s in seen]).flatten(1)
    d = torch.cdist(z, bank.flatten(1))
    two = d.topk(2, dim=1, largest=False)
    assert (two.values[:, 0] < 0.05).all() and (two.values[:, 1] > 0.2).all()  # float16 cache: close, not equal
    keys = two.indices[:, 0]
    train_idx, _ = train_val_split(64, 8, 0)
    assert sorted((keys % 64).tolist()) == train_idx                           # the first epoch of training keys
    labels = torch.tensor([ds.label(int(k) % 64) for k in keys])
    assert torch.equal(torch.cat([s[1] for s in seen]), labels)
    t, eps = torch.cat([s[2] for s in seen]), torch.cat([s[3] for s in seen]).flatten()
    assert sps.kstest(t.numpy(), "uniform").pvalue > 1e-3 and sps.kstest(eps.numpy(), "norm").pvalue > 1e-3
    assert not torch.equal(seen[0][2], seen[1][2]) and not torch.equal(seen[0][3], seen[1][3])


# ----------------------------------------------------------------------------- fid: precision is of the samples

def test_precision_is_the_samples_inside_the_reference_and_recall_the_converse():
    """Samples packed in the middle of the reference cloud: all inside the real manifold (precision 1), covering
    little of it (recall small); brute force over k = 3 nearest-neighbour balls."""
    rng = np.random.default_rng(4)
    real = rng.integers(0, 256, (80, 1, 1, 3)).astype(np.uint8)
    fake = rng.integers(118, 138, (60, 1, 1, 3)).astype(np.uint8)

    class Pixels:
        name = "stand-in: raw pixels (not Inception)"

        def __call__(self, imgs):
            f = imgs.reshape(len(imgs), -1).astype(np.float64)
            return f, np.full((len(imgs), 4), 0.25)

    res = ev.generation_metrics(Pixels(), fake, real=real)

    def brute(ref, query, k=3):
        ref, query = ref.reshape(len(ref), -1).astype(float), query.reshape(len(query), -1).astype(float)
        radii = [np.sort(np.linalg.norm(ref - r, axis=1))[k] for r in ref]
        return np.mean([any(np.linalg.norm(q - r) <= radii[j] for j, r in enumerate(ref)) for q in query])
    precision, recall = brute(real, fake), brute(fake, real)
    assert (res["precision"], res["recall"]) == (pytest.approx(precision), pytest.approx(recall))
    assert precision > 0.9 > 0.5 > recall


# ----------------------------------------------------------------------------- Stage 2: FDA depth, FreqWarm filter

def test_fda_aligns_the_output_of_block_fda_depth_in_student_and_teacher(smoke_models, tmp_path):
    """--fda-depth k (1-based) of a 4-block SiT: L_align = mean((proj(h_k(student)) - h_k(teacher))^2), with h_k
    read here by forward hooks on block k of each network."""
    args = td.get_args(smoke(smoke_models, tmp_path, "--model", "tiny/1", "--fda", "--fda-depth", "2"))
    ae, ds, student, ema, _ = td.build(args, CPU)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in list(student.parameters()) + list(ema.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    assert len(student.sit.blocks) == 4
    hs = {}
    hooks = [net.blocks[1].register_forward_hook(lambda m, i, o, n=n: hs.__setitem__(n, o))
             for n, net in (("student", student.sit), ("teacher", ema))]
    z, eps, y, t = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 2, 3]), torch.rand(4)
    _, parts = td.diffusion_loss(student, ema, z, y, t, eps, args, 0)
    for h in hooks:
        h.remove()
    ref = (student.projector(hs["student"]) - hs["teacher"]).pow(2).mean()
    torch.testing.assert_close(parts["align"], ref)


@pytest.mark.parametrize("kind", ["gaussian", "butterworth"])
def test_freqwarm_warmup_latents_use_the_lowpass_kind(smoke_models, tmp_path, kind):
    args = td.get_args(smoke(smoke_models, tmp_path, "--freqwarm", "--r0", "0.15", "--lowpass-kind", kind,
                             "--warmup-steps", "2"))
    ae, ds, _, _, _ = td.build(args, CPU)
    stats = td.training_stats(ae, ds, args, CPU)
    lat = Stage2Latents(ae, stats, args, 2)
    x = torch.stack([ds[i][0] for i in range(6)])
    vae, _ = load_vae(str(smoke_models / "vae" / "last.pt"))
    mean, std = stats["mean"].view(1, -1, 1, 1), stats["std"].view(1, -1, 1, 1)
    with torch.no_grad():
        ref = (vae.encode(fft_ops.lowpass(x, 0.15, kind)).mean - mean) / std
        ideal = (vae.encode(fft_ops.lowpass(x, 0.15)).mean - mean) / std
    torch.testing.assert_close(lat.get(1, images=x), ref, atol=1e-5, rtol=1e-5)
    assert (ref - ideal).abs().max() > 1e-2


# ----------------------------------------------------------------------------- Stage 1 validation, diagnose, fid flags

def test_stage1_validation_uses_the_run_mlsr_fractions(tmp_path):
    fr = [0.0, 0.1, 0.3, 0.6]
    train_vae.main(["--preset", "smoke", "--out", str(tmp_path), "--steps", "1", "--gan-weight", "0",
                    "--mlsr-fractions", *map(str, fr)])
    val = read_metrics(tmp_path / "metrics.jsonl", "val")[-1]
    vae, _ = load_vae(str(tmp_path / "last.pt"))                               # EMA weights
    _, val_idx = train_val_split(64, 8, 0)
    ds = DeadLeaves(n=64, resolution=16)
    x = torch.stack([ds[i][0] for i in val_idx])
    with torch.no_grad():
        z = vae.encode(x).mean
        for level in (1, 3):
            r = vae.decode(fft_ops.attenuate(z, level, fr)).clamp(-1, 1)
            ref = (10 * torch.log10(4 / (r - x).pow(2).mean(dim=(1, 2, 3)))).mean().item()
            assert val[f"val_psnr_l{level}"] == pytest.approx(ref, rel=1e-5), level
    # the per-level std that --renorm-level divides by is that of S_l with these fractions too
    from data import random_subset
    st = load_checkpoint(str(tmp_path / "last.pt"), "vae")["latent_stats"]
    with torch.no_grad():
        train_idx, _ = train_val_split(64, 8, 0)                              # held-out images excluded
        mu = vae.encode(torch.stack([ds[train_idx[i]][0] for i in random_subset(len(train_idx), 32, 0)])).mean
    zn = (mu - st["mean"].view(1, -1, 1, 1)) / st["std"].view(1, -1, 1, 1)
    for level in (1, 3):
        ref = fft_ops.attenuate(zn, level, fr).transpose(0, 1).flatten(1).std(1, unbiased=False)
        torch.testing.assert_close(st["level_std"][level], ref, atol=1e-4, rtol=1e-4)


def test_diagnose_spectra_use_the_given_mlsr_fractions(smoke_models, tmp_path):
    fr = [0.0, 0.2, 0.45, 0.8]
    ev.main(["diagnose", "--vae", str(smoke_models / "vae" / "last.pt"), "--n", "4", "--n-images", "64",
             "--mlsr-fractions", *map(str, fr), "--out", str(tmp_path)])
    res = json.loads((tmp_path / "diagnosis.json").read_text())
    ae = load_autoencoder(str(smoke_models / "vae" / "last.pt"))
    from data import random_subset
    ds = DeadLeaves(n=64, resolution=16)
    x = torch.stack([ds[i][0] for i in random_subset(64, 4, 0)])
    st = ae.stats
    with torch.no_grad():
        zn = (ae.encode(x) - st["mean"].view(1, -1, 1, 1)) / st["std"].view(1, -1, 1, 1)
    for level in (2, 3):
        _, p = fft_ops.radial_power_spectrum(fft_ops.attenuate(zn, level, fr))
        np.testing.assert_allclose(res["spectra"][str(level)], p.numpy(), rtol=1e-4, atol=1e-7)


def test_fid_record_keeps_one_entry_per_network(tmp_path):
    import argparse
    a = argparse.Namespace(samples="s.npz", record=str(tmp_path))
    ev.report_generation(a, {"network": "DL-net", "fd_dl": 3.0})
    ev.report_generation(a, {"network": "Inception", "fid": 7.0})
    ev.report_generation(a, {"network": "DL-net", "fd_dl": 2.0})               # a later evaluation replaces its own
    rec = json.loads((tmp_path / "generation_metrics.json").read_text())
    unknown = ev.sample_set_protocol("s.npz")                                  # no manifest.json beside it
    assert rec == {"DL-net": {"samples": "s.npz", "labels": unknown, "network": "DL-net", "fd_dl": 2.0},
                   "Inception": {"samples": "s.npz", "labels": unknown, "network": "Inception", "fid": 7.0}}


def test_fid_deadleaves_network_flags_reach_the_network(tmp_path, monkeypatch):
    class Built(Exception):
        pass
    seen = {}

    def spy(resolution, device="cpu", cache_dir=None, n_train=1000, steps=300):
        seen.update(resolution=resolution, n_train=n_train, steps=steps)
        raise Built
    monkeypatch.setattr(ev, "DeadLeavesExtractor", spy)
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 24, 24, 3), np.uint8))
    with pytest.raises(Built):
        ev.main(["fid", "--features", "deadleaves", "--samples", str(tmp_path / "s.npz"), "--dl-train-images", "50",
                 "--dl-steps", "7"])
    assert seen == dict(resolution=24, n_train=50, steps=7)


def test_fid_reference_crop_follows_resolution(tmp_path, monkeypatch):
    """The reference folder is cropped at the samples' side (also with .npz samples, also with --resolution
    given); --resolution other than the samples' side is one line, never a number."""
    from PIL import Image
    rng = np.random.default_rng(5)
    (tmp_path / "ref" / "a").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "ref" / "a" / f"{i}.png")
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    sides = []

    class Shapes:
        name = "stand-in: pixel means (not Inception)"
        mode, network_hash, dims, sfid_missing = "adm", "stand-in", (3, None), "stand-in"

        def __call__(self, imgs):
            imgs = np.asarray(imgs)
            sides.append(imgs.shape[1:3])
            f = np.stack([imgs.mean((1, 2, 3)), imgs[..., 0].mean((1, 2)), imgs[..., 1].std((1, 2))], 1)
            return f.astype(np.float64), np.full((len(imgs), 4), 0.25), None
    monkeypatch.setattr(ev, "find_inception", lambda path=None: "stand-in")
    monkeypatch.setattr(ev, "InceptionExtractor", lambda path, device, mode="adm": Shapes())
    for extra in ([], ["--resolution", "16"]):
        sides.clear()
        ev.main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref"), *extra])
        assert sorted(set(sides)) == [(16, 16)], (extra, sides)
    sides.clear()
    with pytest.raises(common.UserError, match="not --resolution 24"):
        ev.main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref"), "--resolution", "24"])
    assert sides == []


@pytest.mark.parametrize("gan_real", ["target", "image"])
def test_stage1_discriminator_sees_real_images_as_real_and_reconstructions_as_fake(tmp_path, monkeypatch, gan_real):
    """hinge_d_loss(D(real), D(recon)): real = G_l(x), the level's blurred target (Eq. 2, --gan-real target, the
    default) or the training batch x (--gan-real image); recon the generator's output."""
    import copy
    seen, real_g, real_d = [], train_vae.generator_loss, train_vae.hinge_d_loss

    def spy_g(model, disc, perceptual, x, *rest):
        out = real_g(model, disc, perceptual, x, *rest)
        seen.append({"x": x.clone(), "target": out[2].detach().clone(), "recon": out[3].detach().clone(),
                     "disc": copy.deepcopy(common.unwrap(disc))})
        return out

    def spy_d(real_logits, fake_logits):
        seen[-1]["logits"] = (real_logits.detach().clone(), fake_logits.detach().clone())
        return real_d(real_logits, fake_logits)
    monkeypatch.setattr(train_vae, "generator_loss", spy_g)
    monkeypatch.setattr(train_vae, "hinge_d_loss", spy_d)
    extra = [] if gan_real == "target" else ["--gan-real", "image"]
    train_vae.main(["--preset", "smoke", "--out", str(tmp_path), "--steps", "6", "--gan-start", "1", "--val-every", "0",
                    "--sample-every", "100", "--ckpt-every", "100", *extra])
    assert "logits" not in seen[0]                                             # before --gan-start
    blurred = 0
    for s in seen[1:]:
        real = s["target"] if gan_real == "target" else s["x"]
        with torch.no_grad():
            torch.testing.assert_close(s["logits"][0], s["disc"](real))
            torch.testing.assert_close(s["logits"][1], s["disc"](s["recon"]))
            if not torch.equal(s["target"], s["x"]):                          # a level l > 0: G_l(x) != x
                blurred += 1
                assert not torch.allclose(s["disc"](s["target"]), s["disc"](s["x"]), atol=1e-6)
    assert blurred >= 1                                                        # the two readings were told apart


def test_inception_score_is_of_the_samples_not_the_reference():
    p_fake, p_real = drifting_probabilities(200, 6, seed=1), drifting_probabilities(300, 6, seed=2) ** 4
    probs = np.concatenate([p_fake, p_real / p_real.sum(1, keepdims=True)])

    def carrying(i):                                    # images (N, 1, 1, 3) that carry their index i in R, G
        return np.stack([i % 256, i // 256, 0 * i], 1).reshape(-1, 1, 1, 3).astype(np.uint8)

    class ByIndex:
        """Stand-in (not Inception): returns the class probabilities of the index an image carries."""
        name = "stand-in (not Inception)"

        def __call__(self, imgs):
            i = imgs[:, 0, 0, 0].astype(np.int64) + 256 * imgs[:, 0, 0, 1].astype(np.int64)
            return np.stack([np.sin(i), np.cos(i), np.sin(2 * i)], 1), probs[i].astype(np.float64)
    res = ev.generation_metrics(ByIndex(), carrying(np.arange(200)), real=carrying(200 + np.arange(300)))
    assert res["is"] == pytest.approx(ev.inception_score(p_fake)[0], rel=1e-6)
    assert abs(ev.inception_score(probs[200:])[0] - res["is"]) > 0.1


def test_stage2_measures_its_own_statistics_on_other_data_over_stats_images(smoke_models, tmp_path):
    """The smoke VAE's statistics were taken on 64 dead-leaves images; on 48 Stage 2 measures its own, over a
    seeded random subset of --stats-images of its training images (never the held-out ones), and stores them."""
    from data import random_subset
    td.main(smoke(smoke_models, tmp_path, "--n-images", "48", "--stats-images", "20", "--steps", "1", "--seed", "2",
                  "--val-every", "0", "--sample-every", "100"))
    st = load_checkpoint(str(tmp_path / "last.pt"), "sit")["latent_stats"]
    vae, _ = load_vae(str(smoke_models / "vae" / "last.pt"))
    ds = DeadLeaves(n=48, resolution=16, seed=2)
    with torch.no_grad():
        train_idx, _ = train_val_split(48, 8, 2)                  # the smoke preset's 8 held-out images excluded
        mu = vae.encode(torch.stack([ds[train_idx[i]][0] for i in random_subset(len(train_idx), 20, 2)])).mean
    assert st["n_images"] == 20
    torch.testing.assert_close(st["mean"], mu.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(st["std"], mu.transpose(0, 1).flatten(1).std(1, unbiased=False), atol=1e-5, rtol=1e-4)
