"""Run integrity: bad input is one clear line, divergence stops, a full disk leaves no half-written file,
signals and empty runs exit honestly, every PIL mode loads with the right values."""
import errno
import json
import os
import re
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

import common
import evaluate as ev
import train_diffusion as td
import train_vae
from common import UserError, load_checkpoint, run_main
from data import ImageFolder, pil_to_rgb
from helpers import ROOT, assert_one_line_error, read_metrics, run


def cli_error(capsys, main, argv):
    """Run a script's main as its `__main__` does; return its exit status and last stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code, err.strip().splitlines()[-1]


def assert_cli_error(capsys, main, argv, *needles):
    code, line = cli_error(capsys, main, argv)
    assert code == 2 and line.startswith("error: "), (code, line)
    for n in needles:
        assert n in line, (n, line)


# ----------------------------------------------------------------------------- fid input (item 5)

def test_fid_refuses_float_nchw_single_and_unreadable_inputs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "good.npz", arr_0=good)
    cases = {"float.npz": (good / 255.0, "must be uint8"),
             "nchw.npz": (good.transpose(0, 3, 1, 2).copy(), "looks like NCHW"),
             "one.npz": (good[:1], "at least 2 images"),
             "gray.npz": (good[..., 0], "(N, H, W, 3)")}
    for name, (arr, needle) in cases.items():
        np.savez(tmp_path / name, arr_0=arr)
        assert_cli_error(capsys, ev.main, ["fid", "--samples", str(tmp_path / name), "--ref", str(tmp_path / "good.npz")],
                         needle, name)
    np.savez(tmp_path / "other.npz", images=good)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    for argv, needle in [(["--ref", str(tmp_path / "good.npz")], "fid needs --samples"),
                         (["--samples", str(tmp_path / "good.npz")], "fid needs --samples"),
                         (["--samples", str(tmp_path / "nope.npz"), "--ref", str(tmp_path / "good.npz")], "does not exist"),
                         (["--samples", str(tmp_path / "junk.npz"), "--ref", str(tmp_path / "good.npz")], "not a readable .npz"),
                         (["--samples", str(tmp_path / "other.npz"), "--ref", str(tmp_path / "good.npz")], "no 'arr_0'"),
                         (["--samples", str(tmp_path / "good.npz"), "--ref", str(tmp_path / "one.npz")], "--ref"),
                         (["--samples", str(tmp_path / "nodir"), "--ref", str(tmp_path / "good.npz")], "neither an .npz")]:
        assert_cli_error(capsys, ev.main, ["fid", *argv], needle)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(8), sigma=np.eye(7))
    assert_cli_error(capsys, ev.main, ["fid", "--samples", str(tmp_path / "good.npz"), "--ref", str(tmp_path / "stats.npz")],
                     "reference statistics must be finite mu (D,) and sigma (D, D), got (8,) and (7, 7)")


class _Trunk(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=8)

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 1)


class _NotInception(torch.nn.Module):
    """Same calling convention as clean-fid's Inception TorchScript, but 8-d features and 10 classes."""

    def __init__(self):
        super().__init__()
        self.layers, self.fc = _Trunk(), torch.nn.Linear(8, 10)

    def forward(self, x, no_output_bias: bool = False):
        return torch.softmax(self.fc(self.layers((x - 128) / 128).flatten(1)), 1)


def test_inception_file_is_checked_before_its_output_is_called_inception(tmp_path, capsys):
    torch.manual_seed(0)
    stand_in = tmp_path / "weights" / ev.INCEPTION_FILE            # the expected name, the wrong network
    stand_in.parent.mkdir()
    torch.jit.script(_NotInception()).save(str(stand_in))
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "a.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "b.npz", arr_0=rng.integers(0, 128, (6, 16, 16, 3), dtype=np.uint8))
    fid = ["fid", "--samples", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "b.npz"), "--inception-path"]
    assert_cli_error(capsys, ev.main, fid + [str(stand_in)], "is not clean-fid's inception-2015-12-05.pt", "(8,) / (10,)")
    (tmp_path / "junk.pt").write_bytes(b"\0" * 100)
    assert_cli_error(capsys, ev.main, fid + [str(tmp_path / "junk.pt")], "does not load as TorchScript")
    # in-process, a test may run the whole clean-fid pipeline on the stand-in: it is then never named Inception
    ext = ev.InceptionExtractor(str(stand_in), torch.device("cpu"), verify=False, mode="clean")
    a, b = np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "b.npz")["arr_0"]
    res = ev.generation_metrics(ext, a, real=b)
    assert "not FID" in res["network"] and "Inception" not in res["network"] and res["fid"] > 0
    assert ev.generation_metrics(ext, a, real=a)["fid"] == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- image modes (item 6)

