"""Datasets shared by the three stages: ImageNet-style folders and the built-in dead-leaves set.

    python data.py export --out data/deadleaves32 --n 2000 --resolution 32   # CPU: write an ImageFolder
    python data.py show --resolution 64                                      # CPU: PNG grid of the classes
    (library module otherwise: the training scripts pick a dataset with --data deadleaves | PATH)

Every dataset returns (image, label) with image float (3, H, W) in [-1, 1].

Training draws samples through `StepSampler`, which makes the data position a pure
function of (seed, step): step s of a run with global batch G reads positions
[s G, (s + 1) G) of an endless stream of per-epoch permutations, and rank r of W reads
its contiguous slice of each global batch. Resuming at step s therefore continues
exactly, and W ranks with batch G / W see the same samples as one process with G.
Horizontal flips are part of the sample key: key k < N is image k, key k >= N is
image k - N mirrored (`FlipView`), which is also how the latent cache stores both flips.
"""
import argparse
import colorsys
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from common import (DataError, atomic_write, barrier, derive_seed, log0, run_main, save_grid, to_device,
                    wait_for_files, write_json)

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


# ----------------------------------------------------------------------------- helpers

WIDE_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")     # 16-bit (and 32-bit int) greyscale


def pil_to_rgb(im):
    """Any PIL image -> 8-bit RGB PIL image, with the value range of its mode.

    16-bit greyscale (I;16, I;16B, ...; PIL also opens 16-bit PNGs as I) is 0..65535 and maps to
    round(v / 257); F (float) follows PIL's 0..255 scale; both are clipped to range. Palette, 1, L,
    CMYK, YCbCr, LAB and HSV use PIL's colour conversion. Alpha (RGBA, LA, PA, ...) is dropped, as in
    the ADM / torchvision ImageNet pipelines (no compositing onto a background).
    """
    mode = im.mode
    if mode in WIDE_INT_MODES or mode == "F":
        a = np.asarray(im).astype(np.float64)
        a = np.clip(np.round(a / 257.0) if mode != "F" else np.round(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(a[..., None], 3, axis=2), "RGB")
    if mode == "RGB":
        return im.copy()                               # loaded, independent of the open file
    if mode in ("PA", "La", "RGBa"):                   # no direct conversion to RGB in PIL
        im = im.convert("RGBA")
    return im.convert("RGB")


def load_rgb(path):
    """Read an image file as an 8-bit RGB PIL image (pil_to_rgb), or one DataError line naming the file."""
    try:
        with Image.open(path) as im:
            return pil_to_rgb(im)
    except Exception as e:  # PIL raises many types for broken files; name the path once
        detail = str(e).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
        raise DataError(f"cannot read image {path}: {type(e).__name__}" + (f": {detail}" if detail else "")) from None


def to_tensor(img):
    """PIL RGB image or uint8 HWC array -> float (3, H, W) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(x):
    """Float images (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) numpy, as written to PNG / npz."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def center_crop_arr(img, size):
    """ADM-style centre crop: halve with BOX while big, resize with BICUBIC, crop to size x size."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


# ----------------------------------------------------------------------------- ImageFolder

def list_images(root):
    """Image files below root (recursive), sorted, hidden names skipped."""
    return [p for p in sorted(Path(root).rglob("*"))
            if p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".") and p.is_file()]


class ImageFolder(torch.utils.data.Dataset):
    """ImageNet layout: ROOT/<class>/<image>; labels are the sorted class-folder names."""

    def __init__(self, root, resolution):
        self.root, self.resolution = Path(root), resolution
        if not self.root.is_dir():
            raise DataError(f"data folder {root} does not exist or is not a folder")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        per_class = [list_images(self.root / c) for c in self.classes]
        self.samples = [(p, i) for i, files in enumerate(per_class) for p in files]
        if not self.samples:
            raise DataError(f"no images found under {root} (expected {root}/<class>/<image>.png|jpg)")
        empty = [c for c, files in zip(self.classes, per_class) if not files]
        if empty:                                  # a class with no images would still get a label (and samples)
            raise DataError(f"class folder(s) {', '.join(str(self.root / c) for c in empty[:3])}"
                            f"{' ...' if len(empty) > 3 else ''} under {root} hold no images: remove them or add images")
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.samples)

    def label(self, i):
        """Class of sample i, without reading the image."""
        return self.samples[i][1]

    def __getitem__(self, i):
        path, label = self.samples[i]
        return to_tensor(center_crop_arr(load_rgb(path), self.resolution)), label


class _Readable(torch.utils.data.Dataset):
    """'' if image file i decodes (load_rgb, the reader training uses), else the one-line reason."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            load_rgb(self.paths[i])
            return ""
        except DataError as e:
            return str(e)


def check_readable(dataset, d, workers=0, batch=64):
    """Before a fresh run's first step: every image of an ImageFolder decodes, so an unreadable file stops the
    run before any step rather than at the step that meets it, when removing the file would change the data
    fingerprint and the run could never resume. Rank r decodes files r, r + W, ... with `workers` DataLoader
    processes (on ImageNet: 1.28M decodes of about 2.5 ms each, about a minute on 8 ranks x 8 workers); the
    ranks' findings are gathered, so every rank stops with the same line. A resumed run is not checked again:
    its fingerprint (every file's size and mtime) is the checked one's."""
    if not isinstance(dataset, ImageFolder):
        return
    t0 = time.time()
    paths = [p for p, _ in dataset.samples][d.rank::d.world_size]
    loader = torch.utils.data.DataLoader(_Readable(paths), batch_size=batch, num_workers=workers, collate_fn=list)
    bad = [reason for b in loader for reason in b if reason]
    if dist.is_initialized():
        found = [None] * d.world_size
        dist.all_gather_object(found, bad)
        bad = [reason for rank in found for reason in rank]
    if bad:
        raise DataError(f"{len(bad)} of the {len(dataset)} images under {dataset.root} cannot be read "
                        f"({'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}): remove or replace them and start "
                        f"again (no step has run, so nothing is lost)")
    log0(f"all {len(dataset)} images under {dataset.root} can be read (checked before step 0 in "
         f"{time.time() - t0:.0f} s)", d)


class ImageFiles(torch.utils.data.Dataset):
    """Every image file below ROOT (flat or nested, e.g. an ImageNet val export), sorted by path.

    Returns uint8 (S, S, 3) with the ADM centre crop at `resolution`: the layout of FID reference sets.
    Hidden files (names starting with '.', e.g. temporaries of an interrupted run) are skipped.
    """

    def __init__(self, root, resolution):
        self.root, self.resolution = Path(root), resolution
        if not self.root.is_dir():
            raise DataError(f"image folder {root} does not exist or is not a folder")
        self.files = list_images(self.root)
        if not self.files:
            raise DataError(f"no images found under {root}")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return center_crop_arr(load_rgb(self.files[i]), self.resolution)


# ----------------------------------------------------------------------------- dead leaves

class DeadLeaves(torch.utils.data.Dataset):
    """Dead-leaves images: random occluding shapes with power-law sizes (1/f^2-like spectra).

    Each class has its own hue band and shape (disks for even classes, squares for odd
    ones), so classes are distinct even at 32x32. Image i has label i % num_classes and is
    a deterministic function of (seed, i) at any resolution. Rendered images are cached
    in memory as uint8.
    """

    def __init__(self, n=10000, resolution=32, num_classes=10, seed=0, rmin=0.05, rmax=0.5, cache=True):
        self.n, self.resolution, self.num_classes, self.seed = n, resolution, num_classes, seed
        self.rmin, self.rmax = rmin, rmax                  # radii as fractions of the image side
        self._cache = {} if cache else None

    def __len__(self):
        return self.n

    def label(self, i):
        """Class of image i, without rendering it."""
        return i % self.num_classes

    def _radius(self, rng):
        """Sample r with density ~ r^-3 on [rmin, rmax] (inverse CDF): the scale-invariant law."""
        a, b = self.rmin ** -2, self.rmax ** -2
        return (a - rng.random() * (a - b)) ** -0.5

    def _colour(self, rng, label):
        hue = (label / self.num_classes + rng.normal(0, 0.025)) % 1.0
        sat, val = rng.uniform(0.45, 1.0), rng.uniform(0.25, 1.0)
        return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32)

    def render(self, i):
        """Image i as uint8 (H, W, 3), painted front to back until every pixel is covered."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        label = i % self.num_classes
        rng = np.random.default_rng([self.seed, i])
        S = self.resolution
        img = np.zeros((S, S, 3), dtype=np.float32)
        free = np.ones((S, S), dtype=bool)                 # not yet covered by a nearer leaf
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
        square = label % 2 == 1
        for _ in range(4000):
            r = self._radius(rng) * S
            cy, cx = rng.uniform(-r, S + r, size=2)
            y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, S)
            x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, S)
            if y0 >= y1 or x0 >= x1:
                continue
            dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
            inside = (np.maximum(abs(dy), abs(dx)) <= r * 0.886) if square else (dy * dy + dx * dx <= r * r)
            paint = inside & free[y0:y1, x0:x1]
            img[y0:y1, x0:x1][paint] = self._colour(rng, label)
            free[y0:y1, x0:x1] &= ~inside
            if not free.any():
                break
        if free.any():                                     # rare: fill what is left with one more colour
            img[free] = self._colour(rng, label)
        return (img * 255 + 0.5).astype(np.uint8)

    def __getitem__(self, i):
        if self._cache is not None and i in self._cache:
            arr = self._cache[i]
        else:
            arr = self.render(i)
            if self._cache is not None:
                self._cache[i] = arr
        return to_tensor(arr), self.label(i)


def export_imagefolder(dataset, out_dir):
    """Write a dataset as ROOT/<class>/<index>.png (ImageFolder layout). Returns the root."""
    out = Path(out_dir)
    for i in range(len(dataset)):
        x, y = dataset[i]
        with atomic_write(out / f"class_{y:03d}" / f"{i:07d}.png") as f:
            Image.fromarray(to_uint8(x[None])[0]).save(f, format="PNG")
    return out


def build_dataset(data, resolution, n=None, seed=0):
    """`--data deadleaves` (built-in, n images) or a path to an ImageNet-style folder."""
    if data == "deadleaves":
        return DeadLeaves(n=n or 10000, resolution=resolution, seed=seed)
    return ImageFolder(data, resolution)


def fingerprint(dataset):
    """A content key of a dataset: what it is, its resolution, and every image file's name, size and mtime.

    Replacing images (even with the same names and count) changes the key, so caches keyed by it go stale
    exactly when the data does. The dead-leaves set is a function of (n, seed, resolution). Taken once per
    dataset object (a stat of every file: minutes on ImageNet over a network file system).
    """
    if getattr(dataset, "_fingerprint", None) is not None:
        return dataset._fingerprint
    h = hashlib.sha256(f"{type(dataset).__name__}:{dataset.resolution}".encode())
    if isinstance(dataset, DeadLeaves):
        h.update(f":{dataset.n}:{dataset.seed}:{dataset.num_classes}".encode())
    else:
        for path, label in dataset.samples:
            st = os.stat(path)
            h.update(f"\n{path.relative_to(dataset.root)}:{label}:{st.st_size}:{st.st_mtime_ns}".encode())
    dataset._fingerprint = h.hexdigest()[:16]
    return dataset._fingerprint


def random_subset(n_total, n, seed):
    """A seeded random subset of n of range(n_total) (all of it when n is None or >= n_total), sorted.

    Used wherever a statistic is taken over part of a dataset: an ImageFolder is sorted by class,
    so the first n images would cover only the first few classes.
    """
    if n is None or n >= n_total:
        return list(range(n_total))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_total, generator=g)[:n].tolist())


def train_val_split(n_total, n_val, seed):
    """Held-out validation indices (a seeded random subset of n_val) and the training indices (the rest)."""
    if n_val <= 0:
        return list(range(n_total)), []
    if n_val >= n_total:
        raise DataError(f"--val-images {n_val} leaves no training images out of {n_total}")
    val = random_subset(n_total, n_val, seed + 99991)
    held = set(val)
    return [i for i in range(n_total) if i not in held], val


class _Images(torch.utils.data.Dataset):
    """Images (no labels) of `dataset` at `indices`, for DataLoader workers."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]][0]


