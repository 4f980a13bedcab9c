"""The two FID protocols (adm, clean), ADM reference batches, reference statistics, sFID, IS and LPIPS.

No Inception or VGG weights offline: a stand-in TorchScript with the interface of clean-fid's
inception-2015-12-05.pt (resize inside its forward, `layers` with a `mixed_6.conv` block, an `output` class
layer) is built here; its numbers are never called FID. VGG16 gets random weights for LPIPS.
"""
import functools
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate as ev
from common import UserError
from test_faults import assert_cli_error


class ConvReLU(torch.nn.Module):
    def __init__(self, cin, cout, k=1, stride=1):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2 if stride == 1 else 0)

    def forward(self, x):
        return F.relu(self.conv(x))


class Mixed6(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.tower = ConvReLU(c, 12), ConvReLU(c, 4, 3)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x)], 1)


class StandInInception(torch.nn.Module):
    """The calling convention of inception-2015-12-05.pt with a tiny random trunk: 16-d pool features,
    10 classes, a (12, grid, grid) mixed_6.conv map. Its forward resizes as the real one does."""

    def __init__(self, grid=17):
        super().__init__()
        self.layers = torch.nn.Sequential(OrderedDict(
            conv=ConvReLU(3, 6, 5, 4), pool0=torch.nn.AdaptiveAvgPool2d(grid), mixed=ConvReLU(6, 8),
            mixed_6=Mixed6(8), pool2=torch.nn.AdaptiveAvgPool2d(1)))
        self.output = torch.nn.Linear(16, 10)

    def forward(self, img, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
        B, C, H, W = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / W - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / H - theta[1, 1] / 299
        grid = F.affine_grid(theta.unsqueeze(0).repeat(B, 1, 1), [B, C, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        features = self.layers((x - 128) / 128).reshape(-1, 16)
        if return_features:
            return features
        logits = F.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return torch.softmax(logits, 1)


def stand_in(tmp_path, grid=17):
    torch.manual_seed(0)
    net = StandInInception(grid).eval()
    path = tmp_path / f"stand-in-{grid}.pt"
    torch.jit.script(net).save(str(path))
    return net, str(path)


def tf_bilinear(img, size=299):
    """TensorFlow 1 ResizeBilinear, align_corners=False, in numpy: output i reads input i * H / size."""
    H, W = img.shape[:2]
    out = img.astype(np.float64)

    def axis(n):
        src = np.arange(size) * n / size
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n - 1), src - i0
    y0, y1, wy = axis(H)
    x0, x1, wx = axis(W)
    rows = out[y0] * (1 - wy)[:, None, None] + out[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


class Spy:
    """Records what goes into a module (its call and its `forward`), delegating everything else."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __call__(self, x, **kw):
        self.calls.append(("call", x.clone(), kw))
        return self.module(x, **kw)

    def forward(self, x):
        self.calls.append(("forward", x.clone(), {}))
        return self.module.forward(x)

    def __getattr__(self, name):
        return getattr(self.module, name)


def test_tf_resize_is_tensorflows_bilinear_rule():
    img = np.random.default_rng(0).integers(0, 256, (23, 37, 3)).astype(np.float32)
    got = ev.tf_resize(torch.from_numpy(img).permute(2, 0, 1)[None])[0].permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(got, tf_bilinear(img), atol=2e-3)


def test_adm_mode_feeds_uint8_at_native_size_and_reads_adm_sfid(tmp_path):
    net, path = stand_in(tmp_path)
    ext = ev.InceptionExtractor(path, torch.device("cpu"), verify=False, mode="adm")
    assert ext.sfid_missing is None and ext.dims == (16, 2023) and "adm protocol" in ext.name
    ext.base = Spy(ext.base)
    ext.base.layers = Spy(ext.base.module.layers)
    imgs = np.random.default_rng(1).integers(0, 256, (3, 20, 28, 3), dtype=np.uint8)
    feats, probs, spatial = ext(imgs)
    (kind, x, kw), = ext.base.calls                         # one call of the network itself ...
    assert kind == "call" and kw == {"return_features": True}
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 3, 20, 28)       # ... on the uint8 images as they are
    assert torch.equal(x, torch.from_numpy(imgs).permute(0, 3, 1, 2))
    assert not [c for c in ext.base.layers.calls if c[0] == "forward"]      # nothing resized outside for FID
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        np.testing.assert_allclose(feats, net(x, return_features=True).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probs, net(x, no_output_bias=True).numpy(), rtol=1e-5, atol=1e-6)
        # sFID: ADM's mixed_6/conv map of the TensorFlow-resized image, first 7 channels, flattened as NHWC
        resized = torch.from_numpy(np.stack([tf_bilinear(im) for im in imgs])).permute(0, 3, 1, 2).float()
        h = (resized - 128) / 128
        for name in ("conv", "pool0", "mixed"):
            h = getattr(net.layers, name)(h)
        m = net.layers.mixed_6.conv(h)[:, :7]                                # (3, 7, 17, 17)
    assert spatial.shape == (3, 17 * 17 * 7) == (3, 2023)
    np.testing.assert_allclose(spatial, m.permute(0, 2, 3, 1).reshape(3, -1).numpy(), rtol=1e-3, atol=1e-4)


def test_clean_mode_resizes_outside_with_pil_bicubic(tmp_path):
    from cleanfid.resize import build_resizer
    net, path = stand_in(tmp_path)
    ext = ev.InceptionExtractor(path, torch.device("cpu"), verify=False, mode="clean")
    ext.base = Spy(ext.base)
    ext.base.layers = Spy(ext.base.module.layers)
    imgs = np.random.default_rng(2).integers(0, 256, (2, 20, 28, 3), dtype=np.uint8)
    feats, _, spatial = ext(imgs)
    assert not [c for c in ext.base.calls if c[1].shape[-2:] != (299, 299)]
    (kind, x, _), = [c for c in ext.base.layers.calls if c[0] == "forward"]
    resized = torch.from_numpy(np.stack([build_resizer("clean")(im) for im in imgs])).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(x, (resized - 128) / 128)
    with torch.no_grad():
        np.testing.assert_allclose(feats, net.layers((resized - 128) / 128).reshape(2, -1).numpy(), rtol=1e-5,
                                   atol=1e-6)
    assert spatial.shape == (2, 2023)


def test_a_network_whose_blocks_do_not_chain_has_no_sfid(tmp_path):
    class Skip(torch.nn.Module):                               # forward skips a block its children list
        def __init__(self):
            super().__init__()
            self.conv, self.pool0, self.mixed = ConvReLU(3, 8, 5, 4), torch.nn.AdaptiveAvgPool2d(17), ConvReLU(8, 8)
            self.mixed_6, self.pool2 = Mixed6(8), torch.nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool2(self.mixed_6(self.pool0(self.conv(x))))

    net = StandInInception()
    net.layers = Skip()
    torch.jit.script(net.eval()).save(str(tmp_path / "skip.pt"))
    ext = ev.InceptionExtractor(str(tmp_path / "skip.pt"), torch.device("cpu"), verify=False, mode="adm")
    assert ext.sfid_missing == "its blocks run in order do not give its forward" and ext.dims == (16, None)


def adm_batch(path, n=12, side=16, dims=(16, 63), seed=3):
    rng = np.random.default_rng(seed)
    arrays = {"arr_0": rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)}
    for key, d in zip(("", "_s"), dims):
        A = rng.standard_normal((d, d))
        arrays["mu" + key], arrays["sigma" + key] = rng.standard_normal(d), A @ A.T / d + np.eye(d)
    np.savez(path, **arrays)
    return arrays


def test_adm_batch_in_clean_mode_and_other_resolutions_are_refused(tmp_path, capsys):
    adm_batch(tmp_path / "VIRTUAL_imagenet16.npz")
    np.savez(tmp_path / "s16.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "s24.npz", arr_0=np.zeros((4, 24, 24, 3), np.uint8))
    fid = ["fid", "--ref", str(tmp_path / "VIRTUAL_imagenet16.npz"), "--inception-path", str(tmp_path / "absent.pt")]
    assert_cli_error(capsys, ev.main, fid + ["--samples", str(tmp_path / "s16.npz"), "--fid-mode", "clean"],
                     "is an ADM reference batch", "--fid-mode adm", "--make-ref-stats")
    assert_cli_error(capsys, ev.main, fid + ["--samples", str(tmp_path / "s24.npz")], "at 16 px, the samples at 24 px")
    assert_cli_error(capsys, ev.main, fid + ["--samples", str(tmp_path / "s16.npz")], "Inception weights")  # adm: next
    np.savez(tmp_path / "old.npz", mu=np.zeros(4), sigma=np.eye(4))              # statistics that record nothing
    assert_cli_error(capsys, ev.main, ["fid", "--samples", str(tmp_path / "s16.npz"), "--ref",
                                       str(tmp_path / "old.npz")], "records no protocol / resolution")


@pytest.fixture
def stand_in_inception(tmp_path, monkeypatch):
    """`fid` / `recon` run on the stand-in (3 x 3 mixed_6 map: a 63-d sFID, fast) in the mode asked for."""
    _, path = stand_in(tmp_path, grid=3)
    monkeypatch.setattr(ev, "inception", lambda a, d: ev.InceptionExtractor(path, d.device, verify=False,
                                                                              mode=a.fid_mode))
    return path


def image_folder(root, n=10, seed=4):
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"n{i % 3:08d}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = 16 + int(rng.integers(0, 7)), 16 + int(rng.integers(0, 7))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_make_ref_stats_records_how_it_was_made_and_is_checked(tmp_path, capsys, stand_in_inception):
    folder = image_folder(tmp_path / "val")
    stats = str(tmp_path / "ref16.npz")
    assert_cli_error(capsys, ev.main, ["fid", "--ref", str(folder), "--make-ref-stats", stats], "--resolution")
    ev.main(["fid", "--ref", str(folder), "--make-ref-stats", stats, "--resolution", "16"])
    z = np.load(stats)
    assert (str(z["fid_mode"]), int(z["resolution"]), int(z["n_images"])) == ("adm", 16, 10)
    assert str(z["source"]) == str(folder) and str(z["network_hash"]) == ev.file_hash(stand_in_inception)
    assert z["mu"].shape == (16,) and z["mu_s"].shape == (3 * 3 * 7,)
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "s16.npz", arr_0=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "s24.npz", arr_0=rng.integers(0, 256, (8, 24, 24, 3), dtype=np.uint8))
    fid = ["fid", "--ref", stats, "--samples"]
    assert_cli_error(capsys, ev.main, fid + [str(tmp_path / "s24.npz")], "at 16 px, the samples at 24 px")
    assert_cli_error(capsys, ev.main, fid + [str(tmp_path / "s16.npz"), "--fid-mode", "clean"],
                     "holds adm-mode statistics", "clean mode")
    # the same samples against the statistics and against the folder give the same FID and sFID
    capsys.readouterr()
    ev.main(fid + [str(tmp_path / "s16.npz")])
    by_stats = json_out(capsys)
    ev.main(["fid", "--ref", str(folder), "--samples", str(tmp_path / "s16.npz")])
    by_images = json_out(capsys)
    assert by_stats["fid"] == pytest.approx(by_images["fid"], rel=1e-6)
    assert by_stats["sfid"] == pytest.approx(by_images["sfid"], rel=1e-6)
    for res in (by_stats, by_images):
        assert res["fid_mode"] == "adm" and res["n_fake"] == 8 and res["resolution"] == 16
        assert res["network_hash"] == ev.file_hash(stand_in_inception) and "not FID" in res["network"]
    assert by_stats["reference"] == stats and by_stats["reference_n_images"] == 10 and "precision" not in by_stats
    assert by_images["n_real"] == 10 and "precision" in by_images
    other = dict(np.load(stats), network_hash=np.array("0123456789abcdef"))      # made with another network file
    np.savez(tmp_path / "other.npz", **other)
    assert_cli_error(capsys, ev.main, ["fid", "--ref", str(tmp_path / "other.npz"), "--samples",
                                       str(tmp_path / "s16.npz")], "made with network file 0123456789abcdef")


def json_out(capsys):
    import json
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_adm_batch_statistics_in_adm_mode_and_pr_on_its_images(tmp_path, capsys, monkeypatch, stand_in_inception):
    batch = adm_batch(tmp_path / "VIRTUAL.npz")
    samples = np.random.default_rng(6).integers(0, 200, (9, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=samples)
    reads, streams = [], []
    real_read, real_stream = ev.read_npz_array, ev.npz_batches
    monkeypatch.setattr(ev, "read_npz_array", lambda path, key, flag: reads.append(key) or real_read(path, key, flag))
    monkeypatch.setattr(ev, "npz_batches", lambda path, batch=500: streams.append(path) or real_stream(path, batch))
    capsys.readouterr()
    ev.main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "VIRTUAL.npz")])
    res = json_out(capsys)
    assert sorted(reads) == ["mu", "mu_s", "sigma", "sigma_s"]                 # each statistic read once
    assert streams.count(str(tmp_path / "VIRTUAL.npz")) == 1                  # its images streamed once
    ext = ev.InceptionExtractor(stand_in_inception, torch.device("cpu"), verify=False, mode="adm")
    f, _, s = ext(samples)
    rf = ext(batch["arr_0"])[0]
    assert res["fid"] == pytest.approx(ev.frechet_distance(*ev.feature_stats(f), batch["mu"], batch["sigma"]), rel=1e-6)
    assert res["sfid"] == pytest.approx(ev.frechet_distance(*ev.feature_stats(s), batch["mu_s"], batch["sigma_s"]),
                                        rel=1e-6)
    assert (res["precision"], res["recall"]) == pytest.approx(ev.precision_recall(rf, f, k=3, adm=True))
    assert res["reference_kind"] == "adm-batch" and res["n_real"] == 12 and res["fid_mode"] == "adm"
    # clean mode: the batch's statistics are refused, but clean statistics of its images can be made (stated)
    ev.main(["fid", "--ref", str(tmp_path / "VIRTUAL.npz"), "--make-ref-stats", str(tmp_path / "clean.npz"),
             "--fid-mode", "clean"])
    z = np.load(tmp_path / "clean.npz")
    assert (str(z["fid_mode"]), int(z["resolution"]), int(z["n_images"])) == ("clean", 16, 12)
    clean = ev.InceptionExtractor(stand_in_inception, torch.device("cpu"), verify=False, mode="clean")
    np.testing.assert_allclose(z["mu"], clean(batch["arr_0"])[0].mean(0), rtol=1e-6, atol=1e-9)


def test_inception_score_in_adm_chunks_streamed():
    rng = np.random.default_rng(7)
    p = rng.dirichlet(np.full(10, 0.3), size=23)

    def adm(part):                                         # ADM's evaluator, one chunk
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        return np.exp(kl.sum(1).mean())
    chunks = [adm(p[i:i + 5]) for i in range(0, 23, 5)]   # 5, 5, 5, 5, 3
    assert ev.inception_score(p, split_size=5) == pytest.approx((np.mean(chunks), np.std(chunks)), rel=1e-6)
    s = ev.StreamedIS(split_size=5)
    for i in range(0, 23, 4):
        s.add(p[i:i + 4])
    assert s.result() == pytest.approx((np.mean(chunks), np.std(chunks)), rel=1e-6)


@pytest.fixture(scope="module")
def lpips_vgg(tmp_path_factory):
    """A random VGG16 trunk saved as torchvision's weights file, and LPIPS loaded on it by evaluate.py."""
    from torchvision.models.vgg import cfgs, make_layers
    torch.manual_seed(0)
    features = make_layers(cfgs["D"]).eval()                      # torchvision's vgg16().features
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return features, ev.load_lpips(str(path), torch.device("cpu")), str(path)


def test_lpips_is_the_lpips_vgg_formula_on_the_local_vgg(lpips_vgg):
    import os
    import lpips
    features, net, _ = lpips_vgg
    rng = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=rng) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 32, 32, generator=rng)).clamp(-1, 1)
    # independent: torchvision's VGG16 features at relu1_2 ... relu5_3, unit-normalised over channels, squared
    # differences weighted by the package's learned v0.1 heads, spatial mean, summed (Zhang et al. 2018, Eq. 1)
    heads = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth"), map_location="cpu",
                       weights_only=True)
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
    hx, hy, ref, tap = (x - shift) / scale, (y - shift) / scale, torch.zeros(2), 0
    with torch.no_grad():
        for i, layer in enumerate(features):
            hx, hy = layer(hx), layer(hy)
            if i in (3, 8, 15, 22, 29):
                nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                w = heads[f"lin{tap}.model.1.weight"].view(1, -1, 1, 1)
                ref += ((nx - ny) ** 2 * w).sum(1).mean(dim=(1, 2))
                tap += 1
        got = net(x, y).flatten()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert net(x, x).abs().max() < 1e-6 and (got > 0).all()