def _expected_16bit(v):
    return np.repeat(np.clip((v.astype(np.int64) + 128) // 257, 0, 255).astype(np.uint8)[..., None], 3, 2)


def test_every_pil_mode_converts_to_the_right_rgb():
    rng = np.random.default_rng(2)
    v16 = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    v16[0, :3] = [0, 65535, 32896]                                  # black, white, mid grey (round(32896/257)=128)
    cases = {
        "I;16": (Image.frombytes("I;16", (7, 5), v16.astype("<u2").tobytes()), _expected_16bit(v16)),
        "I;16B": (Image.frombytes("I;16B", (7, 5), v16.astype(">u2").tobytes()), _expected_16bit(v16)),
        "I": (Image.fromarray((v16.astype(np.int32) - 1000 * (v16 < 3000)).astype(np.int32), "I"),
              _expected_16bit(np.clip(v16.astype(np.int64) - 1000 * (v16 < 3000), 0, None))),
    }
    f = np.array([[-3.2, 12.4, 200.6, 300.0]], np.float32)
    cases["F"] = (Image.fromarray(f, "F"), np.repeat(np.array([[0, 12, 201, 255]], np.uint8)[..., None], 3, 2))
    lum = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    alpha = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    grey = np.repeat(lum[..., None], 3, 2)
    cases["L"] = (Image.fromarray(lum, "L"), grey)
    cases["LA"] = (Image.fromarray(np.stack([lum, alpha], 2), "LA"), grey)
    bits = lum > 127
    cases["1"] = (Image.fromarray(bits), np.repeat((bits * 255).astype(np.uint8)[..., None], 3, 2))
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette.flatten().tolist())
    cases["P"] = (p, palette[idx])
    pa = Image.fromarray(np.stack([idx, alpha], 2), "LA")
    pa = Image.merge("PA", (p, pa.getchannel("A")))
    pa.putpalette(palette.flatten().tolist())
    cases["PA"] = (pa, palette[idx])
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    cases["RGBA"] = (Image.fromarray(np.concatenate([rgb, alpha[..., None]], 2), "RGBA"), rgb)
    cmyk = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    k = cmyk[..., 3:].astype(np.float64) / 255
    cases["CMYK"] = (Image.fromarray(cmyk, "CMYK"),
                     np.round(255 * (1 - cmyk[..., :3] / 255) * (1 - k)).astype(np.uint8))
    for mode, (im, expected) in cases.items():
        assert im.mode == mode
        out = np.asarray(pil_to_rgb(im))
        assert out.dtype == np.uint8 and out.shape == expected.shape, mode
        tol = 1 if mode == "CMYK" else 0                            # PIL's integer CMYK arithmetic
        assert np.abs(out.astype(int) - expected.astype(int)).max() <= tol, mode


def test_16bit_png_loads_with_the_right_values(tmp_path):
    rng = np.random.default_rng(3)
    v16 = rng.integers(0, 65536, (16, 16), dtype=np.uint16)
    (tmp_path / "c").mkdir()
    Image.frombytes("I;16", (16, 16), v16.astype("<u2").tobytes()).save(tmp_path / "c" / "x.png")
    x, _ = ImageFolder(tmp_path, 16)[0]
    expected = torch.from_numpy(_expected_16bit(v16)).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x, expected)
    assert np.array_equal(np.asarray(ev.load_rgb(tmp_path / "c" / "x.png")), _expected_16bit(v16))


# ----------------------------------------------------------------------------- divergence (item 7)

def test_divergence_with_a_finite_loss_stops(smoke_models, tmp_path):
    p = run(["train_diffusion.py", "--preset", "smoke", "--vae", str(smoke_models / "vae" / "last.pt"), "--out",
             str(tmp_path), "--lr", "1e6"])
    assert_one_line_error(p, "gradient norm is inf at step", "stopped; last good checkpoint")
    assert "done:" not in p.stdout
    step = int(re.search(r"at step (\d+)", p.stderr).group(1))
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert all(np.isfinite(losses)) and len(losses) == step    # the loss itself never went non-finite
    if step > 3:                                                # a checkpoint, if any, is from a step before
        assert load_checkpoint(str(tmp_path / "last.pt"), "sit")["step"] < step


