"""Stage 2: latents, FreqWarm switch, FDA, denoise level, resume, DDP and errors."""
import shutil

import pytest
import torch

import fft_ops
import train_diffusion as td
import train_vae
from common import UserError, load_checkpoint, save_checkpoint
from data import DeadLeaves
from vae import load_autoencoder, load_vae
from helpers import (Stage2Latents, assert_ema_weights_and_statistics, assert_one_line_error, ranks_report,
                     read_metrics, run, sigterm_after_first_log, spy_sampling)


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
    vae, ck = load_vae(vae_ckpt)
    lat = Stage2Latents(load_autoencoder(vae_ckpt), ck["latent_stats"], args, 5)
    ds = DeadLeaves(n=64, resolution=16)
    x = torch.stack([ds[i][0] for i in range(6)])
    mean, std = ck["latent_stats"]["mean"].view(1, -1, 1, 1), ck["latent_stats"]["std"].view(1, -1, 1, 1)
    low = (vae.encode(fft_ops.lowpass(x, 0.2)).mean - mean) / std
    full = (vae.encode(x).mean - mean) / std
    assert not torch.allclose(low, full, atol=1e-3)
    torch.testing.assert_close(lat.get(4, images=x), low)
    torch.testing.assert_close(lat.get(5, images=x), full)
    # the cache gives the same latents (float16 storage), keys < N unflipped
    lat.build_cache(ds, str(tmp_path / "cache"), type("D", (), dict(rank=0, world_size=1, main=True))())
    torch.testing.assert_close(lat.get(4, keys=list(range(6))), low, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lat.get(5, keys=list(range(6))), full, atol=2e-3, rtol=2e-3)
    flipped = (vae.encode(x.flip(-1)).mean - mean) / std
    torch.testing.assert_close(lat.get(5, keys=[64 + i for i in range(6)]), flipped, atol=2e-3, rtol=2e-3)


def test_warmup_fraction_sets_the_phase(vae_ckpt, tmp_path):
    td.main(smoke(vae_ckpt, tmp_path, "--freqwarm", "--steps", "4", "--warmup-frac", "0.5", "--lowpass-kind", "butterworth"))
    assert [r["phase"] for r in read_metrics(tmp_path / "metrics.jsonl")] == ["warmup", "warmup", "full", "full"]
    ck = load_checkpoint(str(tmp_path / "last.pt"), "sit")
    assert ck["freqwarm"] == dict(enabled=True, r0=0.2, kind="butterworth", schedule="step", stage_radii=[0.2],
                                  warmup_steps=2, phase="full")


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


def _batch(vae_ckpt, tmp_path, *flags, ema_noise=0.0):
    """A perturbed student, its EMA (equal to it, or moved away by ema_noise) and a batch with high frequencies."""
    args = td.get_args(smoke(vae_ckpt, tmp_path, *flags))
    d = type("D", (), dict(device=torch.device("cpu")))()
    torch.manual_seed(0)
    ae, ds, student, ema, opt = td.build(args, d)
    with torch.no_grad():                          # move off the zero init so every path carries signal
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema.load_state_dict(student.sit.state_dict())
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(ema_noise * torch.randn_like(p))
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
    args, student, ema, z, y, t, eps = _batch(vae_ckpt, tmp_path, "--fda", "--fda-depth", "1", ema_noise=0.05)
    ema.requires_grad_(True)                       # so that a missing stop-gradient would show up as .grad
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


