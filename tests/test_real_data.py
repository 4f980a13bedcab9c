"""Real-data paths: class-sorted folders, statistics, checkpoint-carried settings, streaming evaluation,
reference folders, sample folders, flips, resolutions, the sharded latent cache and the card's command."""
import gc
import json
import os
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate as ev
import fft_ops
import train_diffusion as td
import train_vae
from common import load_checkpoint
from data import CachedRows, DeadLeaves, ImageFiles, ImageFolder, center_crop_arr, fingerprint, random_subset
from helpers import ROOT, assert_one_line_error, run
from vae import FrozenAutoencoder, LatentSpace, ViTVAEAutoencoder, dataset_latent_stats, load_autoencoder

CPU = type("D", (), dict(rank=0, world_size=1, main=True, device=torch.device("cpu")))()


def sorted_folder(root, classes=24, per_class=6, size=16, rng_seed=0):
    """An ImageNet-style folder: class k's images have a distinct mean colour, sizes and modes vary."""
    rng = np.random.default_rng(rng_seed)
    for k in range(classes):
        d = root / f"n{k:08d}"
        d.mkdir(parents=True)
        base = np.array([10 * k + 10, 5 * k + 60, 220 - 8 * k])           # class means drift with k
        for j in range(per_class):
            h, w = size + int(rng.integers(0, 9)), size + int(rng.integers(0, 9))
            arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"img_{j}.png")
    return root


class Pool(FrozenAutoencoder):
    """An autoencoder stand-in with a closed form: latent = 4x4 average pool of the image (3 channels)."""

    def __init__(self, fractions=fft_ops.MLSR_FRACTIONS):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.latent_dim, self.downsample, self.image_size, self.name = 3, 4, 16, "pool4"
        self.mlsr_fractions = tuple(fractions)

    def encode(self, x):
        return F.avg_pool2d(x.float(), 4)

    def decode(self, z):
        return F.interpolate(z, scale_factor=4, mode="nearest")


class Identity(Pool):
    """An 'encoder' that returns its input: shows what train_diffusion.encode_images hands the encoder."""

    def encode(self, x):
        return x


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sorted_folder(tmp_path_factory.mktemp("imagenet") / "train")


# ----------------------------------------------------------------------------- 1, 7: statistics and subsets

def test_latent_stats_span_every_class_of_a_sorted_folder(folder):
    ds = ImageFolder(folder, 16)
    everything = torch.stack([F.avg_pool2d(ds[i][0][None], 4)[0] for i in range(len(ds))])    # (144, 3, 4, 4)
    full_mean = everything.mean(dim=(0, 2, 3))
    stats = dataset_latent_stats(Pool(), ds, 48, 0, CPU, batch=10)
    first = everything[:48].mean(dim=(0, 2, 3))                 # what the first 48 images (8 classes) give
    err_random, err_first = (stats["mean"] - full_mean).abs().max(), (first - full_mean).abs().max()
    assert err_random < 0.5 * err_first, (err_random, err_first)
    idx = random_subset(len(ds), 48, 0)
    assert len({ds.label(i) for i in idx}) >= 20 and stats["n_images"] == 48 and stats["seed"] == 0
    sub = everything[idx]                                        # the subset's exact moments
    torch.testing.assert_close(stats["mean"], sub.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["std"], sub.transpose(0, 1).flatten(1).std(1, unbiased=False), atol=1e-5,
                               rtol=1e-5)
    assert random_subset(len(ds), 48, 1) != idx and random_subset(len(ds), None, 0) == list(range(len(ds)))


def test_recon_and_diagnose_draw_a_random_subset_and_default_to_all(folder):
    a = ev.get_args(["recon", "--vae", "x.pt", "--data", str(folder), "--n", "48"])
    batches, n = ev.eval_batches(a, Pool(), 16, "all", CPU)
    ds = ImageFolder(folder, 16)
    seen = torch.cat(list(batches))
    ref = torch.stack([ds[i][0] for i in random_subset(len(ds), 48, 0)])
    assert n == 48 and torch.equal(seen, ref)
    assert len({ds.label(i) for i in random_subset(len(ds), 48, 0)}) >= 20
    a = ev.get_args(["recon", "--vae", "x.pt", "--data", str(folder)])
    assert ev.eval_batches(a, Pool(), 16, "all", CPU)[1] == len(ds)          # the papers' protocol: all of --data
    assert ev.eval_batches(a, Pool(), 16, 40, CPU)[1] == 40


