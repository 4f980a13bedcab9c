"""Watching and sharing runs: TensorBoard curves (--log-to tensorboard), exported weights, the Hub."""
import errno
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as ev
import train_diffusion as td
import train_vae
from common import MetricsLog, UserError, load_checkpoint
from helpers import assert_one_line_error, read_metrics, run, spy_sampling
from vae import load_autoencoder


def tb_events(folder):
    """{(tag, step): [value, ...]} over every event file in `folder`, read with TensorBoard's own loader:
    a float for a scalar, an RGB array for an image. A list longer than one is a duplicate."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    out = {}
    for name in sorted(os.listdir(folder)):
        for e in LegacyEventFileLoader(os.path.join(folder, name)).Load():
            for v in e.summary.value:
                val = (np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)).convert("RGB"))
                       if v.HasField("image") else v.simple_value)
                out.setdefault((v.tag, e.step), []).append(val)
    return out


def expected_scalars(metrics_path):
    """What TensorBoard must hold for a metrics.jsonl: every number of every line at its step, as float32."""
    want = {}
    with open(metrics_path) as f:
        for r in map(json.loads, f):
            group = "val" if any(k.startswith("val_") for k in r) else "train"
            for k, v in r.items():
                if k == "phase":
                    k, v = "freqwarm_warmup", 1.0 if v == "warmup" else 0.0
                if k != "step":
                    assert (f"{group}/{k}", r["step"]) not in want, f"metrics.jsonl logs {k} twice at {r['step']}"
                    want[(f"{group}/{k}", r["step"])] = float(np.float32(v))
    return want


def assert_tensorboard_matches(out, grid_tag, grid_steps):
    """One event per (tag, step), the same numbers as metrics.jsonl, and the grid PNGs on disk as images."""
    got = tb_events(out / "tensorboard")
    assert all(len(v) == 1 for v in got.values()), [k for k, v in got.items() if len(v) > 1]
    scalars = {k: v[0] for k, v in got.items() if not k[0].startswith("grids/")}
    assert scalars == expected_scalars(out / "metrics.jsonl")
    grids = {k: v[0] for k, v in got.items() if k[0].startswith("grids/")}
    assert sorted(grids) == [(f"grids/{grid_tag}", s) for s in grid_steps]
    for (_, s), img in grids.items():
        on_disk = np.asarray(Image.open(out / f"{grid_tag}_{s:07d}.png").convert("RGB"))
        assert np.array_equal(img, on_disk)
    return scalars


def test_tensorboard_holds_the_metrics_and_a_resumed_run_no_step_twice(tmp_path):
    vae = tmp_path / "vae"
    train_vae.main(["--preset", "smoke", "--out", str(vae), "--gan-weight", "0", "--steps", "2", "--val-every", "1",
                    "--sample-every", "2", "--log-to", "tensorboard"])
    got = assert_tensorboard_matches(vae, "recon", [2])
    assert {"train/loss", "train/grad_norm", "train/lr", "train/img_per_s", "train/level", "val/val_psnr_l0"} \
        <= {tag for tag, _ in got}

    out = tmp_path / "sit"
    base = ["--preset", "smoke", "--vae", str(vae / "last.pt"), "--out", str(out), "--freqwarm", "--warmup-steps", "4",
            "--sample-every", "3", "--log-to", "tensorboard"]
    td.main(base + ["--steps", "3"])
    shutil.copy(out / "last.pt", tmp_path / "step3.pt")
    td.main(base + ["--steps", "6"])
    killed = tb_events(out / "tensorboard")
    # as if killed after logging steps 4-6 and drawing grid 6, before the step-6 checkpoint: resume at step 3,
    # with a new learning rate (so steps 4-6 come out differently)
    shutil.copy(tmp_path / "step3.pt", out / "last.pt")
    td.main(base + ["--steps", "6", "--lr", "2e-3"])
    got = assert_tensorboard_matches(out, "samples", [3, 6])
    assert [got[("train/lr", s)] for s in range(1, 7)] == [float(np.float32(x)) for x in [1e-3] * 3 + [2e-3] * 3]
    assert [got[("train/freqwarm_warmup", s)] for s in range(1, 7)] == [1, 1, 1, 1, 0, 0]
    assert got[("train/loss", 3)] == killed[("train/loss", 3)][0]                    # continued, not redrawn
    assert got[("train/loss", 5)] != killed[("train/loss", 5)][0]                    # the killed steps are gone
    assert {s for tag, s in got if tag == "val/val_loss"} == {0, 3, 6}
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", "val")] == [0, 3, 6]

    # a fresh start in the same folder: a fresh view too (nothing of the run before, step 0 once)
    td.main(base + ["--steps", "1", "--resume", "none", "--overwrite"])
    assert_tensorboard_matches(out, "samples", [1])
    assert {s for _, s in tb_events(out / "tensorboard")} == {0, 1}


def test_tensorboard_only_on_rank_0_and_only_when_asked(tmp_path, monkeypatch):
    MetricsLog(str(tmp_path / "metrics.jsonl"), enabled=False, step=0, tensorboard=True).write(step=1, loss=1.0)
    assert not os.path.exists(tmp_path / "tensorboard")                              # another rank writes nothing
    log = MetricsLog(str(tmp_path / "metrics.jsonl"), enabled=True, step=0, tensorboard=True)
    log.write(step=1, loss=1.0)
    assert os.listdir(tmp_path / "tensorboard")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(log.tb.w, "flush", full)                                     # the event writer fails
    with pytest.raises(UserError, match="disk full .* while writing .*tensorboard"):
        log.write(step=2, loss=0.5)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]  # the record has the line
    monkeypatch.undo()
    log.close()
    MetricsLog(str(tmp_path / "metrics.jsonl"), enabled=True, step=1)                # resumed without the flag
    assert not os.path.exists(tmp_path / "tensorboard")                              # no view left to go stale
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(UserError, match="pip install tensorboard"):
        td.get_args(["--preset", "smoke", "--out", str(tmp_path / "x"), "--log-to", "tensorboard"])


def test_export_samples_bit_identically_and_holds_only_ema_weights(smoke_models, tmp_path, monkeypatch):
    from safetensors import safe_open
    ckpt, exp = smoke_models / "sit" / "last.pt", tmp_path / "export"
    ev.main(["export", "--ckpt", str(ckpt), "--out", str(exp)])
    ck = load_checkpoint(str(ckpt), "sit")
    assert sorted(os.listdir(exp)) == ["config.json", "model.safetensors"]
    with safe_open(str(exp / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(ck["ema"])                                 # no optimizer, student, RNG
        assert all(torch.equal(f.get_tensor(k), ck["ema"][k]) for k in ck["ema"])
    cfg = json.load(open(exp / "config.json"))
    assert cfg["step"] == ck["step"] and cfg["model_config"] == ck["model_config"]
    assert cfg["autoencoder"]["content_hash"] == ck["autoencoder"]["content_hash"]
    assert cfg["freqwarm"] == ck["freqwarm"] and cfg["fda"]["enabled"] == ck["config"]["fda"]
    assert cfg["denoise_level"] == ck["config"]["denoise_level"] and cfg["renorm_level"] == ck["config"]["renorm_level"]
    assert not {"opt", "rng", "model", "ema", "disc"} & set(cfg)
    assert os.path.getsize(exp / "model.safetensors") < os.path.getsize(ckpt) / 2

    seen = spy_sampling(monkeypatch, ev, ev)
    runs = {}
    for name, src in (("ckpt", ckpt), ("export", exp)):
        ev.main(["sample", "--ckpt", str(src), "--num-samples", "4", "--batch", "4", "--sample-steps", "3",
                 "--cfg-scale", "2", "--out", str(tmp_path / name)])
        runs[name] = {k: seen[k] for k in ("z", "decoder_input", "decoded")}
    for k in ("z", "decoder_input", "decoded"):
        assert torch.equal(runs["ckpt"][k], runs["export"][k]), k
    assert np.array_equal(np.load(tmp_path / "ckpt.npz")["arr_0"], np.load(tmp_path / "export.npz")["arr_0"])

    # re-exporting replaces the folder whole; a folder with other files is refused
    ev.main(["export", "--ckpt", str(ckpt), "--out", str(exp)])
    assert sorted(os.listdir(exp)) == ["config.json", "model.safetensors"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".export")]
    with pytest.raises(UserError, match="holds other files"):
        ev.main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "ckpt")])


def tamper(folder, edit):
    cfg = json.load(open(folder / "config.json"))
    edit(cfg)
    json.dump(cfg, open(folder / "config.json", "w"))


def test_a_tampered_export_config_is_refused(smoke_models, tmp_path):
    exp = tmp_path / "export"
    ev.main(["export", "--ckpt", str(smoke_models / "sit" / "last.pt"), "--out", str(exp)])
    sample = ["sample", "--ckpt", str(exp), "--num-samples", "1", "--sample-steps", "1"]

    def scale_mean(c):
        c["latent_stats"]["mean"]["tensor"] = [v * 1.5 for v in c["latent_stats"]["mean"]["tensor"]]

    def other_ae(c):
        c["autoencoder"]["content_hash"] = "0123456789abcdef"

    for i, (edit, field) in enumerate(((scale_mean, "latent_stats.mean"), (other_ae, "autoencoder.content_hash"))):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(exp, bad)
        tamper(bad, edit)
        with pytest.raises(UserError, match=f"differs from the config sealed.*{field}"):
            ev.main(sample[:2] + [str(bad)] + sample[3:] + ["--out", str(tmp_path / f"s{i}")])
        assert not os.path.exists(tmp_path / f"s{i}.npz")
    # an intact export with another autoencoder (same channels, other weights) is refused as a checkpoint is
    other = tmp_path / "other_vae"
    train_vae.main(["--preset", "smoke", "--out", str(other), "--gan-weight", "0", "--steps", "1", "--seed", "5",
                    "--sample-every", "100"])
    with pytest.raises(UserError, match="is not the autoencoder"):
        ev.main(sample + ["--vae", str(other / "last.pt"), "--out", str(tmp_path / "s2")])
    # an export of the other kind: one line
    with pytest.raises(UserError, match="'vae' model is needed"):
        load_autoencoder(str(exp))


def test_vae_export_is_the_same_autoencoder_for_stage_2_and_3(smoke_models, tmp_path):
    vck, vexp = smoke_models / "vae" / "last.pt", tmp_path / "vae_export"
    ev.main(["export", "--ckpt", str(vck), "--out", str(vexp)])
    from safetensors.torch import load_file
    assert sorted(load_file(str(vexp / "model.safetensors"))) == sorted(load_checkpoint(str(vck), "vae")["ema"])
    a, b = load_autoencoder(str(vck)), load_autoencoder(str(vexp))
    assert a.content_hash == b.content_hash and a.mlsr_fractions == b.mlsr_fractions
    assert all(torch.equal(a.stats[k], b.stats[k]) for k in ("mean", "std", "level_std"))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.equal(a.encode(x), b.encode(x)) and torch.equal(a.decode(a.encode(x)), b.decode(b.encode(x)))
    # Stage 2 on the export trains exactly the model trained on the checkpoint (same latents, same statistics)
    td.main(["--preset", "smoke", "--vae", str(vexp), "--out", str(tmp_path / "sit")])
    mine, theirs = (load_checkpoint(str(p / "last.pt"), "sit") for p in (tmp_path / "sit", smoke_models / "sit"))
    assert all(torch.equal(mine["ema"][k], theirs["ema"][k]) for k in theirs["ema"])
    assert mine["autoencoder"]["content_hash"] == theirs["autoencoder"]["content_hash"]
    ev.main(["recon", "--vae", str(vexp), "--n", "8", "--out", str(tmp_path / "recon")])
    assert json.load(open(tmp_path / "recon" / "recon.json"))


class StubHub:
    """Stands in for huggingface_hub.HfApi: a repo is a folder under `root`; records the calls."""

    root, calls = None, []

    def create_repo(self, repo_id, repo_type="model", private=False, exist_ok=False):
        StubHub.calls.append(("create_repo", repo_id, repo_type, private))
        os.makedirs(os.path.join(StubHub.root, repo_id), exist_ok=exist_ok)

    def upload_folder(self, repo_id, folder_path, repo_type="model", commit_message=""):
        StubHub.calls.append(("upload_folder", repo_id, repo_type))
        shutil.copytree(folder_path, os.path.join(StubHub.root, repo_id), dirs_exist_ok=True)
        return "stub-commit"


def test_push_to_hub_uploads_the_export_and_offline_is_one_line(smoke_models, tmp_path, monkeypatch):
    import huggingface_hub
    StubHub.root, StubHub.calls = str(tmp_path / "hub"), []
    monkeypatch.setattr(huggingface_hub, "HfApi", StubHub)
    exp = tmp_path / "export"
    ev.main(["export", "--ckpt", str(smoke_models / "sit" / "last.pt"), "--out", str(exp),
             "--push-to-hub", "me/freqldm-smoke", "--private"])
    assert StubHub.calls == [("create_repo", "me/freqldm-smoke", "model", True),
                             ("upload_folder", "me/freqldm-smoke", "model")]
    pushed = tmp_path / "hub" / "me" / "freqldm-smoke"
    assert sorted(os.listdir(pushed)) == sorted(os.listdir(exp))
    assert all((pushed / f).read_bytes() == (exp / f).read_bytes() for f in os.listdir(exp))
    # the real client, offline: one line, exit status 2, and the export itself is complete
    proc = run(["evaluate.py", "export", "--ckpt", str(smoke_models / "vae" / "last.pt"), "--out",
                str(tmp_path / "v"), "--push-to-hub", "me/x"], env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "could not push", "me/x", "the export in")
    assert load_autoencoder(str(tmp_path / "v")).content_hash