def test_nonfinite_skip_leaves_the_weights_unchanged(tmp_path, monkeypatch):
    import fft_ops
    real_blur, calls = fft_ops.gaussian_blur, {"n": 0}

    def blur_then_nan(x, sigma):                                # steps 4.. have a NaN loss
        calls["n"] += 1
        return real_blur(x, sigma) * (float("nan") if calls["n"] > 3 else 1.0)

    monkeypatch.setattr(fft_ops, "gaussian_blur", blur_then_nan)
    out = tmp_path / "skip"
    train_vae.main(["--preset", "smoke", "--out", str(out), "--on-nonfinite", "skip", "--steps", "5", "--ckpt-every", "3",
                    "--stats-images", "8"])
    m = read_metrics(out / "metrics.jsonl")
    assert [r["skipped"] for r in m] == [0, 0, 0, 1, 1]
    ck = load_checkpoint(str(out / "last.pt"), "vae")
    assert ck["step"] == 5 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert all(torch.isfinite(v).all() for v in ck["disc"].values())


# ----------------------------------------------------------------------------- full disk (item 8)

@pytest.fixture
def full_disk(monkeypatch):
    """A file system under FOLDER with `free` bytes left: os.write on files there fails with ENOSPC beyond it.

    Every file the project writes goes through os.write (common.atomic_write, MetricsLog), as the kernel's
    write(2) would report a full disk; files elsewhere are untouched."""
    real_write = os.write

    def install(folder, free):
        state = {"free": free, "folder": os.path.realpath(folder) + os.sep}

        def write(fd, data):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if not target.startswith(state["folder"]):
                return real_write(fd, data)
            n = min(len(data), state["free"])
            if n == 0 and len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            state["free"] -= n
            return real_write(fd, bytes(data[:n]))

        monkeypatch.setattr(os, "write", write)
        return state
    return install


def leftovers(folder):
    """Temporaries left behind (the run folder's lock file, .lock, is no temporary)."""
    return sorted(f for f in os.listdir(folder)
                  if (f.startswith(".") and f != ".lock") or f.endswith((".tmp", ".part")))


