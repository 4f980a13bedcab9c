"""FreqWarm beyond the paper's single setting: scheduled thresholds (--freqwarm-schedule), one meaning of r0 for
every filter kind, --r0 auto's noise rule, the latent-spectrum metric (evaluate.py spectrum / curve) and the sample
metric's own check (evaluate.py metric-check); and study.py part E at the smoke setting."""
import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch

import evaluate as ev
import fft_ops
import train_diffusion as td
from common import load_checkpoint, save_checkpoint
from data import DeadLeaves, train_val_split
from helpers import Stage2Latents, assert_one_line_error, read_metrics, run
from test_dcae import R0_AUTO, CurveAE
from test_diffusion import smoke, vae_ckpt  # noqa: F401 (a fixture)
from test_pretrained_ae import in_process
from vae import R0_SWEEP, LatentSpace, f3_peak_test

CPU = type("D", (), dict(rank=0, world_size=1, main=True, device=torch.device("cpu")))()


# ----------------------------------------------------------------------------- schedules

def test_stage_radii_and_the_radius_at_each_step_in_closed_form():
    r_max = math.sqrt(0.5)
    for sched, s in (("linear", lambda u: u), ("cosine", lambda u: (1 - math.cos(math.pi * u)) / 2)):
        args = td.get_args(["--preset", "smoke", "--freqwarm", "--r0", "0.2", "--freqwarm-schedule", sched,
                            "--freqwarm-stages", "4"])
        want = [0.2 + (r_max - 0.2) * s(k / 4) for k in range(4)]
        assert td.stage_radii(args) == pytest.approx(want, abs=1e-12)
        assert want[0] == 0.2 and want[-1] < r_max                   # from r0, widening toward the corner
        for end in (8, 6, 3):                                      # stage k of K covers steps [k end / K, (k+1) end / K)
            got = [td.freqwarm_radius(step, end, args) for step in range(end + 2)]
            assert got == [want[(4 * step) // end] for step in range(end)] + [None, None]
    step = td.get_args(["--preset", "smoke", "--freqwarm", "--r0", "0.3"])
    assert step.freqwarm_schedule == "step" and td.stage_radii(step) == [0.3]
    assert [td.freqwarm_radius(i, 3, step) for i in range(5)] == [0.3, 0.3, 0.3, None, None]
    assert td.stage_radii(td.get_args(["--preset", "smoke", "--freqwarm", "--freqwarm-schedule", "linear",
                                       "--freqwarm-stages", "1"])) == [0.2]


def test_the_default_schedule_keeps_todays_cache_key_and_trains_as_a_one_stage_schedule(vae_ckpt, tmp_path):
    args = td.get_args(smoke(vae_ckpt, tmp_path / "k", "--freqwarm", "--r0", "0.3", "--lowpass-clamp"))
    ae, ds, _, _, _ = td.build(args, CPU)
    base = [ae.content_hash, td.fingerprint(ds), args.image_size, args.hflip]
    today = lambda parts: hashlib.sha256(repr(parts).encode()).hexdigest()[:16]      # the key as it was written
    assert td.cache_key(ae, ds, args, None) == today(base)
    assert td.cache_key(ae, ds, args, 0.3) == today(base + ["ideal", 0.3, True])
    assert td.cache_key(ae, ds, args, 0.31) != td.cache_key(ae, ds, args, 0.3)
    common = ["--freqwarm", "--warmup-steps", "4", "--cache-latents", "--steps", "5"]
    td.main(smoke(vae_ckpt, tmp_path / "step", *common))
    td.main(smoke(vae_ckpt, tmp_path / "one", *common, "--freqwarm-schedule", "linear", "--freqwarm-stages", "1"))
    td.main(smoke(vae_ckpt, tmp_path / "two", *common, "--freqwarm-schedule", "linear", "--freqwarm-stages", "2"))
    a, b, c = (load_checkpoint(str(tmp_path / r / "last.pt"), "sit") for r in ("step", "one", "two"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])        # stage 2 is wider
    assert [r["phase"] for r in read_metrics(tmp_path / "step" / "metrics.jsonl")] == ["warmup"] * 4 + ["full"]
    assert "lowpass_r" not in read_metrics(tmp_path / "step" / "metrics.jsonl")[0]
    assert a["freqwarm"]["schedule"] == "step" and a["freqwarm"]["stage_radii"] == [0.2]


def test_scheduled_latents_are_those_of_each_stage_radius_from_images_and_cache(vae_ckpt, tmp_path):
    args = td.get_args(smoke(vae_ckpt, tmp_path, "--freqwarm", "--freqwarm-schedule", "cosine",
                             "--freqwarm-stages", "2", "--warmup-steps", "4"))
    ae, ds, _, _, _ = td.build(args, CPU)
    stats = td.training_stats(ae, ds, args, CPU)
    lat = Stage2Latents(ae, stats, args, 4)
    x = torch.stack([ds[i][0] for i in range(6)])
    space = LatentSpace(stats, ae.mlsr_fractions)
    r1 = 0.2 + (math.sqrt(0.5) - 0.2) * 0.5
    with torch.no_grad():
        want = {0: space.normalize(ae.encode(fft_ops.lowpass(x, 0.2))), 2: space.normalize(ae.encode(fft_ops.lowpass(x, r1))),
                4: space.normalize(ae.encode(x))}
    for step, z in want.items():
        torch.testing.assert_close(lat.get(step, images=x), z)
    assert not torch.allclose(want[0], want[2], atol=1e-3) and not torch.allclose(want[2], want[4], atol=1e-3)
    lat.build_cache(ds, tmp_path / "cache", CPU)                         # one low-passed copy per stage
    assert sorted(r for r in lat.cache if r is not None) == pytest.approx([0.2, r1])
    for step, z in want.items():
        torch.testing.assert_close(lat.get(step, keys=list(range(6))), z, atol=2e-3, rtol=2e-3)


def test_a_scheduled_run_resumes_exactly_and_keeps_its_schedule(vae_ckpt, tmp_path):
    common = ["--freqwarm", "--freqwarm-schedule", "linear", "--freqwarm-stages", "2", "--warmup-steps", "4",
              "--ckpt-every", "1", "--cache-latents"]
    td.main(smoke(vae_ckpt, tmp_path / "a", *common, "--steps", "6"))
    td.main(smoke(vae_ckpt, tmp_path / "b", *common, "--steps", "3"))           # stopped inside stage 2
    td.main(smoke(vae_ckpt, tmp_path / "b", *common, "--steps", "6"))
    ma, mb = (read_metrics(tmp_path / r / "metrics.jsonl") for r in "ab")
    r1 = 0.2 + (math.sqrt(0.5) - 0.2) / 2
    assert [r.get("lowpass_r") for r in ma][:4] == pytest.approx([0.2, 0.2, r1, r1])
    assert [r.get("lowpass_r") for r in ma][4:] == [None, None]
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]
    a, b = (load_checkpoint(str(tmp_path / r / "last.pt"), "sit") for r in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["freqwarm"]["schedule"] == "linear" and a["freqwarm"]["stage_radii"] == pytest.approx([0.2, r1])
    for flag, value in (("--freqwarm-schedule", "cosine"), ("--freqwarm-stages", "3")):
        again = [v for v in common] + ["--steps", "8"]
        again[again.index(flag) + 1] = value
        p = run(["train_diffusion.py", *smoke(vae_ckpt, tmp_path / "b", *again)])
        assert_one_line_error(p, f"was trained with {flag} ", "it may not change on resume")


def test_schedules_that_cannot_be_run_and_checkpoints_that_predate_them_are_refused(vae_ckpt, tmp_path):
    for extra, needle in ((["--freqwarm-schedule", "linear", "--warmup-steps", "2"], "cannot hold --freqwarm-stages 4"),
                          (["--freqwarm-schedule", "cosine", "--r0", "0.71"], "is already there")):
        p = run(["train_diffusion.py", *smoke(vae_ckpt, tmp_path / "x", "--freqwarm", *extra)])
        assert_one_line_error(p, needle)
        assert not (tmp_path / "x" / "last.pt").exists()
    # a checkpoint written before the schedule existed trained with the step schedule (and the Gaussian of std r0)
    for kind, extra in (("ideal", ["--freqwarm-schedule", "linear"]), ("gaussian", [])):
        out = tmp_path / kind
        flags = ["--freqwarm", "--warmup-steps", "4", "--lowpass-kind", kind, "--steps", "1"]
        td.main(smoke(vae_ckpt, out, *flags))
        ck = load_checkpoint(str(out / "last.pt"), "sit")
        del ck["freqwarm"]["schedule"], ck["freqwarm"]["stage_radii"]
        del ck["config"]["freqwarm_schedule"], ck["config"]["freqwarm_stages"]
        save_checkpoint(str(out / "last.pt"), ck)
        p = run(["train_diffusion.py", *smoke(vae_ckpt, out, *flags[:-2], "--steps", "2", *extra)])
        assert_one_line_error(p, "predates --freqwarm-schedule", "may not change on resume")
    td.main(smoke(vae_ckpt, tmp_path / "ideal", "--freqwarm", "--warmup-steps", "4", "--steps", "2"))  # step: resumes


def test_the_gaussian_cut_of_gain_one_half_has_a_cache_key_of_its_own(vae_ckpt, tmp_path):
    args = td.get_args(smoke(vae_ckpt, tmp_path, "--freqwarm", "--lowpass-kind", "gaussian"))
    ae, ds, _, _, _ = td.build(args, CPU)
    old = hashlib.sha256(repr([ae.content_hash, td.fingerprint(ds), args.image_size, args.hflip, "gaussian", 0.2,
                               False]).encode()).hexdigest()[:16]              # the Gaussian of std r0 cached this key
    assert td.cache_key(ae, ds, args, 0.2) != old


# ----------------------------------------------------------------------------- --r0 auto: the peak against its spread

def test_f3_peak_test_against_numpy():
    rng = np.random.default_rng(0)
    base = np.array([1.0, 2.0, 3.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5])           # interior maximum at index 3
    for noise, stands in ((0.05, True), (3.0, None)):
        c = base + noise * rng.standard_normal((4, len(base)))
        t = f3_peak_test(R0_SWEEP, c)
        i = int(np.argmax(c.mean(0)))
        assert t["mean"] == pytest.approx(c.mean(0).tolist()) and t["std"] == pytest.approx(c.std(0, ddof=1).tolist())
        if not 0 < i < len(base) - 1:
            assert t["peak"] is None and not t["stands"]
            continue
        h = c[:, i] - np.maximum(c[:, 0], c[:, -1])
        assert t["peak"] == R0_SWEEP[i] and t["height"] == pytest.approx(h.mean())
        assert t["height_std"] == pytest.approx(h.std(ddof=1)) and t["stands"] == (h.mean() > h.std(ddof=1))
        if stands is not None:
            assert t["stands"] is stands
    flat_peak = np.array([[1, 2, 2.01, 2, 1, 1, 1, 1, 2.0], [1, 2, 1.99, 2, 1, 1, 1, 1, 2.02]] * 2)
    assert not f3_peak_test(R0_SWEEP, flat_peak)["stands"]                  # 0.005 ± 0.02 above the end
    assert f3_peak_test(R0_SWEEP, [list(range(9))] * 3)["peak"] is None      # rises throughout
    with pytest.raises(ValueError):
        f3_peak_test(R0_SWEEP, [base])                                     # one subset has no spread


def test_diagnose_names_the_peak_whose_height_it_gives():
    """With an image count not divisible by the subsets, the curve over all images can peak elsewhere than the
    subsets' mean curve; diagnose's line gives the subsets' peak with the height --r0 auto judges."""
    c = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 4.0, 3.0, 2.0, 1.0]] * 4) + 0.01 * np.arange(4)[:, None]
    t = f3_peak_test(R0_SWEEP, c)
    sub = {k: t[k] for k in ("n_subsets", "std", "peak", "height", "height_std", "stands")}
    line = ev.describe_peak({"f3_peak_r0": 0.4, "f3_subsets": sub})
    assert t["peak"] == 0.25 and "r0 = 0.25," in line and "0.4" not in line and f"{t['height']:.3g} ±" in line
    assert ev.describe_peak({"f3_peak_r0": 0.4}) == "peak at r0 = 0.4"                 # no subsets: all images
    assert ev.describe_peak({"f3_peak_r0": 0.4, "f3_subsets": {**sub, "peak": None}}).startswith("no interior peak")