def test_lpips_without_vgg_weights_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="LPIPS needs VGG16 weights: download .*or pass --vgg-path PATH"):
        ev.find_vgg()
    with pytest.raises(UserError, match="--vgg-path .* does not exist"):
        ev.find_vgg(str(tmp_path / "nope.pth"))


def test_recon_reports_rsfid_is_and_lpips_per_level(stand_in_inception, lpips_vgg):
    from data import to_uint8
    from test_evaluate import IdentityAE
    ext = ev.InceptionExtractor(stand_in_inception, torch.device("cpu"), verify=False, mode="adm")
    net = lpips_vgg[1]
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    rows = ev.recon_table(IdentityAE(), [x[:4], x[4:]], extractor=ext, lpips=net)
    assert rows[0]["rfid"] == pytest.approx(0, abs=1e-6) and rows[0]["rsfid"] == pytest.approx(0, abs=1e-6)
    assert rows[0]["lpips"] == pytest.approx(0, abs=1e-6) and rows[3]["lpips"] > 1e-3 and rows[3]["rsfid"] > 0
    import fft_ops
    r3 = fft_ops.attenuate(x, 3, IdentityAE.mlsr_fractions).clamp(-1, 1)
    assert rows[3]["is"] == pytest.approx(ev.inception_score(ext(to_uint8(r3))[1], split_size=5000)[0], rel=1e-5)
    assert rows[3]["lpips"] == pytest.approx(net(r3, x).mean().item(), rel=1e-5)
    assert rows[3]["network_hash"] == ev.file_hash(stand_in_inception) and "adm protocol" in rows[3]["rfid_network"]


