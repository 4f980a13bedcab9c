"""Every number names the run it came from: the study finishes what is unfinished and evaluates on held-out
images, `fid --record` / `compare` tie metrics to a checkpoint, resumes refuse changed data, a fresh start
leaves nothing of an old run, no file from a non-finite state, long per-rank phases survive skew, and a few
more one-line errors."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import data
import evaluate as ev
import fft_ops
import study
import train_diffusion as td
import train_vae
import vae as vae_module
from common import UserError, file_hash, load_checkpoint, run_main, save_checkpoint
from data import DeadLeaves, build_dataset, export_imagefolder, to_uint8, train_val_split
from helpers import ROOT, read_metrics, run


def one_line_error(capsys, main, argv, *needles):
    """Run main as a script's __main__ does: exit status 2 and one `error:` line holding every needle."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(argv))
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert e.value.code == 2 and "Traceback" not in err and lines[-1].startswith("error: "), err[-2000:]
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


def sit_args(vae, out, *extra):
    return ["--preset", "smoke", "--vae", str(vae), "--out", str(out), "--sample-every", "100", *extra]


def uint8_set(images):
    return {im.tobytes() for im in images}


# ----------------------------------------------------------------------------- 1, 12: the study

def test_study_finishes_unfinished_runs_and_evaluates_on_images_no_run_trained_on(tmp_path, monkeypatch, capsys):
    tiny = dict(vae=["--preset", "smoke", "--steps", "3", "--n-images", "300", "--gan-weight", "0",
                     "--sample-every", "100"], image_size=16, seeds=1, n_eval=200)
    monkeypatch.setitem(study.SETTINGS, "tiny", tiny)
    out = tmp_path / "study"
    # a run the study starts was stopped (Ctrl-C) at step 2 of 3: it must be resumed, not tabulated as finished
    train_vae.main(tiny["vae"] + ["--seed", "0", "--out", str(out / "vae-MLSR-s0"), "--steps", "2"])
    study.main(["--setting", "tiny", "--out", str(out), "--parts", "A"])
    for name in ("MLSR", "plain"):
        ck = out / f"vae-{name}-s0" / "last.pt"
        assert load_checkpoint(str(ck), "vae")["step"] == 3, name
        assert os.stat(out / f"vae-{name}-s0" / "recon.json").st_mtime_ns >= os.stat(ck).st_mtime_ns
    commands = (out / "commands.txt").read_text().splitlines()
    # the evaluation images (as evaluate.py builds them from the recon command) are no run's training image
    trained = set()
    for line in commands:
        argv = line.split()[2:]
        if line.startswith("python train_vae.py"):
            a = train_vae.get_args(argv)
            ds = build_dataset(a.data, a.image_size, n=a.n_images, seed=a.seed)
            train_idx, _ = train_val_split(len(ds), a.val_images, a.seed)
            trained |= uint8_set(ds.render(i) for i in train_idx)
    recon = [line.split()[2:] for line in commands if line.startswith("python evaluate.py recon")]
    assert len(recon) == 2
    for argv in recon:
        batches, n = ev.eval_batches(ev.get_args(argv), None, 16, 1000, None)
        evaluated = uint8_set(to_uint8(torch.cat(list(batches))))
        assert n == tiny["n_eval"] and len(evaluated) == n and not evaluated & trained
    # a rerun of the same study runs nothing; another setting, an unknown part or a file as --out: one line
    study.main(["--setting", "tiny", "--out", str(out), "--parts", "A"])
    assert (out / "commands.txt").read_text().splitlines() == commands
    one_line_error(capsys, study.main, ["--setting", "smoke", "--out", str(out)], "holds a study of --setting tiny")
    one_line_error(capsys, study.main, ["--setting", "tiny", "--out", str(out), "--parts", "AX"], "--parts 'AX'")
    (tmp_path / "afile").write_text("x")
    one_line_error(capsys, study.main, ["--out", str(tmp_path / "afile")], "is a file, not a folder")