def test_fda_loss_and_student_gradients_by_hand(vae_ckpt, tmp_path):
    """Eq. 6-8 recomputed here: student on noisy S_lo(z) at t, EMA teacher on clean S_hi(z) at t = 0 without
    gradient, per-sample lambda(t) = w t; the loss parts and every student gradient must match."""
    args, student, ema, z, y, t, eps = _batch(vae_ckpt, tmp_path, "--fda", "--fda-depth", "1", "--denoise-level", "1",
                                              "--fda-weight", "0.7", ema_noise=0.05)
    ema.requires_grad_(True)
    assert any(not torch.equal(p, q) for p, q in zip(ema.parameters(), student.sit.parameters()))
    steps = {td.teacher_level(args, s): s for s in range(20)}
    assert set(steps) == {2, 3}
    tt = t.view(-1, 1, 1, 1)
    for level, step in sorted(steps.items()):
        z_lo, z_hi = fft_ops.attenuate(z, 1), fft_ops.attenuate(z, level)
        assert not torch.allclose(z_lo, z, atol=1e-2) and not torch.allclose(z_hi, z_lo, atol=1e-2)
        v, h = student.sit((1 - tt) * z_lo + tt * eps, t, y, return_hidden=1)
        with torch.no_grad():
            _, h_teacher = ema(z_hi, torch.zeros(4), y, return_hidden=1)
        diff = ((v - (eps - z_lo)) ** 2).mean()
        align = ((student.projector(h) - h_teacher) ** 2).mean(dim=(1, 2))             # (B,)
        ref = diff + (0.7 * t * align).mean()
        params = [p for p in student.parameters()]
        ref_grads = torch.autograd.grad(ref, params)
        student.zero_grad()
        loss, parts = td.diffusion_loss(student, ema, z, y, t, eps, args, step)
        loss.backward()
        torch.testing.assert_close(parts["diff"], diff)
        torch.testing.assert_close(parts["align"], align.mean())
        torch.testing.assert_close(loss, ref)
        for p, g in zip(params, ref_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
        assert all(p.grad is None for p in ema.parameters())
        assert not torch.allclose(align, align.mean().expand(4))          # lambda(t) weights samples unequally


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


def test_smoke_writes_samples_and_sit_checkpoint(vae_ckpt, tmp_path, monkeypatch):
    seen = spy_sampling(monkeypatch, td, td)
    td.main(smoke(vae_ckpt, tmp_path, "--cfg-scale", "2.0", "--sampler", "euler"))
    ck = load_checkpoint(str(tmp_path / "last.pt"), "sit")
    assert ck["step"] == 6 and ck["config"]["vae"] == vae_ckpt and ck["latent_stats"] is not None
    assert (tmp_path / "samples_0000006.png").exists()
    # the grid of step 6 (drawn just before that checkpoint) used the EMA, the guidance scale and the statistics
    assert seen["scale"] == 2.0
    assert_ema_weights_and_statistics(seen, ck, vae_ckpt)


def test_label_dropout_rate_follows_class_dropout(vae_ckpt, tmp_path, monkeypatch):
    labels, real = [], td.diffusion_loss

    def spy(student, ema, z, y, *rest):
        labels.append(y.clone())
        return real(student, ema, z, y, *rest)

    monkeypatch.setattr(td, "diffusion_loss", spy)
    td.main(smoke(vae_ckpt, tmp_path, "--class-dropout", "0.3", "--steps", "8", "--global-batch", "64",
                  "--cache-latents", "--sample-every", "100", "--ckpt-every", "100"))
    y = torch.cat(labels)
    assert len(y) == 8 * 64
    null = DeadLeaves(n=64, resolution=16).num_classes
    frac = (y == null).float().mean().item()
    print(f"null-label fraction with --class-dropout 0.3: {frac:.3f} over {len(y)} labels")
    assert abs(frac - 0.3) < 4 * (0.3 * 0.7 / len(y)) ** 0.5                # 4 binomial standard deviations
    assert y.max() == null and (y[y != null] < null).all()


def test_gradient_accumulation_equals_full_batch(vae_ckpt, tmp_path):
    """--micro-batch 2 (4 micro-batches of the batch of 8) == the full batch in one forward, with FDA."""
    common = ["--steps", "2", "--fda", "--ckpt-every", "100", "--sample-every", "100"]
    td.main(smoke(vae_ckpt, tmp_path / "full", *common))
    td.main(smoke(vae_ckpt, tmp_path / "acc", *common, "--micro-batch", "2"))
    m1, m2 = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "acc" / "metrics.jsonl")
    for r1, r2 in zip(m1, m2):
        for k in ("loss", "diff", "align", "grad_norm"):
            assert r1[k] == pytest.approx(r2[k], rel=1e-4), k
    a, b = (load_checkpoint(str(tmp_path / r / "last.pt"), "sit") for r in ("full", "acc"))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4)