def image_batches(dataset, indices, batch, workers=0):
    """Stream float image batches (b, 3, H, W) of dataset[indices] in order, decoded by `workers` processes."""
    return torch.utils.data.DataLoader(_Images(dataset, indices), batch_size=batch, shuffle=False,
                                       num_workers=workers, pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------- flips and sampling

class FlipView(torch.utils.data.Dataset):
    """Keys 0..2N-1 over a dataset of N: key k >= N is sample k - N mirrored left-right."""

    def __init__(self, base):
        self.base, self.n = base, len(base)

    def __len__(self):
        return 2 * self.n

    def __getitem__(self, k):
        x, y = self.base[k % self.n]
        return (x.flip(-1) if k >= self.n else x), y


class StepSampler(torch.utils.data.Sampler):
    """Batch sampler over FlipView keys whose position is a function of (seed, step).

    Yields, for each step from `start_step` on, `accum` micro-batches of this rank's share
    of the global batch (each a list of keys). Each epoch is a fresh permutation of the
    training indices (`indices`, default all N) seeded by (seed, epoch) with a random flip bit
    per sample; keys are those of FlipView over all N images (k >= N is image k - N mirrored).
    """

    def __init__(self, n, global_batch, rank=0, world_size=1, accum=1, seed=0, start_step=0, flip=True, indices=None):
        if global_batch % (world_size * accum):
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size} x accum {accum}")
        self.n, self.G, self.rank, self.W, self.accum = n, global_batch, rank, world_size, accum
        self.seed, self.start_step, self.flip = seed, start_step, flip
        self.pool = torch.arange(n) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
        if len(self.pool) == 0:
            raise DataError("no training images left (all held out for validation?)")
        self._epoch, self._perm = None, None

    def _keys_at(self, pos):
        """Keys at stream positions pos (LongTensor)."""
        out, m = torch.empty_like(pos), len(self.pool)
        for e in pos.div(m, rounding_mode="floor").unique().tolist():
            if e != self._epoch:
                g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", e))
                perm = torch.randperm(m, generator=g)
                flips = torch.randint(0, 2, (m,), generator=g) if self.flip else torch.zeros(m, dtype=torch.long)
                self._epoch, self._perm = e, self.pool[perm] + self.n * flips
            sel = pos.div(m, rounding_mode="floor") == e
            out[sel] = self._perm[pos[sel] % m]
        return out

    def step_keys(self, step):
        """This rank's keys for one step, as `accum` lists."""
        per_rank = self.G // self.W
        start = step * self.G + self.rank * per_rank
        keys = self._keys_at(torch.arange(start, start + per_rank))
        return [k.tolist() for k in keys.chunk(self.accum)]

    def __iter__(self):
        step = self.start_step
        while True:
            yield from self.step_keys(step)
            step += 1


