"""Stage 1 with --arch dcae (a diffusers AutoencoderDC trained with our losses, served to Stages 2-3 as
--vae diffusers:OUT/diffusers) and --r0 auto (FreqWarm's r0 at the peak of the autoencoder's own F3 curve)."""
import json
import math
import os

import diffusers
import pytest
import torch

import evaluate as ev
import fft_ops
import train_diffusion as td
import train_vae
from common import load_checkpoint
from helpers import assert_one_line_error, read_metrics, run
from test_pretrained_ae import in_process
from vae import DCAE, R0_SWEEP, FrozenAutoencoder, load_autoencoder

DCAE_SMOKE = ["--preset", "dcae-smoke", "--gan-start", "1", "--ckpt-every", "2", "--sample-every", "100"]


@pytest.fixture(scope="module")
def dcae_runs(tmp_path_factory):
    """a: 4 steps in one go; b: 2 steps, then resumed to 4 (GAN on from step 1, checkpoints every 2 steps)."""
    root = tmp_path_factory.mktemp("dcae")
    train_vae.main(DCAE_SMOKE + ["--steps", "4", "--out", str(root / "a")])
    train_vae.main(DCAE_SMOKE + ["--steps", "2", "--out", str(root / "b")])
    train_vae.main(DCAE_SMOKE + ["--steps", "4", "--out", str(root / "b")])
    return root