def test_resume_keeps_the_stored_switch_and_restores_the_ema_teacher(vae_ckpt, tmp_path):
    """The switch step stored in the checkpoint wins over a changed --steps / --warmup-frac; with FDA the
    restored EMA is the teacher, so losses, weights and EMA must equal an uninterrupted run's."""
    common = ["--fda", "--freqwarm", "--ckpt-every", "100", "--sample-every", "100"]
    td.main(smoke(vae_ckpt, tmp_path / "a", *common, "--steps", "4", "--warmup-steps", "2"))
    td.main(smoke(vae_ckpt, tmp_path / "b", *common, "--steps", "2", "--warmup-frac", "1.0"))    # switch at step 2
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    td.main(smoke(vae_ckpt, tmp_path / "b", *common, "--steps", "4", "--warmup-frac", "1.0"))    # would be 4
    td.main(smoke(vae_ckpt, tmp_path / "c", *common, "--steps", "4", "--warmup-frac", "0.25"))   # would be 1
    a = load_checkpoint(str(tmp_path / "a" / "last.pt"), "sit")
    ma = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["phase"] for r in ma] == ["warmup", "warmup", "full", "full"]
    for run_dir in ("b", "c"):
        m = read_metrics(tmp_path / run_dir / "metrics.jsonl")
        assert [r["phase"] for r in m] == [r["phase"] for r in ma], run_dir
        assert [r["loss"] for r in m] == [r["loss"] for r in ma], run_dir
        ck = load_checkpoint(str(tmp_path / run_dir / "last.pt"), "sit")
        assert ck["freqwarm"]["warmup_steps"] == 2
        for part in ("model", "ema"):
            for k in a[part]:
                assert torch.equal(a[part][k], ck[part][k]), (run_dir, part, k)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(vae_ckpt, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = td.velocity_loss

    def loss_then_nan(v, x0, eps):
        calls["n"] += 1
        return real(v, x0, eps) * (float("nan") if calls["n"] > 3 else 1.0)

    monkeypatch.setattr(td, "velocity_loss", loss_then_nan)
    with pytest.raises(UserError, match="loss is nan at step 3: stopped; last good checkpoint"):
        td.main(smoke(vae_ckpt, tmp_path, "--val-every", "0"))          # counts the training losses only
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
    p = run(["train_diffusion.py", *smoke(str(nostats), tmp_path / "x")])      # Stage 2 computes its own
    assert p.returncode == 0 and "computing them over 56 random training images" in p.stdout, p.stderr[-2000:]
    assert load_checkpoint(str(tmp_path / "x" / "last.pt"), "sit")["latent_stats"]["n_images"] == 56   # 8 held out


def test_ddp_two_ranks_equal_one_process(vae_ckpt, tmp_path):
    """torchrun --nproc_per_node=2 on CPU (gloo), 2 micro-batches per rank, with FreqWarm + FDA + cache == one
    process with the whole batch in one forward; the latent statistics (27 images: 14 on rank 0, 13 on rank 1)
    are those of one process."""
    nostats = tmp_path / "vae-nostats.pt"                       # so that Stage 2 measures them, over the ranks
    save_checkpoint(str(nostats), {**load_checkpoint(vae_ckpt, "vae"), "latent_stats": None})
    flags = ["--freqwarm", "--r0", "0.2", "--warmup-steps", "2", "--fda", "--cache-latents", "--steps", "3",
             "--stats-images", "27"]
    one = run(["train_diffusion.py", *smoke(str(nostats), tmp_path / "one", *flags)])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(["train_diffusion.py", *smoke(str(nostats), tmp_path / "two", *flags, "--micro-batch", "2")],
              torchrun=2, timeout=600, env={"TORCH_SHOW_CPP_STACKTRACES": "1"})   # a C++ abort says where
    assert two.returncode == 0, ranks_report(two)
    assert "switching from low-passed" in two.stdout
    m1, m2 = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert m1[0]["grad_norm"] == pytest.approx(m2[0]["grad_norm"], rel=1e-4)
    assert [r["loss"] for r in m1] == pytest.approx([r["loss"] for r in m2], rel=1e-4)
    a, b = (load_checkpoint(str(tmp_path / r / "last.pt"), "sit") for r in ("one", "two"))
    assert a["latent_stats"]["n_images"] == b["latent_stats"]["n_images"] == 27
    for k in ("mean", "std", "level_std"):
        torch.testing.assert_close(a["latent_stats"][k], b["latent_stats"][k], atol=1e-5, rtol=1e-5)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-4, rtol=1e-4)


RELEASE_PROBE = """
import gc, os, sys, weakref
gc.disable()                                   # a wrapper kept alive by a reference cycle fails every time
sys.path.insert(0, os.getcwd())
import common, {module} as script
wrappers, calls = [], [0]
class Recorded(script.DDP):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        wrappers.append(weakref.ref(self))
    def forward(self, *a, **k):
        calls[0] += 1
        if {stop} and calls[0] == 2:           # both ranks stop at their second forward, after one step
            raise common.UserError("stopped by the probe")
        return super().forward(*a, **k)
script.DDP = Recorded
try:
    common.run_main(script.main)
    status = 0
except SystemExit as e:                        # counted while the exit is on its way out of the interpreter
    status = e.code
    alive = sum(w() is not None for w in wrappers)
else:
    alive = sum(w() is not None for w in wrappers)
print(f"rank {{os.environ['RANK']}}: exit {{status}}, {{len(wrappers)}} DDP wrapper(s), {{alive}} alive", flush=True)
sys.exit(3 if status != {status} or not wrappers or alive else 0)
"""


