"""Errors that would leave a user stuck: each stops early with one line that says what to do, or the command does
what it was asked (a run folder as --ckpt, an autoencoder that keeps its identity under --stats-only)."""
import json
import os
import shutil

import pytest
import torch

import bench
import evaluate as ev
import train_diffusion as td
import train_vae
from common import load_checkpoint, run_main
from data import DeadLeaves, export_imagefolder
from helpers import run
from test_run_provenance import one_line_error
from vae import load_autoencoder


# ----------------------------------------------------------------------------- unreadable images

def sorted_folder(root, n=40):
    """An ImageNet-style folder of 10 sorted classes (16 px dead leaves)."""
    export_imagefolder(DeadLeaves(n=n, resolution=16), root)
    return root


def test_unreadable_images_stop_a_fresh_run_before_its_first_step(smoke_models, tmp_path, capsys, monkeypatch):
    data = sorted_folder(tmp_path / "data")
    broken = sorted(data.rglob("*.png"))[37]                        # a late class: met only after some steps
    broken.write_bytes(broken.read_bytes()[:60])                      # truncated, as a failed copy leaves it
    (data / "class_001" / "0000001.png").write_bytes(b"")             # and an empty file
    for main, argv in ((train_vae.main, ["--preset", "smoke", "--gan-weight", "0", "--out", str(tmp_path / "v")]),
                       (td.main, ["--preset", "smoke", "--vae", str(smoke_models / "vae" / "last.pt"),
                                  "--out", str(tmp_path / "s")])):
        line = one_line_error(capsys, main, argv + ["--data", str(data), "--workers", "1"],
                              "2 of the 40 images", "0000001.png", broken.name, "no step has run")
        out = argv[argv.index("--out") + 1]
        assert not os.path.exists(os.path.join(out, "last.pt")) and "Traceback" not in line
    # repaired (the files replaced): the run starts; a resume is not checked again (its fingerprint is the checked one)
    sorted_folder(data)
    checked = []
    real = train_vae.check_readable
    monkeypatch.setattr(train_vae, "check_readable", lambda *a: checked.append(1) or real(*a))
    argv = ["--preset", "smoke", "--gan-weight", "0", "--data", str(data), "--out", str(tmp_path / "v")]
    train_vae.main(argv + ["--steps", "3"])
    train_vae.main(argv + ["--steps", "4"])
    assert checked == [1] and load_checkpoint(str(tmp_path / "v" / "last.pt"), "vae")["step"] == 4


def test_two_ranks_share_the_check_and_stop_with_the_same_line(tmp_path):
    """Each rank decodes its half of the files; an unreadable file in either half stops both, before step 0."""
    data = sorted_folder(tmp_path / "data", n=20)
    for name in ("class_002/0000002.png", "class_002/0000012.png"):      # files 4 and 5 of the sorted list:
        (data / name).write_bytes(b"not an image")                       # one on each rank
    p = run(["train_vae.py", "--preset", "smoke", "--gan-weight", "0", "--data", str(data), "--out",
             str(tmp_path / "v")], torchrun=2)
    assert p.returncode != 0 and not (tmp_path / "v" / "last.pt").exists()
    lines = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
    assert lines and all("2 of the 20 images" in l and "0000002.png" in l and "0000012.png" in l for l in lines)


# ----------------------------------------------------------------------------- --stats-only keeps the identity

def test_stats_only_keeps_the_autoencoder_of_the_sits_trained_on_it(smoke_models, tmp_path, capsys):
    vae = tmp_path / "vae"
    shutil.copytree(smoke_models / "vae", vae)
    sit = tmp_path / "sit"
    td.main(["--preset", "smoke", "--vae", str(vae / "last.pt"), "--out", str(sit), "--steps", "2"])
    before = load_autoencoder(str(vae / "last.pt")).content_hash
    stats_before = load_checkpoint(str(vae / "last.pt"), "vae")["latent_stats"]["mean"]
    train_vae.main(["--stats-only", "--resume", str(vae), "--stats-images", "16"])     # a run folder: its last.pt
    assert not torch.equal(load_checkpoint(str(vae / "last.pt"), "vae")["latent_stats"]["mean"], stats_before)
    assert load_autoencoder(str(vae / "last.pt")).content_hash == before == load_autoencoder(str(vae)).content_hash
    # the SiT samples and resumes on it, and its export is the same autoencoder
    ev.main(["sample", "--ckpt", str(sit / "last.pt"), "--num-samples", "2", "--sample-steps", "2",
             "--out", str(tmp_path / "samples")])
    td.main(["--preset", "smoke", "--vae", str(vae / "last.pt"), "--out", str(sit), "--steps", "3"])
    ev.main(["export", "--ckpt", str(vae / "last.pt"), "--out", str(tmp_path / "export")])
    assert load_autoencoder(str(tmp_path / "export")).content_hash == before
    # new weights are a new autoencoder: trained on, it no longer serves the SiT
    train_vae.main(["--preset", "smoke", "--gan-weight", "0", "--out", str(vae), "--steps", "7"])
    assert load_autoencoder(str(vae / "last.pt")).content_hash != before
    one_line_error(capsys, ev.main, ["sample", "--ckpt", str(sit / "last.pt"), "--num-samples", "2",
                                     "--sample-steps", "2", "--out", str(tmp_path / "samples2")],
                   "is not the autoencoder")