class NoisyCurveAE(CurveAE):
    """CurveAE whose curve carries per-image noise: image i's energy at r0_k is curve[k] (1 + noise u(i, k)), u in
    [-1, 1) fixed by the image's mean (which low-passing keeps) and k, so disjoint image subsets disagree."""

    def __init__(self, curve, noise):
        super().__init__(curve)
        self.noise = noise

    def encode(self, x):
        z = super().encode(x)
        m = x.float().mean(dim=(1, 2, 3))                                          # (B,) the image's identity
        k = (z.pow(2).mean(dim=(1, 2, 3)).view(-1, 1) / self.curve).sub(1).abs().argmin(1).float()   # its r0 index
        u = torch.frac(torch.sin(m * 12.9898e3 + k * 78.233) * 43758.5453) * 2 - 1           # (B,)
        return z * (1 + self.noise * u).clamp(min=0).sqrt().view(-1, 1, 1, 1)


@pytest.mark.parametrize("noise,stands", [(0.02, True), (1.5, False)])
def test_r0_auto_takes_a_peak_only_above_its_spread_over_image_subsets(monkeypatch, tmp_path, capsys, noise, stands):
    curve = [1.0, 1.5, 2.0, 2.5, 3.0, 3.3, 3.0, 2.8, 2.8]                     # peak at 0.3, 18 % above the end
    monkeypatch.setattr(td, "load_autoencoder", lambda spec, device="cpu": NoisyCurveAE(curve, noise).to(device))
    if stands:
        td.main([*R0_AUTO, "--out", str(tmp_path / "run")])
        auto = load_checkpoint(str(tmp_path / "run" / "last.pt"), "sit")["freqwarm"]["auto"]
        assert auto["chosen"] == 0.3 and len(auto["subset_curves"]) == 4
        t = f3_peak_test(R0_SWEEP, auto["subset_curves"])
        assert t["stands"] and auto["peak_height"] == pytest.approx(t["height"])
        # the overall curve is the image-weighted mean of the subsets' (56 images: 14 each)
        assert auto["latent_hf_energy"] == pytest.approx(np.mean(auto["subset_curves"], 0).tolist(), rel=1e-6)
        return
    p = in_process(lambda: td.main([*R0_AUTO, "--out", str(tmp_path / "run")]), capsys)
    assert_one_line_error(p, "--r0 auto: the F3 curve of curve stand-in", "mean ± std over 4 disjoint image subsets",
                          "does not stand above its spread", "pass --r0 R")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_the_noise_free_stand_in_still_stands():
    """The rule adds no constant: a peak with no spread at all stands however small it is."""
    c = np.array([[1.0, 1.0, 1.0, 1.001, 1.0, 1.0, 1.0, 1.0, 1.0]] * 4)
    assert f3_peak_test(R0_SWEEP, c)["stands"]