@pytest.mark.parametrize("module,stop", [("train_vae", False), ("train_diffusion", False), ("train_diffusion", True)])
def test_ranks_release_their_ddp_model_before_teardown(vae_ckpt, tmp_path, module, stop):
    """A DDP model (its reducer holds the process group) still referenced when the interpreter exits is torn
    down during finalization, and under CPU load gloo then aborts the rank with SIGABRT ('terminate called
    without an active exception'). Each trainer's DDP wrappers must be gone when run_main tears the process
    group down and exits: after a finished run, and after one stopped by an error (exit status 2), whose
    traceback would otherwise hold the training frames on into exit."""
    probe = tmp_path / "probe.py"
    probe.write_text(RELEASE_PROBE.format(module=module, stop=stop, status=2 if stop else 0))
    args = ["--preset", "smoke"] + (["--gan-weight", "0"] if module == "train_vae" else ["--vae", vae_ckpt])
    p = run([str(probe), *args, "--out", str(tmp_path / "run"), "--steps", "2"], torchrun=2, timeout=600)
    assert p.returncode == 0, ranks_report(p)
    assert (stop and "stopped by the probe" in p.stderr) or (not stop and "stopped" not in p.stderr), p.stderr[-2000:]


def kept_steps(out):
    return sorted(int(f.name[4:-3]) for f in (out / "keep").iterdir() if f.name.startswith("ema_"))


def test_keep_every_keeps_exactly_those_steps_and_resumes_right(vae_ckpt, tmp_path, capsys):
    """--keep-every 2 keeps the EMA (and only what sampling needs) at steps 2, 4, 6, equal to the EMA of an
    uninterrupted run at those steps. A run stopped after keeping step 4 but with last.pt at step 3 (plus a
    stale step 6 of a longer attempt) resumes from 3: the kept files past 3 are replaced by the resumed run's,
    and a resume with --steps 5 leaves none past 5. Kept files are never resumed from."""
    common = ["--ckpt-every", "3", "--sample-every", "100", "--keep-every", "2"]
    td.main(smoke(vae_ckpt, tmp_path / "a", *common, "--steps", "7", "--sampler", "sde", "--sample-steps", "3"))
    a = tmp_path / "a"
    assert kept_steps(a) == [2, 4, 6] and (a / "samples_0000007.png").is_file()    # the last grid by the SDE
    with pytest.raises(UserError, match="--sampler sde needs --sample-steps >= 2"):
        td.get_args(smoke(vae_ckpt, a, "--sampler", "sde", "--sample-steps", "1"))
    ema = {s: load_checkpoint(str(a / "keep" / f"ema_{s:07d}.pt"), "sit") for s in (2, 4, 6)}
    for s, k in ema.items():
        assert k["step"] == s and k["ema_only"] and not {"model", "opt", "rng"} & set(k)
        assert k["latent_stats"]["mean"].shape == (4,) and k["model_config"]["in_channels"] == 4
    td.main(smoke(vae_ckpt, tmp_path / "ref", "--ckpt-every", "3", "--sample-every", "100", "--steps", "4"))
    ref = load_checkpoint(str(tmp_path / "ref" / "last.pt"), "sit")["ema"]     # the EMA of step 4, by another run
    assert all(torch.equal(ema[4]["ema"][n], ref[n]) for n in ref)
    assert not all(torch.equal(ema[2]["ema"][n], ref[n]) for n in ref)

    b = tmp_path / "b"                                      # stopped at step 5: last.pt of step 3, kept 2 and 4
    td.main(smoke(vae_ckpt, b, *common, "--steps", "3"))
    step3 = b / "step3.pt"
    shutil.copy(b / "last.pt", step3)
    td.main(smoke(vae_ckpt, b, *common, "--steps", "6"))
    shutil.copy(step3, b / "last.pt")
    stale = load_checkpoint(str(b / "keep" / "ema_0000006.pt"), "sit")
    stale["ema"] = {n: v + 1 for n, v in stale["ema"].items()}
    save_checkpoint(str(b / "keep" / "ema_0000006.pt"), stale)
    capsys.readouterr()
    td.main(smoke(vae_ckpt, b, *common, "--steps", "7"))
    assert "removed 2 kept checkpoint(s) past step 3" in capsys.readouterr().out
    assert kept_steps(b) == [2, 4, 6]
    for s in (2, 4, 6):
        k = load_checkpoint(str(b / "keep" / f"ema_{s:07d}.pt"), "sit")["ema"]
        assert all(torch.equal(k[n], ema[s]["ema"][n]) for n in k), s     # those of the uninterrupted run
    shutil.copy(step3, b / "last.pt")
    td.main(smoke(vae_ckpt, b, *common, "--steps", "5"))
    assert kept_steps(b) == [2, 4]
    with pytest.raises(UserError, match="kept EMA-only checkpoint"):
        td.main(smoke(vae_ckpt, tmp_path / "c", *common, "--steps", "7", "--resume", str(b / "keep" / "ema_0000004.pt")))
    td.main(smoke(vae_ckpt, b, "--sample-every", "100", "--steps", "2", "--resume", "none", "--overwrite"))
    assert not list((b / "keep").iterdir())                 # a fresh start in the folder keeps nothing of the old run