def make_loader(dataset, sampler, num_workers=0):
    """DataLoader over FlipView(dataset) driven by a StepSampler."""
    return torch.utils.data.DataLoader(FlipView(dataset), batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)


# ----------------------------------------------------------------------------- latent cache

CACHE_SHARD_KEYS = 16384                 # latent-cache keys per shard file (the unit a stopped build resumes from)


def cache_latents(dataset, out_dir, key, hflip, shape, encode, d, workers=0, meta=None, labels=None, batch=64):
    """Encode every sample key of `dataset` once, into OUT/latents-KEY/ as float16 shards; returns its CachedRows
    (with `labels`, the class of each image (N,), for CachedRows.batch).

    Keys are those of FlipView (k >= N is image k - N mirrored) when `hflip`, else 0..N-1; encode(x) gives the
    latents (B, *shape) of images x (B, 3, H, W) on d.device. Shard j holds keys [j S, (j + 1) S) with
    S = CACHE_SHARD_KEYS in rows-LO-HI.npy (renamed into place when complete) and is encoded by rank j mod W;
    shards already there are kept, so a stopped build resumes from its finished shards (with any number of
    ranks). No rank waits in a collective, however long the others take: rank 0 waits for the shard files,
    writes index.json (with `meta`), and the others wait for it (then a barrier, which they all reach within a
    poll). A cache is complete exactly when its index exists; any number of ranks can read it.
    """
    view = FlipView(dataset)
    n_keys = len(view) if hflip else len(dataset)
    folder = os.path.join(out_dir, f"latents-{key}")
    index_path = os.path.join(folder, "index.json")
    if not os.path.isfile(index_path):
        bounds = list(range(0, n_keys, CACHE_SHARD_KEYS)) + [n_keys]
        names = [f"rows-{lo:09d}-{hi:09d}.npy" for lo, hi in zip(bounds[:-1], bounds[1:])]
        paths = [os.path.join(folder, n) for n in names]
        os.makedirs(folder, exist_ok=True)
        mine = range(d.rank, len(names), d.world_size)
        todo = [j for j in mine if not os.path.isfile(paths[j])]
        if len(todo) < len(mine):
            log0(f"latent cache: keeping {len(mine) - len(todo)} finished shard(s) of rank {d.rank}", d)
        what = "low-passed" if (meta or {}).get("low_passed") else "full"
        bar = tqdm(total=sum(bounds[j + 1] - bounds[j] for j in todo), unit="img", mininterval=2.0,
                   desc=f"latent cache ({what})", disable=not d.main)
        for j in todo:
            _encode_shard(view, bounds[j], bounds[j + 1], paths[j], shape, encode, d.device, workers, batch, bar)
        bar.close()
        if d.main:
            wait_for_files(paths, "the latent cache")
            write_json(index_path, {"key": key, "shards": names, "bounds": bounds, "shape": list(shape),
                                    **(meta or {})})
        else:
            wait_for_files([index_path], "the latent cache")
        barrier()                                  # all ranks are here within a poll: a short wait
        log0(f"latent cache written: {folder} ({n_keys} x {tuple(shape)})", d)
    return CachedRows(folder, labels)