def test_full_disk_keeps_the_last_checkpoint_and_leaves_no_temporary(tmp_path, full_disk):
    out = tmp_path / "vae"
    smoke = ["--preset", "smoke", "--out", str(out), "--gan-weight", "0", "--sample-every", "100"]
    train_vae.main(smoke + ["--steps", "3"])
    before = (out / "last.pt").read_bytes()
    full_disk(out, free=3000)                                   # room for metrics lines, not for a checkpoint
    with pytest.raises(UserError) as e:
        train_vae.main(smoke + ["--steps", "6"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("disk full (No space left on device) while writing")
    assert f"the previous {out / 'last.pt'} is kept unchanged" in msg
    assert (out / "last.pt").read_bytes() == before and load_checkpoint(str(out / "last.pt"), "vae")["step"] == 3
    assert leftovers(out) == []
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_full_disk_during_sampling_leaves_no_partial_png_or_npz(smoke_models, tmp_path, full_disk):
    out = tmp_path / "samples"
    args = ["sample", "--ckpt", str(smoke_models / "sit" / "last.pt"), "--num-samples", "6", "--sample-steps", "2",
            "--batch", "6", "--sampler", "euler", "--out", str(out)]
    full_disk(tmp_path, free=2500)                              # a few PNGs fit, the rest and the npz do not
    with pytest.raises(UserError, match=r"^disk full .* while writing .*: .* was not written; free some space"):
        ev.main(args)
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert 0 < len(pngs) < 6 and leftovers(out) == [] and leftovers(tmp_path) == []
    assert all(np.asarray(Image.open(out / f)).shape == (16, 16, 3) for f in pngs)   # every PNG is complete
    assert not (tmp_path / "samples.npz").exists()
    full_disk(tmp_path, free=10 ** 9)
    ev.main(args)
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (6, 16, 16, 3)


def test_atomic_write_failure_keeps_the_old_file(tmp_path, full_disk):
    path = tmp_path / "recon.json"
    common.write_json(path, {"old": 1})
    full_disk(tmp_path, free=4)
    with pytest.raises(UserError, match="kept unchanged"):
        common.write_json(path, {"new": list(range(100))})
    assert json.loads(path.read_text()) == {"old": 1} and leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):                      # Ctrl-C mid-write: the temporary goes too
        with common.atomic_write(tmp_path / "x.bin") as f:
            f.write(b"abc")
            raise KeyboardInterrupt
    assert not (tmp_path / "x.bin").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- honest endings (item 9)

def test_zero_steps_writes_nothing_and_does_not_say_done(tmp_path, capsys):
    train_vae.main(["--preset", "smoke", "--out", str(tmp_path / "v"), "--steps", "0"])
    out = capsys.readouterr().out
    assert "done:" not in out and "nothing to train: at step 0 of --steps 0; no checkpoint written" in out
    assert not (tmp_path / "v" / "last.pt").exists()


# ----------------------------------------------------------------------------- one clear line per bad flag

def test_bad_training_flags_are_one_clear_line(smoke_models, tmp_path, capsys):
    vae = str(smoke_models / "vae" / "last.pt")
    (tmp_path / "afile").write_text("x")
    out = ["--out", str(tmp_path / "o")]
    vae_cases = [(["--out", str(tmp_path / "afile")], "is a file, not a folder"),
                 (["--out", str(tmp_path / "afile" / "sub")], "cannot be written to"),
                 (out + ["--global-batch", "0"], "--global-batch must be >= 1; got 0"),
                 (out + ["--ckpt-every", "0"], "--ckpt-every must be >= 1"),
                 (out + ["--micro-batch", "0"], "--micro-batch must be >= 1"),
                 (out + ["--steps", "-1"], "--steps must be >= 0"),
                 (out + ["--device", "gpu0"], "--device 'gpu0' is not a device name")]
    if not torch.cuda.is_available():
        vae_cases.append((out + ["--device", "cuda"], "no CUDA GPU is available"))
    for argv, needle in vae_cases:
        assert_cli_error(capsys, train_vae.main, ["--preset", "smoke", *argv], needle)
    sit = ["--preset", "smoke", "--vae", vae, *out]
    for argv, needle in [(["--warmup-steps", "-2", "--freqwarm"], "--warmup-steps must be >= 0"),
                         (["--warmup-frac", "1.5", "--freqwarm"], "--warmup-frac must be in [0.0, 1.0]; got 1.5"),
                         (["--warmup-frac", "nan", "--freqwarm"], "--warmup-frac must be in [0.0, 1.0]; got nan"),
                         (["--sample-steps", "0"], "--sample-steps must be >= 1"),
                         (["--model", "smoke/0"], "unknown SiT model 'smoke/0'"),
                         (["--image-size", "18"], "cannot serve 18-px ones"),
                         (["--r0", "0.9", "--freqwarm"], "r0 must be in (0, 0.71]")]:
        assert_cli_error(capsys, td.main, sit + argv, needle)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_one_clear_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_cli_error(capsys, train_vae.main, ["--preset", "smoke", "--out", str(ro / "run")], "cannot be written to")
        assert_cli_error(capsys, train_vae.main, ["--preset", "smoke", "--out", str(ro)], "cannot be written to")
    finally:
        ro.chmod(0o755)


def test_bad_evaluation_flags_are_one_clear_line(smoke_models, tmp_path, capsys):
    vae, sit = str(smoke_models / "vae" / "last.pt"), str(smoke_models / "sit" / "last.pt")
    for argv, needle in [(["recon", "--vae", vae, "--n", "0"], "--n must be a positive number"),
                         (["diagnose", "--vae", vae, "--n", "0"], "--n must be a positive number"),
                         (["sample", "--ckpt", sit, "--num-samples", "0"], "--num-samples must be >= 1"),
                         (["sample", "--ckpt", sit, "--batch", "0"], "--batch must be >= 1"),
                         (["sample", "--ckpt", sit, "--sample-steps", "0"], "--sample-steps must be >= 1"),
                         (["sample", "--ckpt", sit, "--device", "gpu0"], "not a device name")]:
        assert_cli_error(capsys, ev.main, argv + (["--out", str(tmp_path / "o")] if argv[0] != "recon" else []), needle)


def test_corrupt_image_in_a_loader_worker_is_named_once(tmp_path):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    bad = root / "b" / "1.png"
    bad.write_bytes(b"not a png")
    p = run(["train_vae.py", "--preset", "smoke", "--data", str(root), "--workers", "1", "--global-batch", "8", "--val-images", "0",
             "--out", str(tmp_path / "o")])
    assert_one_line_error(p, f"cannot read image {bad}")
    assert p.stderr.count(str(bad)) == 1 and "worker" not in p.stderr


# ----------------------------------------------------------------------------- README's DDP sampling command

def test_readme_ddp_sampling_command_matches_one_process(smoke_models, tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    line = next(l for l in readme.splitlines() if l.startswith("torchrun") and "evaluate.py sample" in l)
    argv = shlex.split(line)
    assert argv[:3] == ["torchrun", "--nproc_per_node=8", "evaluate.py"] and "--num-samples" in argv
    argv[argv.index("--ckpt") + 1] = str(smoke_models / "sit" / "last.pt")
    argv[argv.index("--num-samples") + 1] = "5"
    script_args = argv[2:] + ["--sample-steps", "3", "--batch", "4"]
    two = run(script_args[:] + ["--out", str(tmp_path / "two")], torchrun=2)     # python -m torch.distributed.run
    assert two.returncode == 0, two.stderr[-3000:]
    one = run(script_args + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (np.load(tmp_path / f"{r}.npz")["arr_0"] for r in ("one", "two"))
    assert a.shape == (5, 16, 16, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1 and (a != b).mean() < 0.01