def test_recon_command_line_records_mode_network_and_lpips_file(tmp_path, monkeypatch, stand_in_inception, lpips_vgg):
    import json
    from test_real_data import Pool
    monkeypatch.setattr(ev, "load_autoencoder", lambda spec, device: Pool())
    ev.main(["recon", "--vae", "pool", "--n-images", "12", "--n", "6", "--fid-mode", "clean", "--vgg-path",
             lpips_vgg[2], "--out", str(tmp_path)])
    rec = json.load(open(tmp_path / "recon.json"))
    assert rec["fid_mode"] == "clean" and rec["network_hash"] == ev.file_hash(stand_in_inception)
    assert ev.file_hash(lpips_vgg[2]) in rec["image_metrics"] and rec["rsfid"] == ev.RSFID_DEFINITION
    assert all({"lpips", "rfid", "rsfid", "is"} <= set(r) and r["n_images"] == 6 for r in rec["rows"])


def is_per_split(p, size):
    """The one-shot reference: ADM's Inception Score computed directly on all probabilities (N, K), split after
    split of `size` consecutive rows (the last one shorter); (mean, std) over the splits."""
    scores = []
    for i in range(0, len(p), size):
        part = p[i:i + size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def drifting(n, k=10, seed=7):
    """Probabilities whose class mix moves along the sample order: every split has its own marginal p(y), so
    splits merged, cut elsewhere or dropped change the score."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, k))
    logits[np.arange(n), np.arange(n) * k // n] += 3.0
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("n,sizes", [
    (23, [23]),                     # one batch holding four whole splits and the short last one
    (23, [12, 11]),                 # each batch straddles two split boundaries
    (23, [3, 9, 1, 10]),            # boundaries inside batches, batches inside splits
    (20, [5, 5, 5, 5]),             # batches end exactly on the boundaries; no short split
    (20, [20]),                     # an exact multiple in one batch: no empty last split
    (23, [1] * 23),                 # one row at a time
    (7, [7])])                      # fewer rows than one split: one short split
def test_streamed_inception_score_equals_the_one_shot_score_at_every_batch_split(n, sizes):
    """StreamedIS over batches of any sizes (larger than a split, straddling split boundaries, ending on them)
    gives what ADM's formula gives on all probabilities at once, split by split (split size 5 standing in
    for ADM's 5000)."""
    p = drifting(n)
    assert sum(sizes) == n
    s, start = ev.StreamedIS(split_size=5), 0
    for b in sizes:
        s.add(p[start:start + b])
        start += b
    ref = is_per_split(p, 5)
    assert s.result() == pytest.approx(ref, rel=1e-9)
    assert ev.inception_score(p, split_size=5) == pytest.approx(ref, rel=1e-9)
    if n > 5:                                       # the splits matter: one split over everything differs
        assert abs(is_per_split(p, n)[0] - ref[0]) > 1e-3 * ref[0]


def test_recon_scores_the_inception_score_in_adms_5000_image_splits():
    """`recon`'s IS of the reconstructions streams in ADM's splits of 5000 images: 5600 images in batches of
    700 (batch 8 straddles image 5000) score as the one-shot reference over all their probabilities, split at
    5000; a score in one split, or in splits of another size, would differ."""
    import fft_ops
    from data import to_uint8
    from test_evaluate import IdentityAE
    assert ev.IS_SPLIT == 5000 and ev.StreamedIS().size == ev.IS_SPLIT
    n, side = 5600, 12
    g = torch.Generator().manual_seed(0)
    level = torch.linspace(-0.9, 0.9, n).view(n, 1, 1, 1)                  # brightness drifts along the order
    x = (level + 0.05 * torch.randn(n, 3, side, side, generator=g)).clamp(-1, 1)

    class Brightness:
        """A stand-in network (not Inception): 4-d features, and p(y|x) over 10 classes from the mean pixel."""
        name, mode, dims, sfid_missing = "stand-in (not Inception)", "adm", (4, None), "a stand-in"

        def __call__(self, imgs):
            m = np.asarray(imgs, dtype=np.float64).mean(axis=(1, 2)) / 255            # (B, 3)
            logits = -((m[:, :1] - np.linspace(0, 1, 10)[None]) ** 2) * 50
            p = np.exp(logits - logits.max(1, keepdims=True))
            return np.concatenate([m, m[:, :1] ** 2], 1), p / p.sum(1, keepdims=True)

    rows = ev.recon_table(IdentityAE(), [x[i:i + 700] for i in range(0, n, 700)], extractor=Brightness())
    for level, row in enumerate(rows):
        r = x if level == 0 else fft_ops.attenuate(x, level, IdentityAE.mlsr_fractions).clamp(-1, 1)
        p = Brightness()(to_uint8(r))[1]
        ref = is_per_split(p, 5000)
        assert (row["is"], row["is_std"]) == pytest.approx(ref, rel=1e-6), level
        assert abs(is_per_split(p, n)[0] - ref[0]) > 1e-3 * ref[0] and ref[1] > 1e-3


def test_precision_recall_balls_streamed_in_query_batches_equal_brute_force(monkeypatch):
    """k-NN radii and ball coverage are computed in query batches (1024 rows; ADM: 10 000 x 10 000 blocks):
    batches of 7 over 60 and 50 points (boundaries inside both sets) give the brute-force radii and coverage of
    all points at once, and ADM's float16 radii the same as in one block."""
    rng = np.random.default_rng(2)
    real, fake = rng.standard_normal((60, 4)), rng.standard_normal((50, 4)) * 1.5 + 0.7
    adm_whole = ev.knn_radii(real, 3, adm=True)
    monkeypatch.setattr(ev, "distance_blocks", functools.partial(ev.distance_blocks, batch=7))
    monkeypatch.setattr(ev, "ADM_PR_BLOCK", 7)
    torch.testing.assert_close(ev.knn_radii(real, 3, adm=True), adm_whole)
    d = np.linalg.norm(real[:, None] - real[None], axis=2)                       # (60, 60), 0 on the diagonal
    radii = np.sort(d, axis=1)[:, 3]                                             # k = 3 (index 0: the point)
    np.testing.assert_allclose(ev.knn_radii(real, 3).numpy(), radii, rtol=1e-12)
    inside = (np.linalg.norm(fake[:, None] - real[None], axis=2) <= radii[None]).any(1)
    cov = ev.coverage_fraction(fake, real, torch.from_numpy(radii))
    assert cov == pytest.approx(inside.mean(), abs=1e-12) and 0 < cov < 1
    assert ev.precision_recall(real, fake, 3)[0] == pytest.approx(inside.mean(), abs=1e-12)
