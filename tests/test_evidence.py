"""Instruments of evidence: validation metrics of both stages, the offline dead-leaves metric, `compare`."""
import json
import os

import numpy as np
import pytest
import torch

import evaluate as ev
import fft_ops
import train_diffusion as td
import train_vae
from common import derive_seed, file_hash, load_checkpoint
from data import DeadLeaves, StepSampler, to_uint8, train_val_split
from dit import build_sit
from helpers import read_metrics
from vae import load_autoencoder, load_vae


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    train_vae.main(["--preset", "smoke", "--out", str(out), "--gan-weight", "0"])
    return out


def test_stage2_validation_is_held_out_and_equal_across_freqwarm_at_step_0(vae_ckpt, tmp_path, monkeypatch):
    seen_keys = []
    real = StepSampler.step_keys

    def spy(self, step):
        keys = real(self, step)
        seen_keys.extend(k for part in keys for k in part)
        return keys
    monkeypatch.setattr(StepSampler, "step_keys", spy)
    runs = {}
    for name, extra in (("base", []), ("fw", ["--freqwarm", "--r0", "0.1"])):
        td.main(["--preset", "smoke", "--vae", str(vae_ckpt / "last.pt"), "--out", str(tmp_path / name),
                 "--cache-latents", "--steps", "4", "--val-every", "2", *extra])
        runs[name] = read_metrics(tmp_path / name / "metrics.jsonl", "val")
    assert [r["step"] for r in runs["base"]] == [0, 2, 4]
    assert runs["base"][0] == runs["fw"][0]                                    # same EMA, same latents, same noise
    assert runs["base"][-1]["val_loss"] != runs["fw"][-1]["val_loss"]           # the low-passed warm-up trained
    assert sorted(k for k in runs["base"][0] if k.startswith("val_loss_t")) == [f"val_loss_t{t:.4f}" for t in td.VAL_TS]
    assert runs["base"][0]["val_loss"] == pytest.approx(np.mean([runs["base"][0][f"val_loss_t{t:.4f}"]
                                                                 for t in td.VAL_TS]))
    _, val_idx = train_val_split(64, 8, 0)
    assert len(val_idx) == 8 and not {k % 64 for k in seen_keys} & set(val_idx) and seen_keys
    # the number is the EMA's loss recomputed here, on the held-out images at full frequency
    ck = load_checkpoint(str(tmp_path / "fw" / "last.pt"), "sit")
    ema = build_sit("smoke/1", 4, 4, 10)
    ema.load_state_dict(ck["ema"])
    ae = load_autoencoder(str(vae_ckpt / "last.pt"))
    st = ck["latent_stats"]
    ds = DeadLeaves(n=64, resolution=16)
    z = (ae.encode(torch.stack([ds[i][0] for i in val_idx])) - st["mean"].view(1, -1, 1, 1)) / st["std"].view(1, -1, 1, 1)
    y = torch.tensor([ds.label(i) for i in val_idx])
    t, i = td.VAL_TS[5], 5
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(derive_seed(0, "val", i)))
    with torch.no_grad():
        v = ema((1 - t) * z + t * eps, torch.full((8,), t), y)
    assert runs["fw"][-1][f"val_loss_t{t:.4f}"] == pytest.approx(((v - (eps - z)) ** 2).mean().item(), rel=1e-5)


def test_stage1_validation_is_the_ema_on_held_out_images(vae_ckpt):
    val = read_metrics(vae_ckpt / "metrics.jsonl", "val")
    assert [r["step"] for r in val] == [3, 6]
    vae, _ = load_vae(str(vae_ckpt / "last.pt"))                               # EMA weights
    _, val_idx = train_val_split(64, 8, 0)
    ds = DeadLeaves(n=64, resolution=16)
    x = torch.stack([ds[i][0] for i in val_idx])
    with torch.no_grad():
        r = vae.decode(fft_ops.attenuate(vae.encode(x).mean, 2)).clamp(-1, 1)
    mse = (r - x).pow(2).mean(dim=(1, 2, 3))
    assert val[-1]["val_psnr_l2"] == pytest.approx((10 * torch.log10(4 / mse)).mean().item(), rel=1e-5)
    hf = [val[-1][f"val_latent_hf_l{l}"] for l in range(4)]
    assert hf[3] < hf[2] < hf[1] < hf[0]