# ----------------------------------------------------------------------------- 2: fid --record and compare

@pytest.fixture
def small_dl_reference(monkeypatch):
    """The offline metric against 100 reference images instead of 2000 (rendering them dominates its time)."""
    monkeypatch.setattr(ev.deadleaves_metrics, "__defaults__", (100,) + ev.deadleaves_metrics.__defaults__[1:])


def test_recorded_metrics_name_their_checkpoint_and_compare_marks_stale_ones(smoke_models, tmp_path, capsys,
                                                                             small_dl_reference):
    vae = smoke_models / "vae" / "last.pt"
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        td.main(sit_args(vae, out, "--steps", "2", "--seed", str(seed), "--val-every", "0"))
        runs.append(out)
    dl = ["--dl-train-images", "100", "--dl-steps", "5"]
    for r in runs:
        ev.main(["sample", "--ckpt", str(r / "last.pt"), "--num-samples", "4", "--sample-steps", "2", "--batch", "4",
                 "--out", str(r / "samples")])
    one_line_error(capsys, ev.main, ["fid", "--features", "deadleaves", "--samples", str(runs[1] / "samples.npz"),
                                     "--record", str(runs[0]), *dl], "not from", "record into the run")
    for r in runs:
        ev.main(["fid", "--features", "deadleaves", "--samples", str(r / "samples.npz"), "--record", str(r), *dl])
        rec = next(iter(json.loads((r / "generation_metrics.json").read_text()).values()))
        assert rec["checkpoint"] == {"path": str(r / "last.pt"), "step": 2, "content_hash": file_hash(r / "last.pt")}
        assert 0.0 <= rec["class_acc_dl"] <= 1.0                 # built-in dead leaves: 10 known classes
    # no validation metrics anywhere, but recorded ones: a well-formed table
    ev.main(["compare", *map(str, runs), "--out", str(tmp_path / "c1")])
    table = (tmp_path / "c1" / "compare.md").read_text().split("\n\n")[0].splitlines()
    assert table[0] == "| runs | seeds | step | fd_dl | class_acc_dl | sample labels |"
    assert all(line.count("|") == table[0].count("|") for line in table) and "| 0,1 | 2 |" in table[2]
    # more training: the step-2 metrics are no longer of run0's checkpoint
    td.main(sit_args(vae, runs[0], "--steps", "3", "--seed", "0", "--val-every", "0"))
    ev.main(["compare", *map(str, runs), "--out", str(tmp_path / "c2")])
    text = (tmp_path / "c2" / "compare.md").read_text()
    rows = text.split("\n\n")[0].splitlines()
    assert rows[2] == "| steps=3 | 0 | 3 | - | - | - |"              # run0's metrics are of step 2: not shown
    assert f"not shown: {runs[0]}: fd_dl, class_acc_dl" in text and "step 2" in text and "(step 3)" in text
    one_line_error(capsys, ev.main, ["compare", str(runs[1]), str(runs[1]), "--out", str(tmp_path / "c3")],
                   "is given twice")
    twin = tmp_path / "twin"
    shutil.copytree(runs[1], twin)
    one_line_error(capsys, ev.main, ["compare", str(runs[1]), str(twin), "--out", str(tmp_path / "c3")],
                   "the same seed 1")
    # a runs without any metrics: still a well-formed table, and a note
    ev.main(["compare", str(runs[0]), "--out", str(tmp_path / "c4")])
    text = (tmp_path / "c4" / "compare.md").read_text()
    assert text.splitlines()[:2] == ["| runs | seeds | step |", "|---|---|---|"]