def test_dcae_trains_resumes_exactly_and_its_folder_is_the_ema(dcae_runs):
    a, b = (load_checkpoint(str(dcae_runs / r / "last.pt"), "vae") for r in "ab")
    assert a["model_config"]["arch"] == "dcae" and a["config"]["dcae_config"] == "smoke"
    for part in ("model", "ema", "disc"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert any(not torch.equal(a["ema"][k], a["model"][k]) for k in a["ema"])
    la, lb = (read_metrics(dcae_runs / r / "metrics.jsonl") for r in "ab")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert any("d_gan" in r for r in la) and not any("kl" in r for r in la)      # GAN on, no KL
    assert {r["level"] for r in la} - {0}                                         # MLSR levels > 0 were drawn
    # OUT/diffusers is the EMA, loadable by diffusers itself; no temporary folder is left behind
    for run_dir, ck in ((dcae_runs / "a", a), (dcae_runs / "b", b)):
        assert sorted(set(os.listdir(run_dir)) - {".lock"}) == ["diffusers", "last.pt", "metrics.jsonl", "recon_final.png"]
        m = diffusers.AutoencoderDC.from_pretrained(run_dir / "diffusers")
        sd = m.state_dict()
        assert sd.keys() == {k[len("model."):] for k in ck["ema"]}
        assert all(torch.equal(v, ck["ema"]["model." + k]) for k, v in sd.items())
    # the MLSR path: D(S_l(z)) with z the AutoencoderDC latent, S_l of Eq. 3 with the run's fractions
    model = DCAE("smoke", 16)
    model.load_state_dict(a["ema"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        recon, post = train_vae.MLSRPath(model)(x, None, 2, a["config"]["mlsr_fractions"])
        z = m.encode(x).latent
        expected = m.decode(fft_ops.attenuate(z, 2, a["config"]["mlsr_fractions"])).sample
    torch.testing.assert_close(post.mean, z)
    torch.testing.assert_close(recon, expected)


def test_dcae_folder_serves_stage2_on_two_ranks_and_diagnose(dcae_runs, tmp_path):
    """torchrun --nproc_per_node=2 train_diffusion.py --vae diffusers:OUT/diffusers --freqwarm --r0 auto (gloo; each
    rank measures its share of the F3 curve) equals one process; evaluate.py diagnose reads the same folder."""
    spec = f"diffusers:{dcae_runs / 'a' / 'diffusers'}"
    flags = ["--preset", "smoke", "--vae", spec, "--image-size", "16", "--freqwarm", "--r0", "auto",
             "--stats-images", "16", "--sample-steps", "1", "--sampler", "euler", "--steps", "4"]
    two = run(["train_diffusion.py", *flags, "--out", str(tmp_path / "two")], torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    td.main([*flags, "--out", str(tmp_path / "one")])
    m1, m2 = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("one", "two"))
    assert [r["loss"] for r in m1] == pytest.approx([r["loss"] for r in m2], rel=1e-4)
    c1, c2 = (load_checkpoint(str(tmp_path / r / "last.pt"), "sit") for r in ("one", "two"))
    a1, a2 = c1["freqwarm"]["auto"], c2["freqwarm"]["auto"]
    assert a1["chosen"] == a2["chosen"] == c2["config"]["r0"] and a1["n_images"] == a2["n_images"] == 56
    assert a1["latent_hf_energy"] == pytest.approx(a2["latent_hf_energy"], rel=1e-5)
    ae = load_autoencoder(spec)
    assert c1["autoencoder"]["content_hash"] == c2["autoencoder"]["content_hash"] == ae.content_hash
    for k in c1["model"]:
        torch.testing.assert_close(c1["model"][k], c2["model"][k], atol=1e-4, rtol=1e-4)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    model = DCAE("smoke", 16)
    model.load_state_dict(load_checkpoint(str(dcae_runs / "a" / "last.pt"), "vae")["ema"])
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(x), model.encode(x).mean)            # the trained EMA, as served
    ev.main(["diagnose", "--vae", spec, "--image-size", "16", "--n", "8", "--out", str(tmp_path / "diag")])
    res = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())
    assert res["autoencoder"].startswith("AutoencoderDC") and res["n_images"] == 8
    assert all(math.isfinite(v) for v in res["f3_latent_hf_energy"] + res["f1_psnr_low"])
    i = max(range(len(R0_SWEEP)), key=lambda j: res["f3_latent_hf_energy"][j])
    assert res["f3_peak_r0"] == (R0_SWEEP[i] if 0 < i < len(R0_SWEEP) - 1 else None)


def test_dcae_errors_are_one_clear_line(dcae_runs, tmp_path, capsys):
    out = str(tmp_path / "x")
    cases = [([*DCAE_SMOKE, "--kl-weight", "1e-6", "--out", out], "--kl-weight 1e-06 acts only with --arch vit"),
             (["--preset", "smoke", "--dcae-config", "smoke", "--out", out],
              "--dcae-config smoke acts only with --arch dcae"),
             ([*DCAE_SMOKE, "--latent-dim", "3", "--out", out], "3 latent channels do not divide its last width 16"),
             ([*DCAE_SMOKE, "--image-size", "18", "--out", out], "image size 18 is not divisible by the downsampling"),
             ([*DCAE_SMOKE, "--latent-dim", "8", "--steps", "6", "--out", str(dcae_runs / "b")],
              "was trained with --latent-dim None, not 8: it may not change on resume")]
    for argv, needle in cases:
        assert_one_line_error(in_process(lambda: train_vae.main(argv), capsys), needle)
    p = in_process(lambda: td.main(["--preset", "smoke", "--vae", str(dcae_runs / "a" / "last.pt"), "--out", out]),
                   capsys)
    assert_one_line_error(p, "is a DC-AE", f"--vae diffusers:{dcae_runs / 'a' / 'diffusers'}")
    p = in_process(lambda: train_vae.main(["--stats-only", "--resume", str(dcae_runs / "a" / "last.pt")]), capsys)
    assert_one_line_error(p, "--stats-only is for the ViT VAE")


def test_a_dcae_folder_carries_its_mlsr_fractions_to_stage2(tmp_path):
    """S_l in Stages 2-3 uses the p_l the DC-AE was trained with (OUT/diffusers/freqldm.json), not the paper's
    defaults; a diffusers folder without that file (a released autoencoder) gets the defaults."""
    fr = [0.0, 0.1, 0.3, 0.6]
    train_vae.main(DCAE_SMOKE + ["--steps", "2", "--mlsr-fractions", *map(str, fr), "--out", str(tmp_path / "a")])
    folder = tmp_path / "a" / "diffusers"
    assert json.load(open(folder / "freqldm.json"))["mlsr_fractions"] == fr
    ae = load_autoencoder(f"diffusers:{folder}")
    assert ae.mlsr_fractions == tuple(fr) != tuple(fft_ops.MLSR_FRACTIONS)
    td.main(["--preset", "smoke", "--vae", f"diffusers:{folder}", "--image-size", "16", "--steps", "1",
             "--denoise-level", "2", "--out", str(tmp_path / "sit")])
    ck = load_checkpoint(str(tmp_path / "sit" / "last.pt"), "sit")
    assert ck["autoencoder"]["mlsr_fractions"] == fr
    os.remove(folder / "freqldm.json")
    assert load_autoencoder(f"diffusers:{folder}").mlsr_fractions == tuple(fft_ops.MLSR_FRACTIONS)


# ----------------------------------------------------------------------------- --r0 auto

class CurveAE(FrozenAutoencoder):
    """A stand-in autoencoder whose F3 curve is `curve` (one value per r0 of R0_SWEEP) by construction.

    It finds the largest radius with power in its input (an ideal low-pass at r0 leaves none above r0), hence
    which r0 of the sweep the input was low-passed at (the full image counts as the last, 0.71), and returns a
    zero-mean checkerboard latent (all its energy at radius 0.71 > 0.25) of mean square curve[that r0].
    """

    def __init__(self, curve, content_hash="curve-stand-in"):
        super().__init__()
        self.curve = torch.tensor(curve, dtype=torch.float32)
        self.latent_dim, self.downsample, self.name, self.content_hash = 4, 2, "curve stand-in", content_hash
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def encode(self, x):
        B, _, H, W = x.shape
        x = x.float() - x.float().mean(dim=(-2, -1), keepdim=True)
        P = torch.fft.fft2(x).abs().pow(2).sum(1)                                  # (B, H, W)
        present = P > 1e-8 * P.sum(dim=(1, 2), keepdim=True).clamp(min=1e-20)
        top = torch.where(present, fft_ops.radius_grid(H, W), torch.zeros(())).flatten(1).amax(1)     # (B,)
        k = torch.searchsorted(torch.tensor(R0_SWEEP), top.contiguous())          # r0_{k-1} < top <= r0_k
        i, j = torch.meshgrid(torch.arange(H // 2), torch.arange(W // 2), indexing="ij")
        checker = ((i + j) % 2 * 2 - 1).float().expand(1, self.latent_dim, H // 2, W // 2)
        return self.curve[k].sqrt().view(B, 1, 1, 1) * checker

    def decode(self, z):
        return torch.zeros(len(z), 3, z.shape[2] * 2, z.shape[3] * 2)


PEAK_02 = [1.0, 2.0, 3.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5]        # argmax at r0 = 0.2
PEAK_03 = [1.0, 1.5, 2.0, 2.5, 3.0, 6.0, 4.0, 2.0, 1.0]        # argmax at r0 = 0.3
R0_AUTO = ["--preset", "smoke", "--vae", "stand-in", "--image-size", "16", "--freqwarm", "--r0", "auto",
           "--sample-every", "100", "--steps", "2"]


def with_curve(monkeypatch, curve, **kw):
    monkeypatch.setattr(td, "load_autoencoder", lambda spec, device="cpu": CurveAE(curve, **kw).to(device))


@pytest.mark.parametrize("curve", [PEAK_02, PEAK_03])
def test_r0_auto_picks_the_peak_of_a_known_curve_and_resume_keeps_it(curve, monkeypatch, tmp_path, capsys):
    peak = R0_SWEEP[curve.index(max(curve))]
    with_curve(monkeypatch, curve)
    n = 56 if curve is PEAK_02 else 20                           # 64 images, 8 held out; or --r0-auto-images 20
    more = [] if curve is PEAK_02 else ["--r0-auto-images", "20"]
    td.main([*R0_AUTO, *more, "--out", str(tmp_path / "run")])
    log = capsys.readouterr().out
    assert f"--r0 auto: r0 = {peak:g}, the peak of the F3 curve of curve stand-in" in log
    ck = load_checkpoint(str(tmp_path / "run" / "last.pt"), "sit")
    auto = ck["freqwarm"]["auto"]
    assert ck["config"]["r0"] == ck["freqwarm"]["r0"] == auto["chosen"] == peak
    assert auto["r0_sweep"] == list(R0_SWEEP) and auto["n_images"] == n and auto["seed"] == 0
    # the recorded curve is the constructed one, up to the normalisation by the full images' latent std
    assert auto["latent_hf_energy"] == pytest.approx([c / curve[-1] for c in curve], rel=1e-4)
    # resuming keeps the stored choice, even where the autoencoder would now measure another curve
    with_curve(monkeypatch, PEAK_03 if curve is PEAK_02 else PEAK_02)
    td.main([*R0_AUTO, *more, "--steps", "3", "--out", str(tmp_path / "run")])
    assert f"--r0 auto: r0 = {peak:g}, the choice stored in" in capsys.readouterr().out
    ck = load_checkpoint(str(tmp_path / "run" / "last.pt"), "sit")
    assert ck["step"] == 3 and ck["config"]["r0"] == peak and ck["freqwarm"]["auto"] == auto


def test_r0_auto_refuses_a_curve_without_interior_peak(monkeypatch, tmp_path, capsys):
    for curve, needle in (([1, 2, 3, 4, 5, 6, 7, 8, 9], "rises to the largest r0"),
                          ([9, 8, 7, 6, 5, 4, 3, 2, 1], "falls from the smallest r0")):
        with_curve(monkeypatch, curve)
        p = in_process(lambda: td.main([*R0_AUTO, "--out", str(tmp_path / "mono")]), capsys)
        line = assert_one_line_error(p, "--r0 auto: the F3 curve of curve stand-in", "no interior peak", needle,
                                     "pass --r0 R")
        assert line.count("no interior peak") == 1, line
        assert not os.path.exists(tmp_path / "mono" / "last.pt")
    p = in_process(lambda: td.main([a for a in R0_AUTO if a != "--freqwarm"] + ["--out", str(tmp_path / "y")]), capsys)
    assert_one_line_error(p, "--r0 auto acts only with --freqwarm")
    # resume: a run with a given r0 is not re-chosen, and a chosen r0 may not be replaced by another
    with_curve(monkeypatch, PEAK_02)
    fixed = [a if a != "auto" else "0.3" for a in R0_AUTO]
    td.main([*fixed, "--out", str(tmp_path / "fixed")])
    p = in_process(lambda: td.main([*R0_AUTO, "--steps", "3", "--out", str(tmp_path / "fixed")]), capsys)
    assert_one_line_error(p, "was trained with --r0 0.3, not chosen by --r0 auto")
    td.main([*R0_AUTO, "--out", str(tmp_path / "auto")])
    p = in_process(lambda: td.main([*fixed, "--steps", "3", "--out", str(tmp_path / "auto")]), capsys)
    assert_one_line_error(p, "was trained with --r0 0.2, not 0.3: it may not change on resume")