def _encode_shard(view, lo, hi, path, shape, encode, device, workers, batch, bar):
    """Latents of keys [lo, hi) into the float16 file `path`, which appears only when complete."""
    tmp = path + ".part"
    try:                                               # a stopped or failed build leaves no partial shard
        arr = np.lib.format.open_memmap(tmp, "w+", np.float16, (hi - lo, *shape))   # (keys, C, h, w)
        row = 0
        for x in image_batches(view, range(lo, hi), batch, workers):
            arr[row:row + len(x)] = encode(x.to(device)).cpu().numpy().astype(np.float16)
            row += len(x)
            bar.update(len(x))
        arr.flush()
        del arr
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class CachedRows:
    """Rows of a sharded latent cache, memory-mapped: rows[keys] -> float32 numpy (len(keys), C, h, w);
    batch(keys, device) -> the latents and labels of those sample keys as tensors on `device`."""

    def __init__(self, folder, labels=None):
        with open(os.path.join(folder, "index.json")) as f:
            index = json.load(f)
        self.bounds = np.array(index["bounds"])
        self.shards = [np.load(os.path.join(folder, s), mmap_mode="r") for s in index["shards"]]
        self.labels = labels                           # (N,) class of image i; key k is image k mod N

    def __len__(self):
        return int(self.bounds[-1])

    def __getitem__(self, keys):
        keys = np.asarray(keys)
        which = np.searchsorted(self.bounds, keys, side="right") - 1             # shard of each key
        out = np.empty((len(keys), *self.shards[0].shape[1:]), dtype=np.float32)
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.shards[s][keys[sel] - self.bounds[s]]
        return out

    def batch(self, keys, device):
        """Latents (B, C, h, w) float32 and labels (B,) of sample keys (key k: image k mod N), on `device`."""
        z = to_device(torch.from_numpy(self[keys]), device)
        return z, to_device(self.labels[torch.as_tensor(keys) % len(self.labels)], device)


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write the dead-leaves set as an ImageFolder")
    e.add_argument("--out", required=True)
    e.add_argument("--n", type=int, default=2000)
    e.add_argument("--resolution", type=int, default=32)
    e.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("show", help="save a PNG grid with one row per class")
    s.add_argument("--out", default="deadleaves.png")
    s.add_argument("--resolution", type=int, default=64)
    s.add_argument("--per-class", type=int, default=8)
    a = p.parse_args(argv)
    if a.cmd == "export":
        root = export_imagefolder(DeadLeaves(n=a.n, resolution=a.resolution, seed=a.seed), a.out)
        print(f"wrote {a.n} images to {root}")
    else:
        ds = DeadLeaves(n=10 * a.per_class, resolution=a.resolution)
        idx = [c + 10 * j for c in range(10) for j in range(a.per_class)]
        grid = torch.stack([ds[i][0] for i in idx])
        save_grid(grid, a.out, nrow=a.per_class)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    run_main(main)