def test_class_accuracy_needs_the_dead_leaves_classes(smoke_models, tmp_path, small_dl_reference):
    data = tmp_path / "data"
    for c in range(12):                                   # 12 classes: class i mod 12 is not hue band i mod 10
        for i in range(2):
            (data / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(DeadLeaves(n=24, resolution=16).render(2 * c + i)).save(data / f"c{c:02d}" / f"{i}.png")
    out = tmp_path / "sit"
    td.main(sit_args(smoke_models / "vae" / "last.pt", out, "--steps", "1", "--data", str(data), "--val-images", "4"))
    ev.main(["sample", "--ckpt", str(out / "last.pt"), "--num-samples", "4", "--sample-steps", "2",
             "--out", str(out / "samples")])
    ev.main(["fid", "--features", "deadleaves", "--samples", str(out / "samples.npz"), "--record", str(out),
             "--dl-train-images", "100", "--dl-steps", "5"])
    rec = next(iter(json.loads((out / "generation_metrics.json").read_text()).values()))
    assert "fd_dl" in rec and "class_acc_dl" not in rec


# ----------------------------------------------------------------------------- 3: changed data on resume

def test_resume_refuses_data_that_changed(smoke_models, tmp_path):
    data = export_imagefolder(DeadLeaves(n=24, resolution=16), tmp_path / "data")
    vae_out, sit_out = tmp_path / "vae", tmp_path / "sit"
    vae_cmd = ["--preset", "smoke", "--out", str(vae_out), "--data", str(data), "--gan-weight", "0",
               "--sample-every", "100"]
    train_vae.main(vae_cmd + ["--steps", "1"])
    td.main(sit_args(smoke_models / "vae" / "last.pt", sit_out, "--data", str(data), "--steps", "1"))
    extra = data / "class_003" / "0099999.png"
    shutil.copy(sorted(data.rglob("*.png"))[0], extra)                          # one image added
    with pytest.raises(UserError, match="trained on other data than --data"):
        train_vae.main(vae_cmd + ["--steps", "2"])
    with pytest.raises(UserError, match="trained on other data than --data"):
        td.main(sit_args(smoke_models / "vae" / "last.pt", sit_out, "--data", str(data), "--steps", "2"))
    extra.unlink()
    sorted(data.rglob("*.png"))[5].unlink()                                    # one image removed
    with pytest.raises(UserError, match="images were added, removed or changed"):
        train_vae.main(vae_cmd + ["--steps", "2"])


# ----------------------------------------------------------------------------- 4: a fresh start in a used folder

def test_a_fresh_start_leaves_nothing_of_the_old_run(smoke_models, tmp_path):
    out = tmp_path / "r"
    vae = smoke_models / "vae" / "last.pt"
    td.main(sit_args(vae, out, "--steps", "2", "--sample-every", "1", "--val-every", "1"))
    (out / "generation_metrics.json").write_text("{}")
    assert {f.name for f in out.glob("samples_*.png")} == {"samples_0000001.png", "samples_0000002.png"}
    td.main(sit_args(vae, out, "--steps", "1", "--seed", "3", "--resume", "none", "--overwrite",
                     "--val-every", "1"))
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "val_loss" in r] == [0, 1]            # one step-0 line: this run's
    assert {f.name for f in out.glob("samples_*.png")} == {"samples_0000001.png"}   # this run's final grid only
    assert not (out / "generation_metrics.json").exists()
    # a folder whose first run was killed before any checkpoint: its step-0 line goes too
    out2 = tmp_path / "r2"
    out2.mkdir()
    (out2 / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_loss": 123.0}) + "\n")
    td.main(sit_args(vae, out2, "--steps", "1", "--val-every", "1"))
    assert 123.0 not in [r.get("val_loss") for r in read_metrics(out2 / "metrics.jsonl", "val")]


# ----------------------------------------------------------------------------- 5: no file from a non-finite state

def test_non_finite_samples_and_grids_write_nothing(smoke_models, tmp_path, capsys, monkeypatch):
    ckpt = str(smoke_models / "sit" / "last.pt")
    out = tmp_path / "s"
    one_line_error(capsys, ev.main, ["sample", "--ckpt", ckpt, "--num-samples", "3", "--sample-steps", "2",
                                     "--cfg-scale", "1e30", "--out", str(out)], "non-finite", "nothing written")
    assert not list(out.glob("*.png")) and not (tmp_path / "s.npz").exists()
    one_line_error(capsys, ev.main, ["sample", "--ckpt", ckpt, "--cfg-scale", "nan", "--out", str(out)],
                   "--cfg-scale must be a finite number; got nan")
    run_dir = tmp_path / "t"                          # a training grid from a sampler that went non-finite
    real_ode = td.sample_ode
    monkeypatch.setattr(td, "sample_ode", lambda *a, **k: real_ode(*a, **k) * float("nan"))
    one_line_error(capsys, td.main, sit_args(smoke_models / "vae" / "last.pt", run_dir, "--steps", "1",
                                             "--sample-every", "1"), "not finite", "not written")
    assert not list(run_dir.glob("*.png")) and not (run_dir / "last.pt").exists()


# ----------------------------------------------------------------------------- 6: an empty class folder

def test_an_empty_class_folder_is_refused(tmp_path, capsys):
    data = export_imagefolder(DeadLeaves(n=20, resolution=16), tmp_path / "data")
    (data / "class_005_empty").mkdir()
    one_line_error(capsys, train_vae.main, ["--preset", "smoke", "--data", str(data), "--out", str(tmp_path / "o")],
                   "class_005_empty", "hold no images")


# ----------------------------------------------------------------------------- 7: statistics of training images

def test_latent_statistics_exclude_the_held_out_images(tmp_path):
    out = tmp_path / "v"
    train_vae.main(["--preset", "smoke", "--out", str(out), "--gan-weight", "0", "--steps", "1", "--n-images", "24",
                    "--val-images", "8", "--stats-images", "1000", "--sample-every", "100"])
    ck = load_checkpoint(str(out / "last.pt"), "vae")
    ds = DeadLeaves(n=24, resolution=16, seed=0)
    train_idx, val_idx = train_val_split(24, 8, 0)
    ae = vae_module.load_autoencoder(str(out / "last.pt"), "cpu")
    with torch.no_grad():
        z = ae.encode(torch.stack([ds[i][0] for i in train_idx])).double()          # (16, C, h, w)
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(ck["latent_stats"]["mean"].double(), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ck["latent_stats"]["std"].double(), std, rtol=1e-4, atol=1e-5)
    assert ck["latent_stats"]["n_images"] == 16 and "held-out validation images excluded" in ck["latent_stats"]["source"]


# ----------------------------------------------------------------------------- 8: skew and a stopped cache build

SKEWED = """
import os, sys, time
sys.path.insert(0, {root!r})
import dit, train_diffusion as td, evaluate as ev
from common import run_main
if os.environ["RANK"] == "1":                          # rank 1 falls far behind in both long per-rank phases
    def late(fn):
        state = {{"slept": False}}
        def wrapped(*a, **k):
            if not state["slept"]:
                state["slept"] = True
                time.sleep({sleep})
            return fn(*a, **k)
        return wrapped
    td.encode_images = late(td.encode_images)
    dit.sample_ode = late(dit.sample_ode)
def both():
    td.main({train!r})
    ev.main({sample!r})
run_main(both)
"""


def test_cache_build_and_sampling_survive_a_rank_later_than_the_timeout(smoke_models, tmp_path):
    out = tmp_path / "sit"
    train = sit_args(smoke_models / "vae" / "last.pt", out, "--steps", "1", "--cache-latents", "--dist-timeout", "3")
    sample = ["sample", "--ckpt", str(out / "last.pt"), "--num-samples", "4", "--sample-steps", "2", "--batch", "2",
              "--dist-timeout", "3", "--out", str(tmp_path / "samples")]
    script = tmp_path / "skewed.py"
    script.write_text(SKEWED.format(root=ROOT, sleep=7, train=train, sample=sample))
    p = run([str(script)], torchrun=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (4, 16, 16, 3)
    assert load_checkpoint(str(out / "last.pt"), "sit")["step"] == 1


def test_a_stopped_cache_build_resumes_from_its_finished_shards(smoke_models, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE_SHARD_KEYS", 40)                 # 128 keys: shards of 40, 40, 40, 8
    args = sit_args(smoke_models / "vae" / "last.pt", tmp_path / "a", "--steps", "1", "--cache-latents")
    real, encoded = td.encode_images, []

    def counting(ae, images, lowpassed, args):
        encoded.append(len(images))
        if len(encoded) == 3 and stop["on"]:
            raise KeyboardInterrupt
        return real(ae, images, lowpassed, args)
    stop = {"on": True}
    monkeypatch.setattr(td, "encode_images", counting)
    with pytest.raises(KeyboardInterrupt):
        td.main(args + ["--val-images", "0"])
    assert sum(encoded[:2]) == 80 and not list((tmp_path / "a").rglob("*.part"))   # two shards were finished
    stop["on"], encoded[:] = False, []
    td.main(args + ["--val-images", "0"])
    assert sum(encoded) == 48                                          # only the two unfinished shards
    fresh = sit_args(smoke_models / "vae" / "last.pt", tmp_path / "b", "--steps", "1", "--cache-latents")
    td.main(fresh + ["--val-images", "0"])
    (ca,), (cb,) = (list((tmp_path / r).glob("latents-*")) for r in "ab")
    rows_a, rows_b = data.CachedRows(str(ca)), data.CachedRows(str(cb))
    assert len(rows_a) == 128 and np.array_equal(rows_a[np.arange(128)], rows_b[np.arange(128)])


# ----------------------------------------------------------------------------- 10: precision in the manifest

def test_a_sample_folder_refuses_another_precision(smoke_models, tmp_path, capsys):
    base = ["sample", "--ckpt", str(smoke_models / "sit" / "last.pt"), "--num-samples", "4", "--sample-steps", "2",
            "--out", str(tmp_path / "s")]
    ev.main(base + ["--num-samples", "2"])
    one_line_error(capsys, ev.main, base + ["--no-bf16"], "other settings", "no_bf16: False there, True now")


# ----------------------------------------------------------------------------- 11: the discriminator's real images

@pytest.mark.parametrize("reading", ["target", "image"])
def test_the_discriminator_sees_the_target_of_eq2_as_real(tmp_path, monkeypatch, reading):
    targets, seen = [], []
    real_blur, real_forward = fft_ops.gaussian_blur, vae_module.PatchDiscriminator.forward

    def blur(x, sigma):
        targets.append((x.detach().clone(), real_blur(x, sigma).detach().clone()))
        return targets[-1][1]

    def forward(self, x):
        seen.append(x.detach().clone())
        return real_forward(self, x)
    monkeypatch.setattr(fft_ops, "gaussian_blur", blur)
    monkeypatch.setattr(vae_module.PatchDiscriminator, "forward", forward)
    train_vae.main(["--preset", "smoke", "--out", str(tmp_path), "--steps", "1", "--gan-start", "0", "--val-images", "0",
                    "--mlsr-sigmas", "1", "1", "1", "1", "--sample-every", "100", "--stats-images", "8",
                    "--gan-real", reading])
    x, target = targets[0]
    assert not torch.allclose(x, target)
    # forwards of step 1: D(recon) for the generator, then D(real), D(recon.detach()) for the discriminator
    torch.testing.assert_close(seen[1], target if reading == "target" else x)


# ----------------------------------------------------------------------------- tracebacks and unhelpful lines

def test_a_checkpoint_without_latent_statistics_is_one_line_in_sample_and_resume(smoke_models, tmp_path, capsys):
    ck = load_checkpoint(str(smoke_models / "sit" / "last.pt"), "sit")
    del ck["latent_stats"]
    os.makedirs(tmp_path / "nostats")
    save_checkpoint(str(tmp_path / "nostats" / "last.pt"), ck)
    one_line_error(capsys, ev.main, ["sample", "--ckpt", str(tmp_path / "nostats" / "last.pt"), "--out",
                                     str(tmp_path / "s")], "holds no latent statistics")
    one_line_error(capsys, td.main, sit_args(smoke_models / "vae" / "last.pt", tmp_path / "nostats", "--steps", "8"),
                   "holds no latent statistics")


def test_recon_on_images_smaller_than_the_ssim_window_is_one_line(tmp_path, capsys):
    train_vae.main(["--preset", "smoke", "--out", str(tmp_path / "v8"), "--image-size", "8", "--steps", "1",
                    "--gan-weight", "0", "--sample-every", "100"])
    one_line_error(capsys, ev.main, ["recon", "--vae", str(tmp_path / "v8" / "last.pt"), "--n", "4"],
                   "at least 11 px")


@pytest.mark.parametrize("argv, needle", [(["--repeats", "0"], "--repeats must be >= 1"),
                                          (["--iters", "0"], "--iters must be >= 1"),
                                          (["--device", "gpu0"], "not a device name")])
def test_bad_bench_flags_are_one_line(capsys, argv, needle):
    one_line_error(capsys, bench.main, ["--quick", *argv], needle)


def test_a_corrupt_metrics_line_names_the_file_and_the_fix(smoke_models, tmp_path, capsys):
    vae, run_dir = smoke_models / "vae" / "last.pt", tmp_path / "m"
    td.main(sit_args(vae, run_dir, "--steps", "1"))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')
    one_line_error(capsys, td.main, sit_args(vae, run_dir, "--steps", "2"), str(run_dir / "metrics.jsonl"),
                   "is not valid JSON", "delete that line")
    one_line_error(capsys, ev.main, ["compare", str(run_dir), "--out", str(tmp_path / "c")], "delete that line")
    (run_dir / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text().rsplit("\n", 1)[0] + "\n")
    capsys.readouterr()
    td.main(sit_args(vae, run_dir, "--steps", "2"))              # the fix works; without FreqWarm, no switch named
    out = capsys.readouterr().out
    assert "resumed from" in out and "FreqWarm switch" not in out


@pytest.mark.parametrize("argv, needle", [(["--fda", "--fda-weight", "nan"], "--fda-weight must be in [0.0, inf]; got nan"),
                                          (["--val-images", "-1"], "--val-images must be >= 0; got -1")])
def test_bad_stage2_flags_are_one_line(smoke_models, tmp_path, capsys, argv, needle):
    one_line_error(capsys, td.main, sit_args(smoke_models / "vae" / "last.pt", tmp_path / "o", *argv), needle)


def test_a_broken_local_diffusers_folder_gets_no_download_hint(tmp_path, capsys):
    (tmp_path / "ae").mkdir()
    (tmp_path / "ae" / "config.json").write_text("{not json")
    line = one_line_error(capsys, ev.main, ["recon", "--vae", f"diffusers:{tmp_path / 'ae'}"], "cannot read the config")
    assert "download" not in line


def test_every_step_skipped_writes_no_checkpoint_and_does_not_say_done(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fft_ops, "gaussian_blur", lambda x, sigma: x * float("nan"))
    one_line_error(capsys, train_vae.main, ["--preset", "smoke", "--out", str(tmp_path / "skip"), "--on-nonfinite",
                                            "skip", "--steps", "3", "--ckpt-every", "3"],
                   "every step of this run (1-3)", "no checkpoint is written")
    assert not (tmp_path / "skip" / "last.pt").exists()


def test_a_torchrun_settings_error_is_one_line_before_any_work(smoke_models, tmp_path):
    p = run(["train_diffusion.py", *sit_args(smoke_models / "vae" / "last.pt", tmp_path / "o", "--global-batch", "7")],
            torchrun=2)
    assert p.returncode != 0
    assert p.stderr.count("error: global batch 7 is not divisible by the world size 2") == 1, p.stderr[-3000:]
    assert "latent statistics" not in p.stdout