# ----------------------------------------------------------------------------- the latent-spectrum metric

def test_spectrum_comparison_on_cases_with_known_answers():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 4, 8, 8, generator=g), torch.randn(512, 4, 8, 8, generator=g)
    same = ev.spectrum_comparison(a, b)
    assert abs(same["latent_hf_log_ratio"]) < 0.03                             # white noise against white noise
    assert np.allclose(same["power_real"][1:], 1.0, atol=0.06) and same["power_real"][0] < 0.02   # s^2; DC removed
    scaled = ev.spectrum_comparison(3 * a, a)                                   # power x 9 in every band
    assert scaled["latent_hf_log_ratio"] == pytest.approx(math.log(9), abs=1e-4)
    assert np.allclose(scaled["log_ratio"][1:], math.log(9), atol=1e-4)
    low, high = fft_ops.split_frequencies(a, 0.25)                              # the high band at half amplitude
    half = ev.spectrum_comparison(low + 0.5 * high, a)
    assert half["latent_hf_log_ratio"] == pytest.approx(math.log(0.25), abs=1e-4)
    rad = fft_ops.radius_grid(8, 8)
    inside = [i / 8 for i in range(len(half["radii"])) if (rad[torch.round(rad * 8) == i] <= 0.25).all()]
    for r, lr in zip(half["radii"], half["log_ratio"]):
        if r in inside and r > 0:
            assert lr == pytest.approx(0.0, abs=1e-4)                           # bands fully below 0.25 untouched
    # the summary by hand: ln of the mean power per bin above 0.25, generated over real (numpy FFT)
    z = (low + 0.5 * high).double().numpy()
    p = lambda v: (np.abs(np.fft.fft2(v - v.mean(axis=(-2, -1), keepdims=True), norm="ortho")) ** 2).mean(axis=(0, 1))
    hf = rad.numpy() > 0.25
    assert half["latent_hf_log_ratio"] == pytest.approx(math.log(p(z)[hf].mean() / p(a.double().numpy())[hf].mean()),
                                                        abs=1e-5)
    with pytest.raises(Exception, match="differ in shape"):
        ev.spectrum_comparison(a, a[:, :2])


