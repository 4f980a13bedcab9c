"""Stage 2: latents, FreqWarm switch, FDA, denoise level, resume, DDP and errors."""

import pytest
import torch

import fft_ops
import train_diffusion as td
import train_vae
from common import UserError, load_checkpoint, save_checkpoint
from data import DeadLeaves
from helpers import assert_one_line_error, read_metrics, run, sigterm_after_first_log


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    train_vae.main(["--preset", "smoke", "--out", str(out), "--gan-weight", "0"])
    return str(out / "last.pt")


def smoke(vae, out, *extra):
    return ["--preset", "smoke", "--vae", vae, "--out", str(out), *extra]


def test_latents_before_and_after_the_freqwarm_switch(vae_ckpt, tmp_path):
    args = td.get_args(smoke(vae_ckpt, tmp_path, "--freqwarm", "--r0", "0.2", "--warmup-steps", "5"))
    args.image_size = 16
    vae, ck = train_vae.load_vae(vae_ckpt)
    lat = td.Latents(vae, ck["latent_stats"], args, 5, torch.device("cpu"))
    ds = DeadLeaves(n=64, resolution=16)
    x = torch.stack([ds[i][0] for i in range(6)])
    mean, std = ck["latent_stats"]["mean"].view(1, -1, 1, 1), ck["latent_stats"]["std"].view(1, -1, 1, 1)
    low = (vae.encode(fft_ops.lowpass(x, 0.2)).mean - mean) / std
    full = (vae.encode(x).mean - mean) / std
    assert not torch.allclose(low, full, atol=1e-3)
    torch.testing.assert_close(lat.get(4, images=x), low)
    torch.testing.assert_close(lat.get(5, images=x), full)
    # the cache gives the same latents (float16 storage), keys < N unflipped
    lat.build_cache(ds, str(tmp_path / "cache"), vae_ckpt, type("D", (), dict(rank=0, world_size=1, main=True))())
    torch.testing.assert_close(lat.get(4, keys=list(range(6))), low, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lat.get(5, keys=list(range(6))), full, atol=2e-3, rtol=2e-3)
    flipped = (vae.encode(x.flip(-1)).mean - mean) / std
    torch.testing.assert_close(lat.get(5, keys=[64 + i for i in range(6)]), flipped, atol=2e-3, rtol=2e-3)


def test_warmup_fraction_sets_the_phase(vae_ckpt, tmp_path):
    td.main(smoke(vae_ckpt, tmp_path, "--freqwarm", "--steps", "4", "--warmup-frac", "0.5", "--lowpass-kind", "butterworth"))
    assert [r["phase"] for r in read_metrics(tmp_path / "metrics.jsonl")] == ["warmup", "warmup", "full", "full"]
    ck = load_checkpoint(str(tmp_path / "last.pt"), "sit")
    assert ck["freqwarm"] == dict(enabled=True, r0=0.2, kind="butterworth", warmup_steps=2, phase="full")


def test_resume_across_the_switch_is_exact(vae_ckpt, tmp_path):
    common = ["--freqwarm", "--warmup-steps", "2", "--ckpt-every", "1", "--sample-every", "100", "--cache-latents"]
    td.main(smoke(vae_ckpt, tmp_path / "a", *common, "--steps", "4"))
    td.main(smoke(vae_ckpt, tmp_path / "b", *common, "--steps", "1"))
    assert load_checkpoint(str(tmp_path / "b" / "last.pt"), "sit")["freqwarm"]["phase"] == "warmup"
    td.main(smoke(vae_ckpt, tmp_path / "b", *common, "--steps", "4"))
    ma, mb = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["phase"] for r in mb] == ["warmup", "warmup", "full", "full"]
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]
    a, b = (load_checkpoint(str(tmp_path / r / "last.pt"), "sit") for r in "ab")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def _batch(vae_ckpt, tmp_path, *flags):
    args = td.get_args(smoke(vae_ckpt, tmp_path, *flags))
    d = type("D", (), dict(device=torch.device("cpu")))()
    torch.manual_seed(0)
    vae, stats, ds, student, ema, opt = td.build(args, d)
    with torch.no_grad():                          # move off the zero init so every path carries signal
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema.load_state_dict(student.sit.state_dict())
    z = torch.randn(4, 4, 4, 4)
    y, t, eps = torch.tensor([0, 1, 2, 3]), torch.tensor([0.1, 0.4, 0.7, 0.95]), torch.randn(4, 4, 4, 4)
    return args, student, ema, z, y, t, eps


def test_denoise_level_target_is_attenuated_latent(vae_ckpt, tmp_path):
    args, student, ema, z, y, t, eps = _batch(vae_ckpt, tmp_path, "--denoise-level", "2")
    _, parts = td.diffusion_loss(student, ema, z, y, t, eps, args, 0)
    z2 = fft_ops.attenuate(z, 2)
    v = student.sit((1 - t.view(-1, 1, 1, 1)) * z2 + t.view(-1, 1, 1, 1) * eps, t, y)
    torch.testing.assert_close(parts["diff"], ((v - (eps - z2)) ** 2).mean())
    assert not torch.allclose(z2, z)


def test_fda_teacher_gets_no_gradient_and_changes_student_gradients(vae_ckpt, tmp_path):
    args, student, ema, z, y, t, eps = _batch(vae_ckpt, tmp_path, "--fda", "--fda-depth", "1")
    loss, parts = td.diffusion_loss(student, ema, z, y, t, eps, args, 0)
    loss.backward()
    assert parts["align"] > 0
    assert all(p.grad is None for p in ema.parameters())
    with_fda = [p.grad.clone() for p in student.sit.parameters()]
    assert student.projector.net[0].weight.grad.abs().sum() > 0
    student.zero_grad()
    args.fda = False
    td.diffusion_loss(student, ema, z, y, t, eps, args, 0)[0].backward()
    without = [p.grad for p in student.sit.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(with_fda, without))


