"""Stage 3: metric math against closed forms / brute force, sharding, sampling, diagnosis, demo."""
import os
import shutil

import numpy as np
import pytest
import scipy.signal
import torch

import evaluate as ev
import fft_ops
from vae import load_autoencoder
from common import load_checkpoint
from helpers import (DEMO_FIGURES, STUDY_FIGURES, assert_drawn, assert_ema_weights_and_statistics,
                     assert_one_line_error, run, spy_sampling)


def test_frechet_distance_closed_forms_and_cleanfid():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 6))
    S = A @ A.T + np.eye(6)
    mu = rng.standard_normal(6)
    assert ev.frechet_distance(mu, S, mu, S) == pytest.approx(0.0, abs=1e-6)
    delta = np.arange(6.0)
    assert ev.frechet_distance(mu, S, mu + delta, S) == pytest.approx((delta ** 2).sum(), rel=1e-6)
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])          # diagonal: sum (sqrt s1 - sqrt s2)^2
    closed = ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert ev.frechet_distance(np.zeros(3), np.diag(s1), np.zeros(3), np.diag(s2)) == pytest.approx(closed, rel=1e-6)
    from cleanfid.fid import frechet_distance as cf
    B = rng.standard_normal((6, 6))
    S2 = B @ B.T + 0.5 * np.eye(6)
    assert ev.frechet_distance(mu, S, 0 * mu, S2) == pytest.approx(cf(mu, S, 0 * mu, S2), rel=1e-5)


def test_feature_stats_gaussian_samples():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((20000, 3)) * [1.0, 2.0, 3.0] + [1.0, 0.0, -1.0]
    mu, sigma = ev.feature_stats(f)
    assert np.allclose(mu, [1, 0, -1], atol=0.05) and np.allclose(np.diag(sigma), [1, 4, 9], rtol=0.05)


def test_inception_score_closed_forms():
    K = 8
    assert ev.inception_score(np.full((100, K), 1.0 / K), splits=1)[0] == pytest.approx(1.0)
    onehot = np.eye(K)[np.arange(160) % K]                  # confident and evenly spread: IS = K
    assert ev.inception_score(onehot, splits=2)[0] == pytest.approx(K, rel=1e-6)


def brute_force_pr(real, fake, k):
    def radii(X):
        return [sorted(np.linalg.norm(X - x, axis=1))[k] for x in X]     # index 0 is the point itself
    rr, fr = radii(real), radii(fake)
    prec = np.mean([any(np.linalg.norm(f - r) <= rr[j] for j, r in enumerate(real)) for f in fake])
    rec = np.mean([any(np.linalg.norm(r - f) <= fr[j] for j, f in enumerate(fake)) for r in real])
    return prec, rec


def test_precision_recall_against_brute_force():
    rng = np.random.default_rng(2)
    real = rng.standard_normal((60, 4))
    fake = rng.standard_normal((50, 4)) * 1.5 + 0.7
    p, r = ev.precision_recall(real, fake, k=3)
    bp, br = brute_force_pr(real, fake, 3)
    assert p == pytest.approx(bp) and r == pytest.approx(br)
    assert 0 < p < 1                                         # a non-trivial case
    assert ev.precision_recall(real, real, 3) == (1.0, 1.0)
    assert ev.precision_recall(real, real + 100.0, 3) == (0.0, 0.0)


def test_psnr_and_ssim_references():
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    assert ev.psnr(x, x + 0.1).tolist() == pytest.approx([10 * np.log10(4 / 0.01)] * 2, rel=1e-5)
    assert ev.ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    # reference: the SSIM formula with scipy's valid-mode 2-D correlation, channel by channel
    g = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    a, b = (x[0].numpy() + 1) / 2, (y[0].numpy() + 1) / 2
    f = lambda im: scipy.signal.correlate2d(im, w, mode="valid")
    vals = []
    for c in range(3):
        mx, my = f(a[c]), f(b[c])
        vx, vy, cxy = f(a[c] ** 2) - mx ** 2, f(b[c] ** 2) - my ** 2, f(a[c] * b[c]) - mx * my
        vals.append((((2 * mx * my + 1e-4) * (2 * cxy + 9e-4)) / ((mx ** 2 + my ** 2 + 1e-4) * (vx + vy + 9e-4))).mean())
    assert ev.ssim(x, y)[0].item() == pytest.approx(np.mean(vals), abs=1e-5)


