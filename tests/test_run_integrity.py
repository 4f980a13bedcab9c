"""Run integrity: resume policy, run-folder identity, provenance of the autoencoder, content-keyed caches."""
import fcntl
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import train_diffusion as td
import train_vae
from common import UserError, load_checkpoint
from data import DeadLeaves, export_imagefolder
from helpers import assert_one_line_error, read_metrics, run


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    for name, seed in (("a", "0"), ("b", "1")):
        train_vae.main(["--preset", "smoke", "--out", str(root / name), "--gan-weight", "0", "--steps", "2",
                        "--seed", seed])
    return root


def sit(vae, out, *extra):
    return ["--preset", "smoke", "--vae", str(vae), "--out", str(out), "--sample-every", "100", *extra]


def test_resume_refuses_settings_that_define_the_run(vaes, tmp_path):
    out = tmp_path / "r"
    td.main(sit(vaes / "a" / "last.pt", out, "--freqwarm", "--steps", "2", "--warmup-steps", "3"))
    for extra, needle in ((["--freqwarm", "--r0", "0.3"], "--r0 0.2, not 0.3"),
                          ([], "--freqwarm True, not False"),
                          (["--freqwarm", "--warmup-steps", "4"], "--warmup-steps 4"),
                          (["--freqwarm", "--warmup-steps", "3", "--denoise-level", "1"], "--denoise-level"),
                          (["--freqwarm", "--warmup-steps", "3", "--global-batch", "16"], "--global-batch"),
                          (["--freqwarm", "--warmup-steps", "3", "--fda"], "--fda")):
        with pytest.raises(UserError, match=needle.replace("(", r"\(")):
            td.main(sit(vaes / "a" / "last.pt", out, *extra, "--steps", "4"))
    with pytest.raises(UserError, match="another autoencoder"):                  # same channels, other weights
        td.main(sit(vaes / "b" / "last.pt", out, "--freqwarm", "--warmup-steps", "3", "--steps", "4"))
    with pytest.raises(UserError, match="already at step 2, past --steps 1"):
        td.main(sit(vaes / "a" / "last.pt", out, "--freqwarm", "--warmup-steps", "3", "--steps", "1"))
    # a new learning rate takes effect; the stored FreqWarm switch wins over a new --steps / --warmup-frac
    td.main(sit(vaes / "a" / "last.pt", out, "--freqwarm", "--lr", "3e-4", "--steps", "4", "--warmup-frac", "0.9"))
    ck = load_checkpoint(str(out / "last.pt"), "sit")
    assert [g["lr"] for g in ck["opt"]["param_groups"]] == [3e-4]
    assert ck["freqwarm"]["warmup_steps"] == 3
    assert [r["phase"] for r in read_metrics(out / "metrics.jsonl")] == ["warmup"] * 3 + ["full"]


def test_stage1_resume_refuses_a_changed_objective_and_takes_a_new_lr(tmp_path):
    base = ["--preset", "smoke", "--out", str(tmp_path), "--gan-weight", "0", "--sample-every", "100"]
    train_vae.main(base + ["--steps", "2"])
    with pytest.raises(UserError, match="--mlsr-fractions"):
        train_vae.main(base + ["--steps", "3", "--mlsr-fractions", "0", "0.1", "0.2", "0.3"])
    train_vae.main(base + ["--steps", "3", "--lr", "2e-4"])
    assert [g["lr"] for g in load_checkpoint(str(tmp_path / "last.pt"), "vae")["opt"]["param_groups"]] == [2e-4]


def test_a_used_folder_is_one_run(vaes, tmp_path):
    out = tmp_path / "r"
    td.main(sit(vaes / "a" / "last.pt", out, "--steps", "3"))
    with pytest.raises(UserError, match="--overwrite"):
        td.main(sit(vaes / "a" / "last.pt", out, "--steps", "3", "--resume", "none"))
    # a killed run logged steps 4-5 after its last checkpoint at 3: resuming drops them, nothing twice
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + json.dumps({"step": 5, "loss": 9.0}) + "\n")
    td.main(sit(vaes / "a" / "last.pt", out, "--steps", "5"))
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5] and 9.0 not in [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    td.main(sit(vaes / "a" / "last.pt", out, "--steps", "2", "--resume", "none", "--overwrite"))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]      # a fresh log
    with open(out / ".lock", "w") as held:                                         # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_one_line_error(run(["train_diffusion.py", *sit(vaes / "a" / "last.pt", out, "--steps", "3")]),
                              "another run is using")


def test_sample_checks_the_autoencoder_by_content(vaes, tmp_path):
    vae = tmp_path / "vae" / "last.pt"
    os.makedirs(vae.parent)
    shutil.copy(vaes / "a" / "last.pt", vae)
    td.main(sit(vae, tmp_path / "sit", "--steps", "2"))
    ckpt = str(tmp_path / "sit" / "last.pt")
    common = ["sample", "--ckpt", ckpt, "--num-samples", "2", "--batch", "2", "--sample-steps", "2"]
    other_dir = run(["-c", "import os, sys, subprocess; os.chdir(sys.argv[1]); sys.exit(subprocess.call("
                     "[sys.executable, sys.argv[2]] + sys.argv[3:]))", "/", os.path.abspath("evaluate.py"), *common,
                     "--out", str(tmp_path / "s1")])
    assert other_dir.returncode == 0, other_dir.stderr[-2000:]                      # found from another directory
    shutil.copy(vaes / "b" / "last.pt", vae)                                        # "retrained in place"
    assert_one_line_error(run(["evaluate.py", *common, "--out", str(tmp_path / "s2")]), "not the autoencoder")
    shutil.copy(vaes / "a" / "last.pt", tmp_path / "original.pt")
    ok = run(["evaluate.py", *common, "--out", str(tmp_path / "s3"), "--vae", str(tmp_path / "original.pt")])
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "s1.npz")["arr_0"], np.load(tmp_path / "s3.npz")["arr_0"])


def test_replaced_images_rebuild_the_latent_cache(vaes, tmp_path):
    data = export_imagefolder(DeadLeaves(n=20, resolution=16), tmp_path / "data")
    args = ["--data", str(data), "--cache-latents", "--steps", "1"]
    td.main(sit(vaes / "a" / "last.pt", tmp_path / "r1", *args))
    first = {p.name for p in (tmp_path / "r1").glob("latents-*")}
    victim = sorted(data.rglob("*.png"))[3]
    arr = np.asarray(Image.open(victim)).copy()
    Image.fromarray(255 - arr).save(victim)                                         # same name, same count
    os.utime(victim, ns=(os.stat(victim).st_atime_ns, os.stat(victim).st_mtime_ns + 10 ** 9))
    with pytest.raises(UserError, match="trained on other data"):                 # the run may not continue on them
        td.main(sit(vaes / "a" / "last.pt", tmp_path / "r1", *args, "--steps", "2"))
    td.main(sit(vaes / "a" / "last.pt", tmp_path / "r1", *args, "--resume", "none", "--overwrite"))
    second = {p.name for p in (tmp_path / "r1").glob("latents-*")}
    assert second - first, "the cache was not rebuilt for the new images"
    (new,) = second - first
    assert json.load(open(tmp_path / "r1" / new / "index.json"))["key"] == new.split("-", 1)[1]