def test_fda_alignment_is_zero_when_features_coincide(vae_ckpt, tmp_path):
    """Identity projector, teacher == student, t = 0 and a latent that attenuation leaves unchanged."""
    args, student, ema, _, y, _, eps = _batch(vae_ckpt, tmp_path, "--fda", "--fda-depth", "1")
    student.projector = torch.nn.Identity()
    z = torch.ones(4, 4, 4, 4) * torch.randn(1, 4, 1, 1)            # DC only: S_l(z) == z for all l
    t = torch.zeros(4)
    _, parts = td.diffusion_loss(student, ema, z, y, t, eps, args, 0)
    assert parts["align"].item() == pytest.approx(0.0, abs=1e-10)


def test_fda_lambda_and_teacher_levels(vae_ckpt, tmp_path):
    args = td.get_args(smoke(vae_ckpt, tmp_path, "--fda", "--denoise-level", "1"))
    t = torch.tensor([0.0, 0.5, 1.0])
    assert td.fda_lambda(t, args).tolist() == [0.0, 0.25, 0.5]          # larger at high noise
    args.fda_schedule = "constant"
    assert td.fda_lambda(t, args).tolist() == [0.5, 0.5, 0.5]
    levels = {td.teacher_level(args, s) for s in range(200)}
    assert levels == {2, 3}


def test_smoke_writes_samples_and_sit_checkpoint(vae_ckpt, tmp_path):
    td.main(smoke(vae_ckpt, tmp_path, "--cfg-scale", "2.0", "--sampler", "euler"))
    ck = load_checkpoint(str(tmp_path / "last.pt"), "sit")
    assert ck["step"] == 6 and ck["config"]["vae"] == vae_ckpt and ck["latent_stats"] is not None
    assert (tmp_path / "samples_0000006.png").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(vae_ckpt, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = td.velocity_target

    def target_then_nan(x0, eps):
        calls["n"] += 1
        return real(x0, eps) * (float("nan") if calls["n"] > 3 else 1.0)

    monkeypatch.setattr(td, "velocity_target", target_then_nan)
    with pytest.raises(UserError, match="loss is nan at step 3: stopped; last good checkpoint"):
        td.main(smoke(vae_ckpt, tmp_path))
    assert load_checkpoint(str(tmp_path / "last.pt"), "sit")["step"] == 3


def test_sigterm_saves_checkpoint(vae_ckpt, tmp_path):
    rc, out, err = sigterm_after_first_log(["train_diffusion.py", *smoke(vae_ckpt, tmp_path, "--steps", "100000",
                                            "--ckpt-every", "100000")], str(tmp_path / "metrics.jsonl"))
    assert rc == 143, err[-2000:]                   # 128 + SIGTERM: a scheduler can tell it from a finished run
    assert 1 <= load_checkpoint(str(tmp_path / "last.pt"), "sit")["step"] < 100000
    assert "done:" not in out and "stopped by SIGTERM" in err


def test_errors_are_one_clear_line(vae_ckpt, tmp_path):
    sit = tmp_path / "sit"
    td.main(smoke(vae_ckpt, sit, "--steps", "1"))
    assert_one_line_error(run(["train_diffusion.py", *smoke(str(sit / "last.pt"), tmp_path / "x")]),
                          "'sit' checkpoint", "'vae' checkpoint is needed")
    assert_one_line_error(run(["train_diffusion.py", *smoke(vae_ckpt, tmp_path / "x", "--freqwarm", "--r0", "0.9")]),
                          "r0 must be in (0, 0.71]")
    # a SiT trained on 4-channel latents resumed with an 8-channel VAE
    vae8 = tmp_path / "vae8"
    train_vae.main(["--preset", "smoke", "--latent-dim", "8", "--steps", "1", "--out", str(vae8)])
    assert_one_line_error(run(["train_diffusion.py", *smoke(str(vae8 / "last.pt"), tmp_path / "x",
                                                            "--resume", str(sit / "last.pt"))]),
                          "4-channel latents", "8 channels")
    nostats = tmp_path / "nostats.pt"
    ck = load_checkpoint(vae_ckpt, "vae")
    save_checkpoint(str(nostats), {**ck, "latent_stats": None})
    assert_one_line_error(run(["train_diffusion.py", *smoke(str(nostats), tmp_path / "x")]), "--stats-only")


def test_ddp_two_ranks_equal_one_process(vae_ckpt, tmp_path):
    """torchrun --nproc_per_node=2 on CPU (gloo) with FreqWarm + FDA + cache == one process."""
    flags = ["--freqwarm", "--r0", "0.2", "--warmup-steps", "2", "--fda", "--cache-latents", "--steps", "3"]
    one = run(["train_diffusion.py", *smoke(vae_ckpt, tmp_path / "one", *flags)])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(["train_diffusion.py", *smoke(vae_ckpt, tmp_path / "two", *flags)], torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "switching from low-passed" in two.stdout
    m1, m2 = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert m1[0]["grad_norm"] == pytest.approx(m2[0]["grad_norm"], rel=1e-4)
    assert [r["loss"] for r in m1] == pytest.approx([r["loss"] for r in m2], rel=1e-4)
    a, b = (load_checkpoint(str(tmp_path / r / "last.pt"), "sit") for r in ("one", "two"))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-4, rtol=1e-4)
