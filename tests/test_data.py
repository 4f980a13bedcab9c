"""Datasets: dead-leaves statistics and classes, ImageFolder pipeline, step sampler."""
import numpy as np
import pytest
import torch
from PIL import Image

import fft_ops
from data import (DataError, DeadLeaves, FlipView, ImageFolder, StepSampler, build_dataset,
                  center_crop_arr, export_imagefolder, make_loader)


def test_deadleaves_deterministic_range_and_labels():
    a, b = DeadLeaves(n=30, resolution=32, seed=3), DeadLeaves(n=30, resolution=32, seed=3, cache=False)
    x, y = a[17]
    assert x.shape == (3, 32, 32) and y == 7
    assert torch.equal(x, b[17][0])
    assert x.min() >= -1 and x.max() <= 1
    assert not torch.equal(x, DeadLeaves(n=30, resolution=32, seed=4)[17][0])
    assert DeadLeaves(n=5, resolution=48)[0][0].shape == (3, 48, 48)
    assert [a.label(i) for i in range(30)] == [a[i][1] for i in range(30)]


@pytest.mark.parametrize("res", [32, 64])
def test_deadleaves_power_law_slope(res):
    ds = DeadLeaves(n=60, resolution=res)
    x = torch.stack([ds[i][0] for i in range(60)])
    r, p = fft_ops.radial_power_spectrum(x)
    m = (r > 2 / res) & (r < 0.4)
    slope = np.polyfit(np.log(r[m].numpy()), np.log(p[m].numpy()), 1)[0]
    print(f"dead-leaves {res}x{res}: log-log power slope {slope:.2f}")
    assert -2.6 < slope < -1.4


def test_deadleaves_classes_separable_by_nearest_centroid():
    """Nearest class centroid on 8x8 thumbnails, trained on 300 images, tested on 300 others."""
    ds = DeadLeaves(n=600, resolution=32)
    X = torch.stack([ds[i][0] for i in range(600)])
    f = torch.nn.functional.avg_pool2d(X, 4).flatten(1)          # (600, 3*8*8)
    y = torch.arange(600) % 10
    cent = torch.stack([f[:300][y[:300] == c].mean(0) for c in range(10)])
    pred = torch.cdist(f[300:], cent).argmin(1)
    acc = (pred == y[300:]).float().mean().item()
    print(f"nearest-centroid accuracy on dead-leaves classes: {acc:.3f} (chance 0.100)")
    assert acc > 0.8


def _write_folder(root, n_per_class=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_imagefolder_crop_labels_and_range(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    ds = ImageFolder(root, 16)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"] and ds.num_classes == 2
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and y == 1 and -1 <= x.min() and x.max() <= 1
    assert [ds.label(i) for i in range(6)] == [ds[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]


def test_center_crop_arr_reference():
    """A 40x30 (W x H) image -> short side 30 scaled to 16 -> 21x16 -> centre 16x16 columns 2..17."""
    arr = np.zeros((30, 40, 3), np.uint8)
    arr[:, :20] = 255
    out = center_crop_arr(Image.fromarray(arr), 16)
    ref = np.asarray(Image.fromarray(arr).resize((21, 16), Image.BICUBIC))[:, 2:18]
    assert out.shape == (16, 16, 3) and np.array_equal(out, ref)


def test_imagefolder_corrupt_file_reported_by_path(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    bad = root / "dog" / "zz_broken.png"
    bad.write_bytes(b"not a png at all")
    ds = ImageFolder(root, 16)
    idx = [i for i, (p, _) in enumerate(ds.samples) if p == bad][0]
    with pytest.raises(DataError, match="zz_broken.png"):
        ds[idx]


def test_imagefolder_empty_and_missing(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        ImageFolder(tmp_path / "empty", 16)
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(str(tmp_path / "nope"), 16)


def test_export_roundtrip(tmp_path):
    ds = DeadLeaves(n=12, resolution=16)
    export_imagefolder(ds, tmp_path / "dl")
    back = ImageFolder(tmp_path / "dl", 16)
    assert len(back) == 12 and back.num_classes == 10
    x, y = back[0]
    assert y == 0 and (x - ds[0][0]).abs().max() < 1.5 / 127.5


def test_flipview():
    ds = DeadLeaves(n=4, resolution=16)
    fv = FlipView(ds)
    assert len(fv) == 8
    assert torch.equal(fv[5][0], ds[1][0].flip(-1)) and fv[5][1] == ds[1][1]
    assert torch.equal(fv[1][0], ds[1][0])


def test_step_sampler_epoch_coverage_and_rank_split():
    n, G = 24, 8
    one = StepSampler(n, G, seed=5)
    two = [StepSampler(n, G, rank=r, world_size=2, accum=2, seed=5) for r in range(2)]
    keys = []
    for step in range(3):                                  # 3 steps x 8 = one epoch
        full = one.step_keys(step)[0]
        parts = [k for s in two for micro in s.step_keys(step) for k in micro]
        assert parts == full                               # ranks' slices tile the global batch
        keys += full
    assert sorted(k % n for k in keys) == list(range(n))   # each image once per epoch
    assert any(k >= n for k in keys) and any(k < n for k in keys)   # both flips occur
    assert StepSampler(n, G, seed=5).step_keys(4) == one.step_keys(4)   # pure function of step


def test_step_sampler_resume_and_loader():
    ds = DeadLeaves(n=10, resolution=16)
    s = StepSampler(10, 4, seed=0, start_step=0)
    it = iter(make_loader(ds, s))
    batches = [next(it) for _ in range(3)]
    it2 = iter(make_loader(ds, StepSampler(10, 4, seed=0, start_step=2)))
    x2, y2 = next(it2)
    assert torch.equal(x2, batches[2][0]) and torch.equal(y2, batches[2][1])
    with pytest.raises(ValueError, match="not divisible"):
        StepSampler(10, 6, world_size=4)


def test_datasets_work_with_distributed_sampler():
    ds = DeadLeaves(n=10, resolution=16)
    seen = []
    for r in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=0)
        for x, y in torch.utils.data.DataLoader(ds, batch_size=5, sampler=sampler):
            seen += y.tolist()
    assert sorted(seen) == sorted(ds[i][1] for i in range(10))