def test_spectrum_checks_its_sampler_flags_as_sample_does(tmp_path):
    base = ["spectrum", "--ckpt", "x.pt", "--out", str(tmp_path / "o")]
    for extra, needle in ((["--cfg-scale", "2", "--cfg-interval", "0.8", "0.2"], "--cfg-interval must be"),
                          (["--sampler", "sde", "--sample-steps", "1"], "--sampler sde needs --sample-steps >= 2"),
                          (["--num-samples", "0"], "--num-samples")):
        with pytest.raises(ev.UserError, match=needle):
            ev.validate(ev.get_args(base + extra))


def test_spectrum_and_curve_report_the_mechanism_beside_the_validation_loss(vae_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("FREQLDM_CACHE", str(tmp_path / "dlcache"))
    sit = tmp_path / "sit"
    td.main(smoke(vae_ckpt, sit, "--keep-every", "3", "--val-every", "3"))
    out = tmp_path / "spec"
    ev.main(["spectrum", "--ckpt", str(sit / "keep" / "ema_0000006.pt"), "--num-samples", "10", "--batch", "4",
             "--sample-steps", "3", "--sampler", "euler", "--out", str(out)])
    res = json.loads((out / "spectrum.json").read_text())
    assert (out / "spectrum.png").stat().st_size > 0 and res["step"] == 6 and res["n_gen"] == 10
    # the real latents: the run's 8 held-out images, encoded, normalised with the run's statistics
    ema, ae, space, ck = ev.load_sit(str(sit / "last.pt"), torch.device("cpu"))
    _, val_idx = train_val_split(64, 8, 0)
    ds = DeadLeaves(n=64, resolution=16)
    with torch.no_grad():
        real = space.normalize(ae.encode(torch.stack([ds[i][0] for i in val_idx])))
    assert res["n_real"] == 8
    assert res["power_real"] == pytest.approx(ev.spectrum_comparison(real, real)["power_real"], rel=1e-5)
    # the generated latents are those `sample` draws for images 0..9, whatever the batch
    a = type("A", (), dict(seed=0, sampler="euler", sample_steps=3, cfg_scale=1.0, cfg_interval=[0.0, 1.0],
                           no_bf16=True))()
    ema6, *_ = ev.load_sit(str(sit / "keep" / "ema_0000006.pt"), torch.device("cpu"))
    labels = ev.sample_labels(10, ema6.num_classes, "balanced", 0)
    one = ev.draw_latents(ema6, list(range(10)), labels, a, torch.device("cpu"))
    split = torch.cat([ev.draw_latents(ema6, [0, 1], labels, a, torch.device("cpu")),
                       ev.draw_latents(ema6, list(range(2, 10)), labels, a, torch.device("cpu"))])
    torch.testing.assert_close(one, split)
    assert res["latent_hf_log_ratio"] == pytest.approx(ev.spectrum_comparison(one, real)["latent_hf_log_ratio"],
                                                       rel=1e-5)
    # curve: the same number at step 6 and the run's own validation loss at each kept step
    cdir = tmp_path / "curve"
    ev.main(["curve", str(sit), "--num-samples", "10", "--batch", "4", "--sample-steps", "3", "--sampler", "euler",
             "--spectrum-samples", "10", "--dl-train-images", "50", "--dl-steps", "2", "--out", str(cdir)])
    points = json.loads((cdir / "curve.json").read_text())["runs"][0]["points"]
    val = {r["step"]: r["val_loss"] for r in read_metrics(sit / "metrics.jsonl", "val")}
    assert [p["step"] for p in points] == [3, 6]
    assert [p["val_loss"] for p in points] == [val[3], val[6]]
    assert points[1]["latent_hf_log_ratio"] == pytest.approx(res["latent_hf_log_ratio"], rel=1e-5)
    md = (cdir / "curve.md").read_text()
    assert "**latent_hf_log_ratio**" in md and "**val_loss**" in md and "**fd_dl**" in md
    # one checkpoint: recorded into its run, `compare` shows it beside the validation loss; only of last.pt as it is
    spec = ["spectrum", "--num-samples", "10", "--batch", "4", "--sample-steps", "3", "--sampler", "euler",
            "--record", str(sit), "--out", str(tmp_path / "spec-last")]
    with pytest.raises(ev.UserError, match="is not .*last.pt as it is now"):
        ev.main([*spec, "--ckpt", str(sit / "keep" / "ema_0000003.pt")])
    ev.main([*spec, "--ckpt", str(sit)])                                       # the run folder: its last.pt
    rec = json.loads((sit / "generation_metrics.json").read_text())["latent_hf_log_ratio"]
    last = json.loads((tmp_path / "spec-last" / "spectrum.json").read_text())
    assert rec["latent_hf_log_ratio"] == last["latent_hf_log_ratio"] and rec["checkpoint"]["step"] == 6
    ev.main(["compare", str(sit), "--out", str(tmp_path / "cmp")])
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "latent_hf_log_ratio" in table and f"{last['latent_hf_log_ratio']:.4f}" in table


def test_the_real_latents_are_at_the_runs_level(vae_ckpt, tmp_path):
    """A denoised run's generated latents are S_l(z_n): its real latents for the spectrum are S_l of the normalised
    latents of its held-out images (fft_ops.attenuate with the autoencoder's p_l), not the level-0 ones."""
    td.main(smoke(vae_ckpt, tmp_path / "sit", "--denoise-level", "2", "--steps", "1"))
    ema, ae, space, ck = ev.load_sit(str(tmp_path / "sit" / "last.pt"), torch.device("cpu"))
    _, val_idx = train_val_split(64, 8, 0)
    ds = DeadLeaves(n=64, resolution=16)
    stats = ck["latent_stats"]
    with torch.no_grad():
        z = (ae.encode(torch.stack([ds[i][0] for i in val_idx])) - stats["mean"].view(1, -1, 1, 1)) \
            / stats["std"].view(1, -1, 1, 1)
    want = fft_ops.attenuate(z, 2, ae.mlsr_fractions)
    got = ev.real_latents(ck, ae, space, 8, torch.device("cpu"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, z, atol=1e-3)


# ----------------------------------------------------------------------------- the sample metric's own check

def test_metric_check_scores_known_damage_on_disjoint_subsets(tmp_path, monkeypatch):
    monkeypatch.setenv("FREQLDM_CACHE", str(tmp_path / "dlcache"))
    dl = ["--dl-train-images", "50", "--dl-steps", "2"]
    ev.main(["metric-check", "--image-size", "16", "--n", "6", "--subsets", "2", *dl, "--out", str(tmp_path / "mc")])
    res = json.loads((tmp_path / "mc" / "metric_check.json").read_text())
    assert set(res["values"]) == {"undamaged"} | {f"{f} {x:g}" for f, xs in ev.DAMAGES.items() for x in xs}
    assert all(len(v) == 2 for v in res["values"].values())
    # subset 1 (images 1, 3, ..., 11 of the held-out seed) low-passed at 0.2, scored independently
    ext = ev.DeadLeavesExtractor(16, n_train=50, steps=2)
    pool = DeadLeaves(n=12, resolution=16, seed=1000)
    x = torch.stack([pool[i][0] for i in range(1, 12, 2)])
    ref = ev.deadleaves_reference(ext, 16)
    want = ev.deadleaves_metrics(ext, ev.to_uint8(fft_ops.lowpass(x, 0.2).clamp(-1, 1)), ref_moments=ref)["fd_dl"]
    assert res["values"]["low-pass r0 0.2"][1] == pytest.approx(want, rel=1e-6)
    floor = res["mean_std"]["undamaged"]
    for family, amounts in ev.DAMAGES.items():
        means = [floor[0]] + [res["mean_std"][f"{family} {x:g}"][0] for x in amounts]
        steps = np.diff(means)
        assert res["verdict"][family]["monotonic"] == bool((steps > 0).all())
        assert res["verdict"][family]["steps_above_spread"] == bool((steps > floor[1]).all())
    assert res["usable"] == all(v["monotonic"] and v["steps_above_spread"] for v in res["verdict"].values())


# ----------------------------------------------------------------------------- study part E

def test_study_part_e_runs_at_the_smoke_setting(tmp_path):
    out = tmp_path / "study"
    p = run(["study.py", "--setting", "smoke", "--parts", "E", "--out", str(out)], timeout=900,
            env={"FREQLDM_CACHE": str(tmp_path / "dlcache")})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())["E"]
    assert sorted(res["autoencoders"]) == ["4"] and res["best_c"] == 4
    for c, a in res["autoencoders"].items():
        ck = load_checkpoint(str(out / f"dcae-e-c{c}" / "last.pt"), "vae")
        assert ck["step"] == a["steps"] and ck["model_config"]["diffusers"]["latent_channels"] == int(c)
    names = set(res["runs"][str(res["best_c"])])
    assert {"baseline", "FreqWarm r0=0.2", "linear schedule", "cosine schedule", "gaussian cut"} <= names
    for name, runs in res["runs"][str(res["best_c"])].items():
        pts = runs[0]["points"]
        assert [q["step"] for q in pts] == [2, 4] and all("latent_hf_log_ratio" in q and "val_loss" in q for q in pts)
    scored = json.loads((out / f"partE-curve-c{res['best_c']}-schedules" / "curve.json").read_text())["runs"]
    assert sorted(os.path.basename(r["dir"]) for r in scored) == [      # the new arms only, not the baseline again
        f"site-c{res['best_c']}-{n}-s0" for n in ("cosineschedule", "gaussiancut", "linearschedule")]
    ck = load_checkpoint(str(out / f"site-c{res['best_c']}-cosineschedule-s0" / "last.pt"), "sit")
    assert ck["freqwarm"]["schedule"] == "cosine"
    report = (out / "study.md").read_text()
    assert "## E. FreqWarm vs latent channels" in report and "c32 5.75 -> 5.74" in report
    assert (out / "partE_gain_vs_channels.png").stat().st_size > 0 and (out / "partE_spectra.png").stat().st_size > 0
    again = run(["study.py", "--setting", "smoke", "--parts", "E", "--out", str(out)],
                env={"FREQLDM_CACHE": str(tmp_path / "dlcache")})                  # everything done: no command
    assert again.returncode == 0 and "$ python" not in again.stdout, again.stdout[-2000:]