def test_offline_deadleaves_metric(tmp_path):
    ext = ev.DeadLeavesExtractor(16, cache_dir=str(tmp_path), n_train=300, steps=100)
    assert os.listdir(tmp_path) == ["deadleaves-net2-r16-n300-s100.pt"]
    again = ev.DeadLeavesExtractor(16, cache_dir=str(tmp_path), n_train=300, steps=100)   # cached: same network
    assert all(torch.equal(a, b) for a, b in zip(ext.net.state_dict().values(), again.net.state_dict().values()))
    ds = DeadLeaves(n=200, resolution=16, seed=777)                              # images it never saw
    imgs = to_uint8(torch.stack([ds[i][0] for i in range(200)]))
    acc = (ext(imgs)[1].argmax(1) == np.arange(200) % 10).mean()
    print(f"DL-net accuracy on 200 unseen dead-leaves images: {acc:.3f} (chance 0.1)")
    assert acc > 0.8
    ref = to_uint8(torch.stack([DeadLeaves(n=200, resolution=16, seed=0)[i][0] for i in range(200)]))
    same = ev.deadleaves_metrics(ext, ref, n_ref=200)
    assert same["fd_dl"] == pytest.approx(0.0, abs=1e-6) and same["class_acc_dl"] > 0.8
    assert set(same) == {"network", "n_fake", "n_real", "fd_dl", "class_acc_dl"} and "not Inception" in same["network"]
    other = ev.deadleaves_metrics(ext, imgs, n_ref=200)                          # same distribution, other images
    x = torch.stack([ds[i][0] for i in range(200)])
    blur = [ev.deadleaves_metrics(ext, to_uint8(fft_ops.gaussian_blur(x, s)), n_ref=200)["fd_dl"] for s in (2, 3)]
    print(f"fd_dl of 200 unseen images vs the reference: {other['fd_dl']:.3f}; blurred sigma 2, 3 px: {blur}")
    assert blur[1] > blur[0] > 1.5 * other["fd_dl"] > 0
    shuffled = ev.deadleaves_metrics(ext, np.roll(imgs, 3, axis=0), n_ref=200)   # every image under another class
    assert shuffled["class_acc_dl"] < 0.3 < other["class_acc_dl"]


def test_compare_reads_what_the_runs_logged(vae_ckpt, tmp_path):
    dirs = []
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        td.main(["--preset", "smoke", "--vae", str(vae_ckpt / "last.pt"), "--out", str(out), "--steps", "2",
                 "--val-every", "1", "--seed", str(seed), "--sample-every", "100"])
        checkpoint = {"path": str(out / "last.pt"), "step": 2, "content_hash": file_hash(out / "last.pt")}
        with open(out / "generation_metrics.json", "w") as f:
            json.dump({"DL-net": {"network": "DL-net", "fd_dl": 10.0 + seed, "class_acc_dl": 0.5,
                                  "checkpoint": checkpoint}}, f)
        dirs.append(str(out))
    ev.main(["compare", *dirs, "--out", str(tmp_path / "cmp")])
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert table[0] == "| runs | seeds | step | val_loss | fd_dl | class_acc_dl | sample labels |"
    finals = [read_metrics(tmp_path / f"run{s}" / "metrics.jsonl", "val")[-1]["val_loss"] for s in (0, 1)]
    mean, std = np.mean(finals), np.std(finals, ddof=1)
    assert table[2] == (f"| all runs | 0,1 | 2 | {mean:.4f} ± {std:.4f} | {10.5:.4f} ± {np.std([10, 11], ddof=1):.4f} "
                        f"| 0.5000 ± 0.0000 | unknown |")                # recorded without a label protocol