def test_sharding_covers_every_index_once_and_balances_classes():
    n, W = 103, 2
    shards = [ev.shard(n, r, W) for r in range(W)]
    assert sorted(shards[0] + shards[1]) == list(range(n))
    labels = torch.cat([ev.balanced_labels(s, 10) for s in shards])
    assert torch.bincount(labels).tolist() == [11, 11, 11] + [10] * 7
    torch.testing.assert_close(ev.image_noise([7], (2, 3, 3), 0)[0], ev.image_noise([1, 7], (2, 3, 3), 0)[1])


class StandIn:
    """A small random conv net in place of Inception (tests only; its numbers are not FID)."""
    name = "stand-in random conv net (test only)"
    mode, network_hash, dims, sfid_missing = "clean", "stand-in", (32, None), "a stand-in without mixed_6"

    def __init__(self):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                       torch.nn.Flatten())

    @torch.no_grad()
    def __call__(self, imgs):
        f = self.net(torch.from_numpy(np.asarray(imgs)).permute(0, 3, 1, 2).float() / 255)
        return f.double().numpy(), torch.softmax(f[:, :10] * 5, 1).double().numpy()


def test_generation_metrics_with_a_stand_in_extractor():
    rng = np.random.default_rng(3)
    real = rng.integers(0, 255, (64, 16, 16, 3), dtype=np.uint8)
    same = ev.generation_metrics(StandIn(), real, real=real)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["precision"] == same["recall"] == 1.0
    dark = (real // 4).astype(np.uint8)
    other = ev.generation_metrics(StandIn(), dark, real=real)
    assert other["fid"] > 0.01 and other["network"].startswith("stand-in")


def test_missing_inception_weights_is_one_clear_line(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    p = run(["evaluate.py", "fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"),
             "--inception-path", str(tmp_path / "nope.pt")])
    assert_one_line_error(p, "inception-2015-12-05.pt", "--inception-path")


def test_sample_writes_pngs_npz_and_resumes(smoke_models, tmp_path):
    out = tmp_path / "samples"
    args = ["sample", "--ckpt", str(smoke_models / "sit" / "last.pt"), "--num-samples", "6", "--sample-steps", "3",
            "--batch", "4", "--out", str(out), "--sampler", "euler", "--cfg-scale", "1.5", "--cfg-interval", "0.2", "1"]
    ev.main(args)
    arr = np.load(str(out) + ".npz")["arr_0"]
    assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8
    os.remove(out / "000004.png")
    before = os.path.getmtime(out / "000001.png")
    ev.main(args)                                                   # redraws only the missing image
    assert os.path.getmtime(out / "000001.png") == before
    assert np.array_equal(np.load(str(out) + ".npz")["arr_0"], arr)   # per-image noise: same picture again


def test_sample_uses_ema_guidance_and_latent_statistics(smoke_models, tmp_path, monkeypatch):
    seen = spy_sampling(monkeypatch, ev, ev)
    ckpt, out = str(smoke_models / "sit" / "last.pt"), tmp_path / "s"
    ev.main(["sample", "--ckpt", ckpt, "--num-samples", "2", "--batch", "2", "--sample-steps", "2", "--sampler", "euler",
             "--cfg-scale", "3.5", "--cfg-interval", "0.1", "0.9", "--out", str(out)])
    assert seen["scale"] == 3.5 and tuple(seen["guidance_rest"][0]) == (0.1, 0.9)
    assert_ema_weights_and_statistics(seen, load_checkpoint(ckpt, "sit"), str(smoke_models / "vae" / "last.pt"))
    from data import to_uint8
    assert np.array_equal(np.load(str(out) + ".npz")["arr_0"], to_uint8(seen["decoded"]))


def test_curve_of_two_seeds_writes_table_json_and_figure(smoke_models, tmp_path, capsys):
    """`curve` on two smoke runs (seeds 0, 1, --keep-every 2): every kept checkpoint sampled, scored with the
    offline metric as `fid --features deadleaves` scores it, one column with mean ± sample std over the seeds
    per step, a figure; a rerun draws nothing again."""
    import train_diffusion as td
    runs = [tmp_path / f"sit-s{s}" for s in (0, 1)]
    for s, r in zip((0, 1), runs):
        td.main(["--preset", "smoke", "--vae", str(smoke_models / "vae" / "last.pt"), "--out", str(r), "--steps", "4",
                 "--keep-every", "2", "--seed", str(s), "--sample-every", "100"])
    out = tmp_path / "curve"
    args = ["curve", *map(str, runs), "--num-samples", "6", "--batch", "6", "--sample-steps", "2", "--sampler", "sde",
            "--labels", "random", "--dl-train-images", "200", "--dl-steps", "30", "--out", str(out)]
    ev.main(args)
    table = (out / "curve.md").read_text()
    assert table in capsys.readouterr().out
    res = __import__("json").loads((out / "curve.json").read_text())
    assert res["metric"] == "fd_dl" and res["sampler"] == "sde" and res["num_samples"] == 6
    assert [[p["step"] for p in r["points"]] for r in res["runs"]] == [[2, 4], [2, 4]]
    fd = table.split("**fd_dl**")[1].split("**")[0]                         # the sample metric's table
    rows = [line for line in fd.splitlines() if line.startswith("| 2 ") or line.startswith("| 4 ")]
    assert "(seeds 0,1)" in fd and len(rows) == 2 and fd.count("|---") == 2   # step + one column
    assert "**latent_hf_log_ratio**" in table and "**val_loss**" in table    # the mechanism and the loss beside it
    for row, i in zip(rows, (0, 1)):
        v = np.array([r["points"][i]["fd_dl"] for r in res["runs"]])
        assert row == f"| {2 * (i + 1)} | {v.mean():.4f} ± {v.std(ddof=1):.4f} |"
    point = res["runs"][1]["points"][0]
    assert point["checkpoint_hash"] == ev.file_hash(str(runs[1] / "keep" / "ema_0000002.pt"))
    npz = next((out / "samples").glob("sit-s1-*")) / "step_0000002.npz"
    ext = ev.DeadLeavesExtractor(16, n_train=200, steps=30)
    direct = ev.deadleaves_metrics(ext, np.load(npz)["arr_0"], labels=np.load(npz)["arr_1"])
    assert point["fd_dl"] == pytest.approx(direct["fd_dl"]) and point["class_acc_dl"] == direct["class_acc_dl"]
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = npz.with_suffix("") / "000003.png"
    before = os.path.getmtime(png)
    ev.main(args)
    assert os.path.getmtime(png) == before and (out / "curve.md").read_text() == table
    with pytest.raises(ev.UserError, match="labels: random there, balanced now"):   # a set of other labels
        ev.main(["sample", "--ckpt", point["checkpoint"], "--num-samples", "6", "--sample-steps", "2",
                 "--sampler", "sde", "--out", str(npz.with_suffix(""))])
    adm = tmp_path / "VIRTUAL_adm.npz"                          # refused before anything is sampled
    np.savez(adm, arr_0=np.zeros((2, 16, 16, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    side = load_checkpoint(str(runs[0] / "last.pt"), "sit")["config"]["image_size"]
    other = tmp_path / "VIRTUAL_other_side.npz"
    np.savez(other, arr_0=np.zeros((2, side * 2, side * 2, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    for ref, mode, msg in ((adm, "clean", "is an ADM reference batch"), (tmp_path / "no.npz", "adm", "does not exist"),
                           (other, "adm", f"at {side * 2} px, the samples at {side} px")):
        with pytest.raises(ev.UserError, match=msg):
            ev.main(["curve", str(runs[0]), "--features", "inception", "--fid-mode", mode, "--ref", str(ref),
                     "--out", str(tmp_path / "c2")])
    assert not (tmp_path / "c2" / "samples").exists()
    # --features inception: each point is `fid` of that sample set against the same reference (images here,
    # their moments taken once), through a stand-in network (pixel statistics, not Inception)

    class PixelStats:
        name, mode, network_hash, dims, sfid_missing = "stand-in pixel statistics", "adm", "stand-in", (3, None), "-"

        def __call__(self, imgs):
            x = np.asarray(imgs, np.float64) / 255
            f = np.stack([x.mean((1, 2, 3)), x[..., 0].std((1, 2)), x[..., 2].mean((1, 2))], 1)
            return f, np.full((len(x), 4), 0.25), None
    mp = pytest.MonkeyPatch()
    mp.setattr(ev, "find_inception", lambda path=None: "stand-in")
    mp.setattr(ev, "InceptionExtractor", lambda path, device, mode="adm": PixelStats())
    try:
        rng = np.random.default_rng(0)
        real = tmp_path / "real.npz"
        np.savez(real, arr_0=rng.integers(0, 256, (12, side, side, 3), dtype=np.uint8))
        dl = args.index("--dl-train-images")         # its flags act only with --features deadleaves: left out
        ev.main(args[:dl] + args[dl + 4:-2] + ["--features", "inception", "--ref", str(real), "--out", str(out)])
        inc = __import__("json").loads((out / "curve.json").read_text())
        assert inc["metric"] == "fid" and inc["network"] == PixelStats.name
        for r in inc["runs"]:
            for p in r["points"]:
                tag = "sit-s0" if r["seed"] == 0 else "sit-s1"
                npz = next((out / "samples").glob(f"{tag}-*")) / f"step_{p['step']:07d}.npz"
                direct = ev.generation_metrics(PixelStats(), np.load(npz)["arr_0"], real=np.load(real)["arr_0"])
                assert p["fid"] == pytest.approx(direct["fid"], rel=1e-6) and p["reference_kind"] == "images"
    finally:
        mp.undo()


class IdentityAE:
    """Autoencoder stand-in whose latent is the image itself (encode -> x, decode -> z)."""

    mlsr_fractions, device = (0, 0.25, 0.5, 0.75), torch.device("cpu")

    def encode(self, x):
        return x

    def decode(self, z):
        return z


def np_filter(x, keep):
    return np.fft.ifft2(np.fft.fft2(x) * keep).real


def np_psnr(r, x):
    """Mean over images of PSNR (data range 2) of the clipped reconstruction r against x."""
    mse = ((np.clip(r, -1, 1) - x) ** 2).mean(axis=(1, 2, 3))
    return (10 * np.log10(4 / np.maximum(mse, 1e-12))).mean()


def test_recon_table_with_an_identity_autoencoder():
    """Row l is PSNR(S_l(x), x) and the HF energy ratio of S_l(x); the ratio falls with the level."""
    x = np.random.default_rng(4).uniform(-0.8, 0.8, (6, 3, 16, 16))
    fractions = [0, 0.25, 0.5, 0.75]
    xt = torch.from_numpy(x).float()
    rows = ev.recon_table(IdentityAE(), [xt[:4], xt[4:]], hf_radius=0.25)
    rad = np.sqrt(np.fft.fftfreq(16)[:, None] ** 2 + np.fft.fftfreq(16)[None, :] ** 2)
    for level, row in enumerate(rows):
        s = np_filter(x, fft_ops.attenuation_mask(16, 16, level, fractions).numpy())
        P = np.abs(np.fft.fft2(s - s.mean(axis=(2, 3), keepdims=True))) ** 2          # DC removed (HF_DEFINITION)
        hf = ((P * (rad > 0.25)).sum(axis=(1, 2, 3)) / P.sum(axis=(1, 2, 3))).mean()
        assert row["level"] == level
        assert row["psnr"] == pytest.approx(np_psnr(s, x), rel=1e-4), level
        assert row["latent_hf_ratio@0.25"] == pytest.approx(hf, rel=1e-4, abs=1e-7), level
    hfs = [r["latent_hf_ratio@0.25"] for r in rows]
    psnrs = [r["psnr"] for r in rows]
    assert all(a > b for a, b in zip(hfs, hfs[1:])) and all(a > b for a, b in zip(psnrs, psnrs[1:]))


def test_diagnose_bands_with_an_identity_autoencoder():
    """F1 decodes the ideal low / high band of the latent; F3 low-passes the image at r0 before encoding, so
    for the identity the latent energy above 0.25 is that of the band 0.25 < radius <= r0 (zero for r0 <= 0.25)."""
    rng = np.random.default_rng(5)
    x = rng.uniform(-0.6, 0.6, (4, 3, 16, 16)) + rng.uniform(-0.2, 0.2, (4, 3, 1, 1))
    radii, r0s = (0.1, 0.25, 0.4), (0.1, 0.2, 0.3, 0.45, 0.71)
    res = ev.diagnose(IdentityAE(), torch.from_numpy(x).float(), lambda z: z, radii=radii, r0_sweep=r0s,
                      hf_radius=0.25)
    rad = np.sqrt(np.fft.fftfreq(16)[:, None] ** 2 + np.fft.fftfreq(16)[None, :] ** 2)
    for i, r in enumerate(radii):
        low = np_filter(x, rad <= r)
        assert res["f1_psnr_low"][i] == pytest.approx(np_psnr(low, x), rel=1e-4)
        assert res["f1_psnr_high"][i] == pytest.approx(np_psnr(x - low, x), rel=1e-4)
    for i, r0 in enumerate(r0s):
        band = np_filter(x, (rad > 0.25) & (rad <= r0))
        kept = np_filter(x, (rad > 0) & (rad <= r0))                     # low-passed, per-image mean removed
        assert res["f3_latent_hf_energy"][i] == pytest.approx((band ** 2).mean(), rel=1e-4, abs=1e-9), r0
        ratio = ((band ** 2).sum(axis=(1, 2, 3)) / (kept ** 2).sum(axis=(1, 2, 3))).mean()
        assert res["f3_latent_hf_ratio"][i] == pytest.approx(ratio, rel=1e-4, abs=1e-9), r0
    assert res["f3_latent_hf_energy"][0] < 1e-9 < res["f3_latent_hf_energy"][2] < res["f3_latent_hf_energy"][-1]


def test_recon_and_diagnose_on_a_smoke_vae(smoke_models, tmp_path):
    vae = load_autoencoder(str(smoke_models / "vae" / "last.pt"))
    from data import DeadLeaves
    ds = DeadLeaves(n=16, resolution=16)
    x = torch.stack([ds[i][0] for i in range(16)])
    rows = ev.recon_table(vae, [x[:10], x[10:]])
    assert [r["level"] for r in rows] == [0, 1, 2, 3]
    assert all(np.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1 for r in rows)
    assert rows[3]["latent_hf_ratio@0.25"] <= rows[0]["latent_hf_ratio@0.25"]
    with_fid = ev.recon_table(vae, [x[:10], x[10:]], extractor=StandIn())
    assert all(r["rfid"] > 0 and r["rfid_network"].startswith("stand-in") for r in with_fid)
    assert [r["psnr"] for r in with_fid] == [r["psnr"] for r in rows]
    res = ev.diagnose(vae, x, lambda z: z)
    cum = res["f2_cumulative_energy"]
    assert all(b >= a - 1e-9 for a, b in zip(cum, cum[1:])) and cum[-1] == pytest.approx(1.0)
    assert all(np.isfinite(v) for k in ("f1_psnr_low", "f1_psnr_high", "f3_latent_hf_energy") for v in res[k])
    ev.plot_diagnosis(res, str(tmp_path))
    assert {f for f in os.listdir(tmp_path) if f.endswith(".png")} == {
        "f1_band_psnr.png", "f2_cumulative_energy.png", "f3_latent_hf_vs_r0.png", "latent_spectra_levels.png"}


def test_demo_smoke_runs_end_to_end(tmp_path):
    p = run(["-c", "import subprocess, sys; sys.exit(subprocess.call(['bash', 'demo.sh', '--smoke', sys.argv[1]]))",
             str(tmp_path / "demo")], timeout=600, env={"PYTHON": __import__("sys").executable})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for f in ("deadleaves_classes.png", "vae/recon_final.png", "samples-baseline.npz", "samples-freqwarm.npz",
              "recon/recon.json", "diagnosis/diagnosis.json", "diagnosis/f3_latent_hf_vs_r0.png", "samples-dvae.npz",
              "compare/compare.md", "compare/compare.png", "sit-freqwarm/generation_metrics.json",
              "curve/curve.md", "curve/curve.png", "sit-dvae/keep/ema_0000006.pt"):
        assert (tmp_path / "demo" / f).exists(), f
    assert "FID skipped" in p.stdout
    assert "switching from low-passed" in p.stdout
    table = (tmp_path / "demo" / "compare" / "compare.md").read_text()
    assert "| runs | seeds | step | val_loss | fd_dl | class_acc_dl |" in table and table in p.stdout
    curve = (tmp_path / "demo" / "curve" / "curve.md").read_text()
    fd = curve.split("**fd_dl**")[1].split("**")[0]                           # the sample metric's table
    assert curve in p.stdout and "| 3 |" in fd and "| 6 |" in fd and fd.count("|---") == 4   # 3 runs
    # `figures` on the demo's outputs, and on a study folder laid out as study.py lays it out (its recon,
    # diagnosis and curve results are those same commands' outputs from the demo, two "seeds" each)
    demo, study, figs = tmp_path / "demo", tmp_path / "study", tmp_path / "figs"
    for seed in (0, 1):
        for rel, src in ((f"vae-MLSR-s{seed}/recon.json", "recon/recon.json"),
                         (f"vae-plain-s{seed}/recon.json", "recon/recon.json"),
                         (f"vae-d8-s{seed}/diagnosis/diagnosis.json", "diagnosis/diagnosis.json"),
                         (f"dcae-d4-s{seed}/diagnosis/diagnosis.json", "diagnosis/diagnosis.json"),
                         ("partD-curve/curve.json", "curve/curve.json")):
            (study / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(demo / src, study / rel)
    p = run(["evaluate.py", "figures", "--demo", str(demo), "--study", str(study), "--out", str(figs)])
    assert p.returncode == 0 and "skipped" not in p.stdout + p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
    names = ["freqwarm_input.png", *DEMO_FIGURES, *STUDY_FIGURES]
    assert sorted(os.listdir(figs)) == sorted(names) and f"{len(names)} figures -> {figs}" in p.stdout
    for name in names:
        assert_drawn(figs / name)
    assert sum(os.path.getsize(figs / name) for name in names) < 2 * 2 ** 20