# ----------------------------------------------------------------------------- command lines that meant something else

def test_bench_smoke_without_gpu_check_is_refused_not_the_full_benchmark(capsys, monkeypatch):
    class Started(Exception):
        pass

    def started(*a, **k):
        raise Started
    monkeypatch.setattr(bench, "Bench", started)                     # the table would start here
    for argv, needle in ((["--smoke"], "--smoke applies only with --gpu-check"),
                         (["--phases", "equiv"], "--phases applies only with --gpu-check"),
                         (["--gpu-check", "--quick"], "--gpu-check --smoke"),
                         (["--gpu-check", "--rows", "vae", "--compile"], "--rows, --compile set the throughput table")):
        one_line_error(capsys, bench.main, argv, needle)


def test_a_preset_of_the_other_architecture_names_the_right_presets(capsys):
    one_line_error(capsys, train_vae.main, ["--arch", "dcae", "--preset", "smoke"],
                   "--preset smoke is a preset of --arch vit", "--preset dcae-smoke")
    one_line_error(capsys, train_vae.main, ["--arch", "vit", "--preset", "dcae-smoke"], "--preset smoke")
    # what a preset sets is not "given on the command line"
    assert train_vae.get_args(["--preset", "smoke", "--lr", "0.01"]).explicit == ["lr"]


def test_export_takes_a_run_folder_and_checks_the_hub_id_before_exporting(smoke_models, tmp_path, capsys):
    run = smoke_models / "sit"
    ev.main(["export", "--ckpt", str(run), "--out", str(tmp_path / "a")])
    ev.main(["export", "--ckpt", str(run / "last.pt"), "--out", str(tmp_path / "b")])
    cfg = [json.loads((tmp_path / x / "config.json").read_text()) for x in "ab"]
    assert cfg[0] == cfg[1] and cfg[0]["source"]["checkpoint"] == str(run / "last.pt")
    one_line_error(capsys, ev.main, ["export", "--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "c")],
                   "is an export already")
    one_line_error(capsys, ev.main, ["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "c")],
                   "is a folder without a run's last.pt")
    one_line_error(capsys, train_vae.main, ["--preset", "smoke", "--resume", str(tmp_path / "a"), "--out",
                                            str(tmp_path / "v")], "is an export folder, not a checkpoint file")
    one_line_error(capsys, ev.main, ["export", "--ckpt", str(run), "--out", str(tmp_path / "c"),
                                     "--push-to-hub", "not a repo id"], "'not a repo id' is not a Hub repo id")
    assert not (tmp_path / "c").exists()                             # refused before anything was written
    # sample takes the run folder as well, as its last.pt
    for ck, out in ((run, "s1"), (run / "last.pt", "s2")):
        ev.main(["sample", "--ckpt", str(ck), "--num-samples", "2", "--sample-steps", "2",
                 "--out", str(tmp_path / out)])
    assert (tmp_path / "s1.npz").read_bytes() == (tmp_path / "s2.npz").read_bytes()


# ----------------------------------------------------------------------------- files the scripts keep, edited by hand

def test_a_json_file_that_is_not_json_is_named_with_the_fix(smoke_models, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(smoke_models / "sit" / "last.pt", run / "last.pt")
    samples = tmp_path / "samples"
    sample = ["sample", "--ckpt", str(run), "--num-samples", "2", "--sample-steps", "2", "--out", str(samples)]
    ev.main(sample)
    (samples / "manifest.json").write_text('{"labels": "bal')                              # cut short by hand
    one_line_error(capsys, ev.main, sample, f"{samples / 'manifest.json'} is not valid JSON", "another --out")
    dl = ["--features", "deadleaves", "--dl-train-images", "50", "--dl-steps", "3"]
    one_line_error(capsys, ev.main, ["fid", "--samples", f"{samples}.npz", *dl], "manifest.json is not valid JSON")
    ev.main(sample[:-1] + [str(tmp_path / "good")])
    (run / "generation_metrics.json").write_text("{\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: ev.main(["fid", "--samples", str(tmp_path / "good.npz"), "--record", str(run), *dl]))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "generation_metrics.json is not valid JSON" in err.splitlines()[-1]
    assert "fd_dl" not in out                                         # no numbers printed before the error
    one_line_error(capsys, ev.main, ["compare", str(run), "--out", str(tmp_path / "c")],
                   "generation_metrics.json is not valid JSON")