def test_rfid_below_2048_images_warns(folder, tmp_path, monkeypatch, capsys):
    from test_evaluate import StandIn
    monkeypatch.setattr(ev, "find_inception", lambda path=None: "stand-in")
    monkeypatch.setattr(ev, "InceptionExtractor", lambda path, device, **mode: StandIn())
    monkeypatch.setattr(ev, "load_autoencoder", lambda spec, device: Pool())
    ev.main(["recon", "--vae", "x", "--data", str(folder), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "WARNING: rFID from 144 images" in out and "on 144 random images" in out
    rows = json.load(open(tmp_path / "recon.json"))["rows"]
    assert all(r["n_images"] == 144 for r in rows)


# ----------------------------------------------------------------------------- 2: --stats-only

def test_stats_only_needs_nothing_but_the_checkpoint(folder, tmp_path):
    out = tmp_path / "vae"
    p = run(["train_vae.py", "--preset", "smoke", "--data", str(folder), "--out", str(out), "--latent-dim", "6",
             "--steps", "2", "--stats-images", "20"])
    assert p.returncode == 0, p.stderr[-2000:]
    ckpt = out / "last.pt"
    # perceptual weight 1 and size f16d32 by default: neither may matter; data comes from the checkpoint
    p = run(["train_vae.py", "--stats-only", "--resume", str(ckpt), "--stats-images", "48"])
    assert p.returncode == 0, p.stderr[-2000:]
    st = load_checkpoint(str(ckpt), "vae")["latent_stats"]
    ae = load_autoencoder(str(ckpt))
    ds = ImageFolder(folder, 16)
    ref = dataset_latent_stats(ae, ds, 48, 0, CPU, val_images=8)         # the run's 8 held-out images excluded
    torch.testing.assert_close(st["mean"], ref["mean"]) and torch.testing.assert_close(st["std"], ref["std"])
    assert st["n_images"] == min(48, len(ds) - 8) and not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # an explicit --data overrides the checkpoint's
    p = run(["train_vae.py", "--stats-only", "--resume", str(ckpt), "--data", "deadleaves", "--n-images", "30"])
    assert p.returncode == 0, p.stderr[-2000:]
    st = load_checkpoint(str(ckpt), "vae")["latent_stats"]
    assert st["n_images"] == 20 and st["data"] == fingerprint(DeadLeaves(n=30, resolution=16))   # 20: its config


# ----------------------------------------------------------------------------- 3: MLSR settings travel

def test_mlsr_fractions_come_from_the_vae_checkpoint(tmp_path, monkeypatch):
    fr = [0.0, 0.1, 0.3, 0.6]
    train_vae.main(["--preset", "smoke", "--out", str(tmp_path / "vae"), "--mlsr-fractions", *map(str, fr),
                    "--steps", "1"])
    vae = str(tmp_path / "vae" / "last.pt")
    assert load_autoencoder(vae).mlsr_fractions == tuple(fr)
    seen = []
    real = fft_ops.attenuate

    def spy(z, level, fractions=fft_ops.MLSR_FRACTIONS):
        seen.append(tuple(fractions))
        return real(z, level, fractions)
    monkeypatch.setattr(fft_ops, "attenuate", spy)
    td.main(["--preset", "smoke", "--vae", vae, "--out", str(tmp_path / "sit"), "--denoise-level", "1", "--fda",
             "--steps", "2", "--sample-every", "100"])
    assert seen and set(seen) == {tuple(fr)}
    seen.clear()
    ev.main(["diagnose", "--vae", vae, "--n", "4", "--out", str(tmp_path / "diag")])
    assert seen and set(seen) == {tuple(fr)}


# ----------------------------------------------------------------------------- 4: float32 under autocast

def test_targets_and_decodes_are_float32_inside_autocast():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ref = fft_ops.gaussian_blur(x, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blurred = fft_ops.gaussian_blur(x, 0.5)
    assert blurred.dtype == torch.float32
    torch.testing.assert_close(blurred, ref, atol=1e-6, rtol=1e-6)
    from vae import build_vae
    ae = ViTVAEAutoencoder(build_vae("smoke", 16))
    z = torch.randn(2, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dec, enc = ae.decode(z), ae.encode(x)
    assert dec.dtype == enc.dtype == torch.float32
    torch.testing.assert_close(dec, ae.decode(z), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(enc, ae.encode(x), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- 5: Inception under any name

def test_inception_file_under_any_name(tmp_path):
    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 5, 4)

        def forward(self, x):
            return F.adaptive_avg_pool2d(self.conv(x), 4).flatten(1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x, no_output_bias: bool = False):
            return torch.softmax(self.layers((x - 128) / 128)[:, :10], dim=1)

    torch.manual_seed(0)
    net = Net()
    path = tmp_path / "my-own-name.pt"
    torch.jit.script(net).save(str(path))
    ext = ev.InceptionExtractor(str(path), torch.device("cpu"), verify=False, mode="clean")   # a stand-in: not Inception
    imgs = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    feats, probs, _ = ext(imgs)
    from cleanfid.resize import build_resizer
    resized = torch.from_numpy(np.stack([build_resizer("clean")(im) for im in imgs])).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        np.testing.assert_allclose(feats, net.layers((resized - 128) / 128).double().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probs, net(resized).double().numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 6, 8: streaming

def test_recon_streams_its_batches():
    """Each batch must be garbage once two later batches have been read: nothing accumulates images."""
    refs, alive_when_read = [], []

    def batches():
        for i in range(6):
            gc.collect()
            alive_when_read.append(sum(r() is not None for r in refs))
            x = torch.rand(4, 3, 16, 16) * 2 - 1
            refs.append(weakref.ref(x))
            yield x
            del x
    rows = ev.recon_table(Pool(), batches())
    assert max(alive_when_read) <= 2, alive_when_read
    assert [r["n_images"] for r in rows] == [24] * 4


def test_feature_moments_equal_numpy_cov():
    f = np.random.default_rng(0).normal(size=(500, 7))
    m = ev.FeatureMoments()
    for i in range(0, 500, 64):
        m.add(f[i:i + 64])
    mu, sigma = m.stats()
    np.testing.assert_allclose(mu, f.mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), atol=1e-10)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_streams_in_chunks(tmp_path, save):
    arr = np.random.default_rng(0).integers(0, 256, (23, 8, 6, 3), dtype=np.uint8)
    save(tmp_path / "a.npz", arr_0=arr)
    chunks = list(ev.npz_batches(str(tmp_path / "a.npz"), batch=5))
    assert [len(c) for c in chunks] == [5, 5, 5, 5, 3] and np.array_equal(np.concatenate(chunks), arr)


def test_folder_to_npz_streams_and_ignores_temporaries(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    for i, im in enumerate(arr):
        Image.fromarray(im).save(tmp_path / f"{i:06d}.png")
    Image.fromarray(arr[0] // 2).save(tmp_path / ".000007.png")            # an interrupted run's temporary
    ev.folder_to_npz(str(tmp_path), 7, str(tmp_path / "s.npz"), chunk=3)
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], arr)
    assert len(ImageFiles(tmp_path, 8)) == 7                                 # hidden files are no images


def test_reference_folder_nested_any_size_gets_the_adm_crop(folder, tmp_path, monkeypatch):
    from test_evaluate import StandIn
    files = sorted(p for p in folder.rglob("*.png"))
    batches, n, side = ev.image_source(str(folder), "--ref", 12, batch=50)
    got = np.concatenate(list(batches))
    ref = np.stack([center_crop_arr(Image.open(p).convert("RGB"), 12) for p in files])
    assert n == len(files) == 144 and side == 12 and np.array_equal(got, ref)
    # --make-ref-stats streams the folder at the samples' side; its statistics equal the all-at-once ones
    samples = np.random.default_rng(1).integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=samples)
    monkeypatch.setattr(ev, "find_inception", lambda path=None: "stand-in")
    monkeypatch.setattr(ev, "InceptionExtractor", lambda path, device, **mode: StandIn())
    ev.main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(folder), "--make-ref-stats",
             str(tmp_path / "ref.npz")])
    st = np.load(tmp_path / "ref.npz")
    mu, sigma = ev.feature_stats(StandIn()(ref)[0])
    np.testing.assert_allclose(st["mu"], mu, atol=1e-9) and np.testing.assert_allclose(st["sigma"], sigma, atol=1e-9)


# ----------------------------------------------------------------------------- 9: sample folders

@pytest.fixture(scope="module")
def sit_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("sit")
    train_vae.main(["--preset", "smoke", "--out", str(root / "vae"), "--gan-weight", "0", "--steps", "2"])
    td.main(["--preset", "smoke", "--vae", str(root / "vae" / "last.pt"), "--out", str(root / "sit"), "--steps", "2",
             "--sample-every", "100"])
    return root


def test_sample_folder_refuses_other_settings_and_drops_temporaries(sit_ckpt, tmp_path):
    out = tmp_path / "s"
    base = ["evaluate.py", "sample", "--ckpt", str(sit_ckpt / "sit" / "last.pt"), "--num-samples", "4", "--batch", "4",
            "--sample-steps", "2", "--out", str(out)]
    assert run(base).returncode == 0
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(out / ".000009.png")
    os.remove(out / "000002.png")
    assert run(base).returncode == 0 and not (out / ".000009.png").exists() and (out / "000002.png").exists()
    for flag, value in (("--cfg-scale", "2.0"), ("--seed", "1"), ("--sampler", "euler"), ("--sample-steps", "3")):
        assert_one_line_error(run(base + [flag, value]), "other settings", flag.lstrip("-").replace("-", "_"))


# ----------------------------------------------------------------------------- 10, 11, 13: flips, sizes, clamp

def test_no_hflip_trains_and_caches_unflipped_images_only(sit_ckpt, tmp_path):
    assert td.get_args(["--preset", "dvae-f16d32"]).hflip is False and td.get_args([]).hflip is True
    td.main(["--preset", "smoke", "--vae", str(sit_ckpt / "vae" / "last.pt"), "--out", str(tmp_path),
             "--no-hflip", "--cache-latents", "--steps", "2", "--sample-every", "100"])
    (index,) = [json.load(open(p)) for p in tmp_path.glob("latents-*/index.json")]
    assert index["bounds"][-1] == 64                                           # N rows, not 2N
    from data import StepSampler
    keys = [k for s in range(20) for k in StepSampler(64, 8, flip=False).step_keys(s)[0]]
    assert max(keys) < 64 and min(keys) >= 0


def test_a_vae_cannot_serve_another_resolution(sit_ckpt, tmp_path):
    p = run(["train_diffusion.py", "--preset", "smoke", "--vae", str(sit_ckpt / "vae" / "last.pt"),
             "--out", str(tmp_path), "--image-size", "32"])
    assert_one_line_error(p, "16-px", "32-px")


def test_lowpass_overshoot_and_clamp(sit_ckpt):
    x = torch.stack([DeadLeaves(n=32, resolution=32)[i][0] for i in range(32)])
    low = fft_ops.lowpass(x, 0.2)
    assert (low.abs() > 1).float().mean() > 0.001                              # Gibbs ringing of the ideal filter
    for clamp in (False, True):
        args = td.get_args(["--preset", "smoke", "--freqwarm"] + (["--lowpass-clamp"] if clamp else []))
        got = td.encode_images(Identity(), x, 0.2, args)                       # what the encoder sees
        torch.testing.assert_close(got, low.clamp(-1, 1) if clamp else low)


# ----------------------------------------------------------------------------- 12: one HF definition, renorm

def test_one_latent_hf_definition_and_level_renormalisation():
    z = torch.randn(3, 4, 8, 8) + 5.0                                          # a large DC must not count
    zc = (z - z.mean(dim=(-2, -1), keepdim=True)).numpy()
    P = np.abs(np.fft.fft2(zc)) ** 2
    f = np.fft.fftfreq(8)
    high = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2) > 0.25
    np.testing.assert_allclose(fft_ops.latent_hf_ratio(z, 0.25).numpy(), (P * high).sum((1, 2, 3)) / P.sum((1, 2, 3)),
                               rtol=1e-5)
    rows = ev.recon_table(Pool(), [torch.rand(4, 3, 16, 16) * 2 - 1])
    assert rows[0][ev.HF_NAME] > rows[3][ev.HF_NAME]
    # per-level re-normalisation: S_l(z_n) / level_std has unit std per channel over the statistics' data
    ds = DeadLeaves(n=40, resolution=16)
    stats = dataset_latent_stats(Pool(), ds, 40, 0, CPU)
    x = torch.stack([ds[i][0] for i in range(40)])
    args = td.get_args(["--preset", "smoke", "--renorm-level", "--denoise-level", "1"])
    lat = LatentSpace(stats, Pool().mlsr_fractions, args.denoise_level, True)
    for level in (1, 2, 3):
        zl = lat.at_level(lat.normalize(Pool().encode(x)), level)
        assert zl.transpose(0, 1).flatten(1).std(1, unbiased=False).tolist() == pytest.approx([1.0] * 3, abs=1e-4)
        assert stats["level_std"][level].max() < 1.0                          # S_l removes variance
    lat.level = 2                                                              # a run at level 2
    zn = lat.normalize(Pool().encode(x))
    torch.testing.assert_close(lat.to_autoencoder(lat.at_level(zn, 2)),
                               lat.denormalize(fft_ops.attenuate(zn, 2)), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- 14, 15: cache shards, the card

def test_card_command_after_plain_train_vae(tmp_path):
    """`python train_vae.py` then `torchrun --nproc_per_node=2 train_diffusion.py --freqwarm --r0 0.2`, smoke-sized,
    in a fresh folder: Stage 2 finds Stage 1's output by default and writes its own; both ranks read the cache."""
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1")
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "train_diffusion.py"), "--preset", "smoke"],
                             cwd=tmp_path, capture_output=True, text=True, env=env)
    assert_one_line_error(missing, "runs/vae/last.pt", "python train_vae.py")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_vae.py"), "--preset", "smoke"], cwd=tmp_path,
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "train_diffusion.py"), "--freqwarm", "--r0", "0.2", "--preset", "smoke",
                        "--cache-latents", "--workers", "1"], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert load_checkpoint(str(tmp_path / "runs" / "vae" / "last.pt"), "vae")["kind"] == "vae"
    ck = load_checkpoint(str(tmp_path / "runs" / "sit" / "last.pt"), "sit")
    assert ck["freqwarm"]["enabled"] and ck["config"]["vae"] == "runs/vae/last.pt"
    caches = sorted((tmp_path / "runs" / "sit").glob("latents-*"))
    assert len(caches) == 2                                                    # full and low-passed
    ae = load_autoencoder(str(tmp_path / "runs" / "vae" / "last.pt"))
    ds = DeadLeaves(n=64, resolution=16)
    x = torch.stack([ds[i][0] for i in range(64)])
    for c in caches:
        index = json.load(open(c / "index.json"))
        assert index["shards"] == ["rows-000000000-000000128.npy"] and index["bounds"] == [0, 128]   # one shard
        rows = CachedRows(str(c))
        keys = [0, 5, 63, 64, 100, 127]
        src = torch.cat([x, x.flip(-1)])[keys]
        want = ae.encode(fft_ops.lowpass(src, 0.2) if index["low_passed"] else src)
        torch.testing.assert_close(torch.from_numpy(rows[keys]), want, atol=3e-3, rtol=3e-3)


def test_stage_defaults_chain():
    a, b = train_vae.get_args([]), td.get_args([])
    assert a.out != b.out and b.vae == os.path.join(a.out, "last.pt")
