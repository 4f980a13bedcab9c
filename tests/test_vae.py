"""Stage 1: ViT VAE pieces, MLSR objective, checkpoints, resume, DDP and errors."""

import signal

import pytest
import torch

import fft_ops
import train_vae
from common import UserError, load_checkpoint, save_checkpoint
from helpers import assert_one_line_error, read_metrics, run, sigterm_after_first_log
from vae import (Attention, DiagonalGaussian, PatchDiscriminator, VGGPerceptual, ViTVAE, hinge_d_loss, patchify,
                 load_vae, unpatchify)

SMOKE = ["--preset", "smoke"]


@pytest.mark.parametrize("cfg", [dict(image_size=24, patch=4, width=32, depth=1, heads=2, latent_dim=3),
                                 dict(image_size=40, patch=8, width=48, depth=2, heads=3, latent_dim=5)])
def test_encode_decode_shapes(cfg):
    vae = ViTVAE(**cfg)
    x = torch.randn(2, 3, cfg["image_size"], cfg["image_size"])
    post = vae.encode(x)
    s = cfg["image_size"] // cfg["patch"]
    assert post.mean.shape == (2, cfg["latent_dim"], s, s) and post.mean.dtype == torch.float32
    assert vae.decode(post.sample()).shape == x.shape
    recon, _ = train_vae.MLSRPath(vae)(x, None, 2, fft_ops.MLSR_FRACTIONS)
    assert recon.shape == x.shape
    with pytest.raises(ValueError, match="channels"):
        vae.decode(torch.randn(1, cfg["latent_dim"] + 1, s, s))


def test_patchify_roundtrip():
    x = torch.randn(2, 5, 12, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 80)
    assert torch.equal(unpatchify(p, 4, 3, 2), x)
    assert torch.equal(p[0, 1], x[0, :, 0:4, 4:8].permute(1, 2, 0).flatten())   # patch (0, 1)


def test_attention_matches_torch_multihead():
    torch.manual_seed(0)
    ours, ref = Attention(32, 4), torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight), ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight), ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-4)


def test_posterior_kl_and_clamp():
    zeros = torch.zeros(2, 8, 4, 4)                          # mean 0, logvar 0: N(0, I)
    assert DiagonalGaussian(zeros).kl().item() == 0.0
    m = torch.cat([torch.full((1, 2, 3, 3), 0.5), torch.full((1, 2, 3, 3), 100.0)], dim=1)
    post = DiagonalGaussian(m)
    assert post.logvar.max().item() == 20.0
    assert DiagonalGaussian(-m).logvar.min().item() == -30.0
    # closed form for mean mu, logvar 0: 0.5 * mu^2 per element
    one = torch.cat([torch.full((1, 2, 3, 3), 0.5), torch.zeros(1, 2, 3, 3)], dim=1)
    assert DiagonalGaussian(one).kl().item() == pytest.approx(0.5 * 0.25 * 18)
    assert DiagonalGaussian(m.bfloat16()).mean.dtype == torch.float32


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=g), 3 * torch.randn(3, 4, 5, 5, generator=g)
    got = DiagonalGaussian(torch.cat([mean, logvar], dim=1).double()).kl()
    q = torch.distributions.Normal(mean.double(), (0.5 * logvar.double()).exp())
    p = torch.distributions.Normal(torch.zeros(()).double(), torch.ones(()).double())
    ref = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)).mean()    # summed per sample, batch mean
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_generator_hinge_loss_sign_and_value():
    """The generator minimises -D(G(z)): a loss of -mean(logits), added with weight --gan-weight."""
    from vae import hinge_g_loss
    logits = torch.tensor([1.5, -0.5, 2.0, 0.0])
    assert hinge_g_loss(logits).item() == pytest.approx(-0.75)
    args = train_vae.get_args(SMOKE + ["--gan-weight", "0.3", "--gan-start", "0", "--kl-weight", "0.01"])
    torch.manual_seed(0)
    vae, disc = ViTVAE(image_size=16, patch=4, width=32, depth=1, heads=2, latent_dim=4), PatchDiscriminator(16, 2)
    x, noise = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 4, 4)
    loss, parts, target, recon = train_vae.generator_loss(train_vae.MLSRPath(vae), disc, None, x, noise, 1, args, 0)
    fake = disc(recon)
    torch.testing.assert_close(parts["g_gan"], -fake.mean())
    post = vae.encode(x)
    torch.testing.assert_close(loss, ((recon - target) ** 2).mean() + 0.01 * post.kl() - 0.3 * fake.mean())
    # the discriminator's own parameters get no gradient from the generator loss
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())


def test_perceptual_input_normalisation():
    """[-1, 1] -> [0, 1] -> ImageNet mean / std (torchvision's VGG16 preset), then unit-normalised taps."""
    import torchvision
    net = VGGPerceptual(weights=None)
    preset = torchvision.models.VGG16_Weights.IMAGENET1K_V1.transforms()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    norm = lambda im: torchvision.transforms.functional.normalize((im + 1) / 2, preset.mean, preset.std)
    ref, hx, hy = 0.0, norm(x), norm(y)
    for i, layer in enumerate(net.features):
        hx, hy = layer(hx), layer(hy)
        if i in (3, 8, 15, 22, 29):                           # relu1_2 ... relu5_3
            fx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ref = ref + (fx - fy).pow(2).sum(1).mean()
    torch.testing.assert_close(net(x, y), ref, rtol=1e-5, atol=1e-6)


def test_discriminator_and_hinge():
    d = PatchDiscriminator(16, 2)
    assert d(torch.randn(2, 3, 32, 32)).shape[:2] == (2, 1)
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 2.0


def test_perceptual_stand_in_and_local_weights(tmp_path):
    import torchvision
    stand_in = VGGPerceptual(weights=None)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert stand_in(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert stand_in(x, y).item() > 0
    torch.manual_seed(1)
    path = tmp_path / "vgg.pth"
    ref = torchvision.models.vgg16(weights=None)
    torch.save(ref.state_dict(), path)
    loaded = VGGPerceptual(weights=str(path))
    assert torch.equal(loaded.features[0].weight, ref.features[0].weight)


def test_missing_vgg_weights_is_one_clear_line(tmp_path):
    p = run(["train_vae.py", *SMOKE, "--perceptual-weight", "1", "--out", str(tmp_path / "r")],
            env={"TORCH_HOME": str(tmp_path / "torchhome")})
    assert_one_line_error(p, "VGG16", "vgg16-397923af.pth", "--perceptual-weights")


# ----------------------------------------------------------------------------- MLSR objective

def test_level_sampler_covers_all_levels_uniformly():
    args = train_vae.get_args(SMOKE)
    levels = [train_vae.sample_level(args, s) for s in range(400)]
    counts = [levels.count(l) for l in range(4)]
    assert min(counts) > 70, counts
    assert levels == [train_vae.sample_level(args, s) for s in range(400)]   # deterministic


def test_level0_target_is_x_and_level_targets_blurred():
    args = train_vae.get_args(SMOKE + ["--gan-weight", "0"])
    torch.manual_seed(0)
    vae = ViTVAE(image_size=16, patch=4, width=32, depth=1, heads=2, latent_dim=4)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    noise = torch.randn(2, 4, 4, 4)
    _, _, target0, _ = train_vae.generator_loss(train_vae.MLSRPath(vae), None, None, x, noise, 0, args, 0)
    assert torch.equal(target0, x)
    _, parts, target3, recon3 = train_vae.generator_loss(train_vae.MLSRPath(vae), None, None, x, noise, 3, args, 0)
    torch.testing.assert_close(target3, fft_ops.gaussian_blur(x, 0.5))
    # the reconstruction at level 3 decodes S_3 of the sampled latent
    z = vae.encode(x).sample(noise)
    torch.testing.assert_close(recon3, vae.decode(fft_ops.attenuate(z, 3)))
    torch.testing.assert_close(parts["pix"], torch.mean((recon3 - target3) ** 2))


def test_smoke_overfits_a_fixed_batch(tmp_path):
    out = tmp_path / "fit"
    train_vae.main(SMOKE + ["--n-images", "8", "--val-images", "0", "--steps", "60", "--gan-weight", "0", "--lr", "3e-3",
                            "--log-every", "1", "--ckpt-every", "1000", "--sample-every", "1000", "--out", str(out)])
    m = read_metrics(out / "metrics.jsonl")
    first = sum(r["pix"] for r in m[:5]) / 5
    last = sum(r["pix"] for r in m[-5:]) / 5
    print(f"pixel loss on a fixed batch of 8: {first:.4f} -> {last:.4f}")
    assert last < 0.5 * first


def test_checkpoint_contents_and_latent_stats(tmp_path):
    out = tmp_path / "v"
    train_vae.main(SMOKE + ["--out", str(out)])
    ck = load_checkpoint(str(out / "last.pt"), "vae")
    assert ck["step"] == 6 and ck["config"]["size"] == "smoke" and isinstance(ck["config"], dict)
    assert (out / "recon_final.png").exists() and (out / "recon_0000006.png").exists()
    vae, _ = load_vae(str(out / "last.pt"))
    from data import DeadLeaves, train_val_split
    ds = DeadLeaves(n=64, resolution=16)
    train_idx, _ = train_val_split(64, 8, 0)                     # the 8 held-out images are never in the stats
    subset = torch.randperm(56, generator=torch.Generator().manual_seed(0))[:32]   # seeded, over the training set
    x = torch.stack([ds[train_idx[i]][0] for i in subset.tolist()])
    mu = vae.encode(x).mean                                       # (32, 4, 4, 4)
    st = ck["latent_stats"]
    assert (st["n_images"], st["seed"], st["image_size"]) == (32, 0, 16)
    torch.testing.assert_close(st["mean"], mu.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    std = mu.transpose(0, 1).flatten(1).std(1, unbiased=False)
    torch.testing.assert_close(st["std"], std, atol=1e-5, rtol=1e-4)
    for level in range(4):                                        # std of S_l(z_n), per channel
        zl = fft_ops.attenuate((mu - st["mean"].view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), level)
        torch.testing.assert_close(st["level_std"][level], zl.transpose(0, 1).flatten(1).std(1, unbiased=False),
                                   atol=1e-4, rtol=1e-4)
    assert st["level_std"][0].tolist() == pytest.approx([1.0] * 4, abs=1e-4)
    # --stats-only recomputes them in place over a different sample size
    train_vae.main(SMOKE + ["--out", str(out), "--stats-only", "--resume", str(out / "last.pt"), "--stats-images", "8"])
    assert load_checkpoint(str(out / "last.pt"), "vae")["latent_stats"]["n_images"] == 8


def test_resume_is_exact(tmp_path):
    common = SMOKE + ["--gan-start", "1", "--ckpt-every", "2", "--sample-every", "100"]
    train_vae.main(common + ["--steps", "4", "--out", str(tmp_path / "a")])
    train_vae.main(common + ["--steps", "2", "--out", str(tmp_path / "b")])
    train_vae.main(common + ["--steps", "4", "--out", str(tmp_path / "b")])       # resumes from b/last.pt
    a, b = (load_checkpoint(str(tmp_path / r / "last.pt"), "vae") for r in "ab")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["disc"]:
        assert torch.equal(a["disc"][k], b["disc"][k]), k
    for k in a["ema"]:                                      # the EMA is restored too, not rebuilt from the model
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert any(not torch.equal(a["ema"][k], a["model"][k]) for k in a["ema"])
    la, lb = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert any("d_gan" in r for r in la)                    # the GAN branch ran


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "nan"
    real_blur, calls = fft_ops.gaussian_blur, {"n": 0}

    def blur_then_nan(x, sigma):
        calls["n"] += 1
        return real_blur(x, sigma) * (float("nan") if calls["n"] > 3 else 1.0)

    monkeypatch.setattr(fft_ops, "gaussian_blur", blur_then_nan)
    with pytest.raises(UserError, match=r"loss is nan at step 3: stopped; last good checkpoint: .*last.pt"):
        train_vae.main(SMOKE + ["--gan-weight", "0", "--out", str(out)])
    assert load_checkpoint(str(out / "last.pt"), "vae")["step"] == 3


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_checkpoint_and_exits_nonzero(tmp_path, sig, code):
    out = tmp_path / "sig"
    rc, stdout, err = sigterm_after_first_log(["train_vae.py", *SMOKE, "--steps", "100000", "--ckpt-every", "100000",
                                               "--out", str(out)], str(out / "metrics.jsonl"), sig=sig)
    assert rc == code, err[-2000:]
    step = load_checkpoint(str(out / "last.pt"), "vae")["step"]
    assert 1 <= step < 100000 and "stop signal" in stdout
    assert err.strip().splitlines()[-1].startswith(f"stopped by {sig.name} at step {step}: saved ") and "Traceback" not in err


def test_wrong_checkpoint_kind_and_empty_folder(tmp_path):
    fake = tmp_path / "sit.pt"
    save_checkpoint(str(fake), {"kind": "sit", "config": {}})
    assert_one_line_error(run(["train_vae.py", *SMOKE, "--resume", str(fake), "--out", str(tmp_path / "o")]),
                          "'sit' checkpoint", "'vae'")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    assert_one_line_error(run(["train_vae.py", *SMOKE, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]),
                          "no images found")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    assert_one_line_error(run(["train_vae.py", *SMOKE, "--resume", str(junk), "--out", str(tmp_path / "o")]),
                          "not a readable FreqLDM checkpoint")


def test_ddp_two_ranks_equal_one_process(tmp_path):
    """2 gloo ranks with B/2 each == 1 process with B: same losses, gradient norms and weights."""
    common = ["train_vae.py", *SMOKE, "--steps", "3", "--gan-start", "1", "--ckpt-every", "100"]
    one = run(common + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(common + ["--out", str(tmp_path / "two")], torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert m1[0]["grad_norm"] == pytest.approx(m2[0]["grad_norm"], rel=1e-4)
    for r1, r2 in zip(m1, m2):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-4)
    a, b = (load_checkpoint(str(tmp_path / r / "last.pt"), "vae") for r in ("one", "two"))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-4, rtol=1e-4)   # Adam moves weights ~3e-3 here
    torch.testing.assert_close(a["latent_stats"]["mean"], b["latent_stats"]["mean"], atol=1e-5, rtol=1e-4)


def test_gradient_accumulation_equals_full_batch(tmp_path):
    common = SMOKE + ["--steps", "2", "--gan-weight", "0", "--ckpt-every", "100"]
    train_vae.main(common + ["--out", str(tmp_path / "full")])
    train_vae.main(common + ["--out", str(tmp_path / "acc"), "--micro-batch", "2"])
    m1, m2 = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "acc" / "metrics.jsonl")
    assert m1[0]["grad_norm"] == pytest.approx(m2[0]["grad_norm"], rel=1e-4)
    assert m1[1]["loss"] == pytest.approx(m2[1]["loss"], rel=1e-4)
