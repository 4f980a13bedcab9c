"""What a run may reuse or continue, and only that: the latent cache holds exactly the latents of the settings
that ask for it (one case per setting that changes the cached tensors), as do the VAE's latent statistics and
the offline metric's caches; the settings that define what is trained may not change on resume (checked
against a list declared here from the method, independent of the parser's group) and are never pooled as
seeds by `compare` / `curve`; a sample folder is only added to with the same picture-making flags; a resumed
run keeps the kept EMA checkpoints up to its own step."""
import argparse
import hashlib
import math
import os
import shutil
import types

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as ev
import fft_ops
import train_diffusion as td
import train_vae
from common import UserError, fixed_on_resume, load_checkpoint, save_checkpoint
from data import DeadLeaves, build_dataset, to_uint8
from test_pretrained_ae import tiny
from vae import dataset_latent_stats, load_autoencoder, load_vae

CPU = types.SimpleNamespace(rank=0, world_size=1, main=True, device=torch.device("cpu"))


# ----------------------------------------------------------------------------- the latent cache

@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """A tiny diffusers AutoencoderKL (f8, any image side) saved to a folder, and a class-sorted ImageFolder."""
    root = tmp_path_factory.mktemp("cache-env")
    tiny("AutoencoderKL").eval().save_pretrained(root / "ae")
    rng = np.random.default_rng(0)
    for k in range(2):
        (root / "imgs" / f"n{k:08d}").mkdir(parents=True)
        for j in range(3):
            arr = rng.integers(0, 256, (20 + j, 18 + k, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / "imgs" / f"n{k:08d}" / f"{j}.png")
    return root


def replace_ae_weights(env):
    """The autoencoder retrained in place: same folder, same class and config, other weights."""
    model = diffusers.AutoencoderKL.from_pretrained(env / "ae")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(env / "ae")


def replace_an_image(env):
    """One image file of the folder replaced by another picture under the same name."""
    arr = np.random.default_rng(1).integers(0, 256, (24, 22, 3), dtype=np.uint8)
    Image.fromarray(arr).save(env / "imgs" / "n00000000" / "0.png")


# Each setting that changes the cached tensors: (id, flags of run A, flags of run B, change made between them).
# Run B caches into the folder run A cached into; it must get the latents of its own settings.
CACHE_SETTINGS = [
    ("r0", ["--r0", "0.2"], ["--r0", "0.3"], None),
    ("lowpass-kind-butterworth", [], ["--lowpass-kind", "butterworth"], None),
    ("lowpass-kind-gaussian", ["--lowpass-kind", "butterworth"], ["--lowpass-kind", "gaussian"], None),
    ("lowpass-clamp", [], ["--lowpass-clamp"], None),
    ("freqwarm-schedule", [], ["--freqwarm-schedule", "linear"], None),
    ("freqwarm-stages", ["--freqwarm-schedule", "cosine"], ["--freqwarm-schedule", "cosine", "--freqwarm-stages", "3"],
     None),
    ("image-size", ["--image-size", "16"], ["--image-size", "24"], None),
    ("hflip", ["--no-hflip"], ["--hflip"], None),
    ("n-images", ["--n-images", "6"], ["--n-images", "8"], None),
    ("seed", ["--seed", "0"], ["--seed", "1"], None),
    ("data", [], ["--data", "IMGS"], None),
    ("data-files", ["--data", "IMGS"], ["--data", "IMGS"], replace_an_image),
    ("autoencoder-weights", [], [], replace_ae_weights),
]
CACHE_FLAGS = {"r0", "lowpass_kind", "lowpass_clamp", "freqwarm_schedule", "freqwarm_stages", "image_size", "hflip",
               "n_images", "seed", "data"}


def cache_args(env, out, flags):
    base = ["--preset", "smoke", "--vae", f"diffusers:{env / 'ae'}", "--out", str(out), "--freqwarm",
            "--image-size", "16"] + ([] if "IMGS" in flags else ["--n-images", "6"])   # a folder has its own size
    return td.get_args(base + [str(env / "imgs") if f == "IMGS" else f for f in flags])


@torch.no_grad()
def reference_rows(env, args):
    """{radius: (keys, C, h, w)} written out here: key k < N is image k, k >= N image k - N mirrored (with
    --hflip); the diffusers model's posterior mean of the image (radius None), or of lowpass(image, r) (clamped
    with --lowpass-clamp) for each warm-up stage's radius r: r0, and with a schedule
    r0 + (0.7071 - r0) s(k / K), s(u) = u (linear) or (1 - cos(pi u)) / 2 (cosine)."""
    model = diffusers.AutoencoderKL.from_pretrained(env / "ae").eval()
    ds = build_dataset(args.data, args.image_size, n=args.n_images, seed=args.seed)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    x = torch.cat([x, x.flip(-1)]) if args.hflip else x
    K = 1 if args.freqwarm_schedule == "step" else args.freqwarm_stages
    s = (lambda u: u) if args.freqwarm_schedule == "linear" else (lambda u: (1 - math.cos(math.pi * u)) / 2)
    out = {None: model.encode(x).latent_dist.mean}
    for r in [args.r0 + (math.sqrt(0.5) - args.r0) * s(k / K) for k in range(K)]:
        low = fft_ops.lowpass(x, r, args.lowpass_kind)
        out[r] = model.encode(low.clamp(-1, 1) if args.lowpass_clamp else low).latent_dist.mean
    return out


@pytest.mark.parametrize("name,flags_a,flags_b,change", CACHE_SETTINGS, ids=[c[0] for c in CACHE_SETTINGS])
def test_a_cache_built_with_other_settings_is_never_reused(cache_env, tmp_path, name, flags_a, flags_b, change):
    """Run A caches its latents (full and low-passed) in OUT; run B, which differs in one setting that changes
    the cached tensors, caches into the same OUT: it gets the latents of its own settings (encoded here
    directly), under another key, and the setting is one a resumed run may not change."""
    env = tmp_path / "env"
    shutil.copytree(cache_env, env)
    out = tmp_path / "out"
    args_a = cache_args(env, out, flags_a)
    ae_a = load_autoencoder(args_a.vae, CPU.device)
    ds_a = build_dataset(args_a.data, args_a.image_size, n=args_a.n_images, seed=args_a.seed)
    td.build_cache(ae_a, ds_a, args_a, CPU)
    ref_a = reference_rows(env, args_a)
    if change is not None:
        change(env)
    args_b = cache_args(env, out, flags_b)
    ae_b = load_autoencoder(args_b.vae, CPU.device)
    ds_b = build_dataset(args_b.data, args_b.image_size, n=args_b.n_images, seed=args_b.seed)
    cache_b = td.build_cache(ae_b, ds_b, args_b, CPU)
    ref_b = reference_rows(env, args_b)
    assert sorted(cache_b, key=lambda r: -1 if r is None else r) == pytest.approx(
        sorted(ref_b, key=lambda r: -1 if r is None else r))                 # one copy per stage radius, and full
    keys_a = {td.cache_key(ae_a, ds_a, args_a, r) for r in ref_a}
    changed = []
    for r, ref in ref_b.items():
        got = torch.from_numpy(cache_b[r][np.arange(len(cache_b[r]))])
        assert got.shape == ref.shape, (r, got.shape, ref.shape)
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)             # float16 storage
        same = [a for a in ref_a.values() if a.shape == ref.shape and torch.allclose(a, ref, atol=2e-2, rtol=2e-2)]
        if not same:                                                            # no copy of run A holds these
            changed.append(r)
            assert td.cache_key(ae_b, ds_b, args_b, r) not in keys_a, r
    assert changed, f"{name}: the setting changes no cached tensor here, so this case tests nothing"
    if name == "r0" or name.startswith("lowpass") or name.startswith("freqwarm"):
        assert None not in changed                      # the full-frequency cache stays shared
    assert {f[2:].replace("-", "_") for f in flags_b if f.startswith("--")} - {"no_hflip"} <= set(td.FIXED_ON_RESUME)


def test_every_setting_the_cache_key_reads_has_a_case_and_is_fixed_on_resume(cache_env, tmp_path):
    """Every flag whose change changes a cache key (found by changing each flag of a FreqWarm run in turn) has a
    case above, and every case's flag is fixed on resume: a new setting in the key needs a test here."""
    args = cache_args(cache_env, tmp_path, [])
    ae = load_autoencoder(args.vae, CPU.device)
    ds = build_dataset(args.data, args.image_size, n=args.n_images, seed=args.seed)
    keys = lambda a: [td.cache_key(ae, ds, a, r) for r in [None] + td.stage_radii(a)]   # every copy a run caches
    read = set()
    for base in (args, types.SimpleNamespace(**{**vars(args), "freqwarm_schedule": "linear"})):
        for k, v in vars(base).items():
            other = (not v if isinstance(v, bool) else v + 1 if isinstance(v, int) else v * 1.5 if isinstance(v, float)
                     else ("cosine" if k == "freqwarm_schedule" else f"{v}-other") if isinstance(v, str)
                     else 1 if v is None else v)
            changed = types.SimpleNamespace(**{**vars(base), k: other})
            if keys(changed) != keys(base):
                read.add(k)
    assert {"r0", "lowpass_kind", "lowpass_clamp", "hflip", "freqwarm_schedule", "freqwarm_stages"} <= read
    covered = {f[2:].replace("-", "_") for _, a, b, _ in CACHE_SETTINGS for f in a + b if f.startswith("--")}
    assert read <= covered and read <= CACHE_FLAGS
    assert CACHE_FLAGS <= covered and CACHE_FLAGS <= set(td.FIXED_ON_RESUME)


def test_a_run_at_r0_0_3_after_one_at_r0_0_2_trains_on_its_own_cached_latents(smoke_models, tmp_path, monkeypatch):
    """Two FreqWarm runs with --cache-latents in one folder (the second with --resume none --overwrite): the
    second, at r0 = 0.3, builds and trains on latents of lowpass(x, 0.3), not the 0.2 ones the first left."""
    vae_ckpt, out = str(smoke_models / "vae" / "last.pt"), tmp_path / "sit"
    common = ["--preset", "smoke", "--vae", vae_ckpt, "--out", str(out), "--freqwarm", "--cache-latents",
              "--steps", "1", "--sample-every", "100", "--val-every", "0"]
    td.main(common + ["--r0", "0.2"])
    used, real = {}, td.cache_latents

    def spy(dataset, out_dir, key, hflip, shape, encode, d, workers=0, meta=None, labels=None, batch=64):
        used[meta["low_passed"]] = real(dataset, out_dir, key, hflip, shape, encode, d, workers, meta, labels, batch)
        return used[meta["low_passed"]]
    monkeypatch.setattr(td, "cache_latents", spy)
    td.main(common + ["--r0", "0.3", "--resume", "none", "--overwrite"])
    assert len([f for f in os.listdir(out) if f.startswith("latents-")]) == 3       # full, r0 0.2, r0 0.3
    vae, _ = load_vae(vae_ckpt)
    ds = build_dataset("deadleaves", 16, n=64)
    x = torch.stack([ds[i][0] for i in range(8)])
    with torch.no_grad():
        want = vae.encode(fft_ops.lowpass(x, 0.3)).mean
        old = vae.encode(fft_ops.lowpass(x, 0.2)).mean
    got = torch.from_numpy(used[True][np.arange(8)])
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    assert not torch.allclose(want, old, atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------- settings fixed on resume

# The settings that define what a run trains, declared from the method (not read from the parser's group):
# the data and its held-out split, the latents (everything the latent cache depends on, and how they are
# normalised and attenuated), the model and the objective (FDA, FreqWarm, label dropout, the batch).
SIT_DEFINING = {
    "data", "n_images", "hflip", "val_images", "seed", "global_batch",                        # data, split, order
    "image_size", "latent_norm", "latent_scale", "denoise_level", "renorm_level",            # the latents
    "freqwarm", "r0", "r0_auto_images", "lowpass_kind", "lowpass_clamp",                      # FreqWarm's filter
    "model", "class_dropout", "fda", "fda_weight", "fda_depth", "fda_schedule"}               # model, objective
VAE_DEFINING = {
    "data", "n_images", "hflip", "val_images", "seed", "global_batch",
    "arch", "dcae_config", "size", "latent_dim", "image_size",                                  # the autoencoder
    "mlsr_fractions", "mlsr_sigmas", "pixel_weight", "perceptual_weight", "kl_weight",         # Eq. 1-4
    "gan_weight", "gan_start", "gan_real", "disc_channels", "disc_layers"}                      # the GAN


@pytest.mark.parametrize("trainer,defining", [(td, SIT_DEFINING), (train_vae, VAE_DEFINING)],
                         ids=["sit", "vae"])
def test_every_setting_that_defines_the_training_is_in_the_fixed_group(trainer, defining):
    """A flag moved out of the fixed group (e.g. a FreqWarm filter setting) could change between a run and its
    continuation unnoticed: each declared setting must be in it, so Run.resume refuses its change (which
    tests/test_structure.py checks flag by flag for the whole group)."""
    fixed = set(fixed_on_resume(trainer.parser()))
    assert defining - fixed == set()
    assert set(trainer.FIXED_ON_RESUME) == fixed
    flags = {a.dest for a in trainer.parser()._actions}
    assert defining <= flags                           # a renamed flag must be renamed here too


@pytest.mark.parametrize("trainer,defining", [(td, SIT_DEFINING), (train_vae, VAE_DEFINING)],
                         ids=["sit", "vae"])
def test_compare_and_curve_average_over_seeds_only(trainer, defining):
    """`compare` and `curve` pool runs that differ only in --seed and bookkeeping: runs that differ in any
    setting that defines the training stand in groups of their own."""
    config = vars(trainer.get_args(["--preset", "smoke"]))
    assert ev.IGNORED_IN_GROUPS & defining == {"seed"}
    for k in sorted(defining - {"seed"}):
        runs = [{"config": config}, {"config": {**config, k: f"{config[k]}-other"}},
                {"config": {**config, "seed": config["seed"] + 1}}]
        groups = ev.group_runs(runs)
        assert sorted(len(g) for g in groups.values()) == [1, 2], k
        assert any(k in label for label in groups), k


def test_a_freqwarm_filter_change_on_resume_is_refused_end_to_end(smoke_models, tmp_path):
    """Resuming a FreqWarm run with another --lowpass-kind, --lowpass-clamp or --r0 stops with one line."""
    vae_ckpt, out = str(smoke_models / "vae" / "last.pt"), tmp_path / "sit"
    common = ["--preset", "smoke", "--vae", vae_ckpt, "--out", str(out), "--freqwarm", "--steps", "1",
              "--sample-every", "100", "--val-every", "0"]
    td.main(common)
    for flag in (["--lowpass-kind", "gaussian"], ["--lowpass-clamp"], ["--r0", "0.3"]):
        with pytest.raises(UserError, match=f"{flag[0]} .*may not change on resume"):
            td.main(common + ["--steps", "2"] + flag)                      # the last --steps wins


# ----------------------------------------------------------------------------- sample folders

# `evaluate.py sample` flags that change the pictures (each must be refused in a folder drawn otherwise) and
# those that do not (a rerun with them only adds what is missing). Every flag of `sample` is in one list.
CHANGES_PICTURES = {"--cfg-scale": ["2.0"], "--cfg-interval": ["0.2", "0.9", "--cfg-scale", "2.0"],
                    "--sampler": ["euler"],
                    "--sample-steps": ["3"], "--seed": ["1"], "--labels": ["random"], "--no-bf16": [],
                    "--ckpt": None}                                     # last: replaced in place
KEEPS_PICTURES = {"--num-samples", "--batch", "--out", "--vae", "--dist-timeout", "-h",
                  "--device"}                           # the precision it gives is in the manifest


def test_every_sample_flag_is_declared(monkeypatch):
    """A new flag of `sample` must be put in one of the two lists above (and so, if it changes the pictures,
    be tested to be refused below)."""
    seen, real = [], argparse.ArgumentParser.parse_args

    def spy(self, *a, **k):
        seen.append(self)
        return real(self, *a, **k)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    ev.get_args(["sample", "--ckpt", "x"])
    sub = next(a for a in seen[0]._actions if isinstance(a, argparse._SubParsersAction)).choices["sample"]
    flags = {a.option_strings[0] for a in sub._actions}
    assert flags == set(CHANGES_PICTURES) | KEEPS_PICTURES
    assert not set(CHANGES_PICTURES) & KEEPS_PICTURES


def test_a_sample_folder_refuses_every_flag_that_changes_the_pictures(smoke_models, tmp_path):
    """One flag at a time, against a folder drawn with the defaults: refused with a line naming the setting,
    before anything is drawn; so is the checkpoint retrained in place (same path, same step, other EMA)."""
    ckpt, out = str(tmp_path / "sit.pt"), tmp_path / "s"
    shutil.copy(smoke_models / "sit" / "last.pt", ckpt)
    base = ["sample", "--ckpt", ckpt, "--num-samples", "2", "--batch", "2", "--sample-steps", "2", "--out", str(out)]
    ev.main(base)
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out)}
    for flag, value in CHANGES_PICTURES.items():
        if flag == "--ckpt":
            ck = load_checkpoint(ckpt, "sit")
            ck["ema"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ck["ema"].items()}
            save_checkpoint(ckpt, ck)
        key = "checkpoint" if flag == "--ckpt" else flag[2:].replace("-", "_")
        with pytest.raises(UserError, match=f"holds samples drawn with other settings \\(.*{key}: "):
            ev.main(base + ([] if flag == "--ckpt" else [flag, *value]))      # the last of a repeated flag wins
        assert {f: os.path.getmtime(out / f) for f in os.listdir(out)} == before, flag


# ----------------------------------------------------------------------------- kept checkpoints on resume

def test_prune_kept_removes_exactly_the_steps_past_the_start(tmp_path):
    """Resuming at step S keeps ema_S (this run's own trajectory up to S) and every earlier one, removes the
    later ones; a fresh start (S = 0) removes all; other files in keep/ are left alone."""
    keep = tmp_path / td.KEEP_DIR
    keep.mkdir()

    def fill():
        for s in (2, 4, 6, 8):
            (keep / os.path.basename(td.kept_path(str(tmp_path), s))).write_bytes(b"x")
        (keep / "notes.txt").write_text("not a kept checkpoint")

    def left():
        return sorted(os.listdir(keep))
    fill()
    td.prune_kept(str(tmp_path), 4, CPU)
    assert left() == ["ema_0000002.pt", "ema_0000004.pt", "notes.txt"]
    fill()
    td.prune_kept(str(tmp_path), 5, CPU)
    assert left() == ["ema_0000002.pt", "ema_0000004.pt", "notes.txt"]
    fill()
    td.prune_kept(str(tmp_path), 8, CPU)
    assert left() == ["ema_0000002.pt", "ema_0000004.pt", "ema_0000006.pt", "ema_0000008.pt", "notes.txt"]
    td.prune_kept(str(tmp_path), 0, CPU)
    assert left() == ["notes.txt"]
    td.prune_kept(str(tmp_path / "none"), 3, CPU)                   # no keep/ folder: nothing to do


def test_a_run_resumed_at_a_kept_step_keeps_that_step(smoke_models, tmp_path):
    """--keep-every 2 with a checkpoint at step 4, resumed to step 6: ema_0000004.pt is the file the first run
    wrote (the resumed run starts after step 4 and never writes it again), and step 6 is added."""
    vae_ckpt, out = str(smoke_models / "vae" / "last.pt"), tmp_path / "sit"
    common = ["--preset", "smoke", "--vae", vae_ckpt, "--out", str(out), "--keep-every", "2", "--ckpt-every", "2",
              "--sample-every", "100", "--val-every", "0"]
    td.main(common + ["--steps", "4"])
    kept4 = out / "keep" / "ema_0000004.pt"
    digest = hashlib.sha256(kept4.read_bytes()).hexdigest()
    td.main(common + ["--steps", "6"])
    assert sorted(os.listdir(out / "keep")) == ["ema_0000002.pt", "ema_0000004.pt", "ema_0000006.pt"]
    assert hashlib.sha256(kept4.read_bytes()).hexdigest() == digest
    assert load_checkpoint(str(kept4), "sit")["step"] == 4


# ----------------------------------------------------------------------------- latent statistics reused from the VAE

@pytest.mark.parametrize("flag,value", [(None, None), ("--seed", "1"), ("--n-images", "48"), ("--val-images", "4")])
def test_the_vaes_latent_statistics_are_used_only_for_its_own_data_and_split(smoke_models, tmp_path, flag, value):
    """Stage 2 takes the statistics stored in the VAE checkpoint only when they were taken on the same data
    (--data, --n-images, --seed), size and held-out split (--val-images); with any of these changed it
    measures its own, equal to dataset_latent_stats on its training images."""
    vae_ckpt = str(smoke_models / "vae" / "last.pt")
    extra = [flag, value] if flag else []
    args = td.get_args(["--preset", "smoke", "--vae", vae_ckpt, "--out", str(tmp_path)] + extra)
    ae, ds, _, _, _ = td.build(args, CPU)
    stats = td.training_stats(ae, ds, args, CPU)
    own = load_checkpoint(vae_ckpt, "vae")["latent_stats"]
    if flag is None:
        assert stats["source"].startswith(ae.name) and torch.equal(stats["mean"], own["mean"])
        return
    ref = dataset_latent_stats(ae, build_dataset(args.data, args.image_size, n=args.n_images, seed=args.seed),
                               args.stats_images, args.seed, CPU, val_images=args.val_images)
    assert stats["source"].startswith("computed over")
    for k in ("mean", "std", "level_std"):
        torch.testing.assert_close(stats[k], ref[k])
    assert not torch.allclose(stats["mean"], own["mean"], atol=1e-4)


# ----------------------------------------------------------------------------- the offline metric's caches

def test_the_dead_leaves_network_and_reference_caches_hold_only_their_own_settings(tmp_path):
    """The offline metric caches its network (per resolution, training images, steps) and the reference
    moments (per network weights, side, reference size, seed): each changed setting finds its own file, whose
    content equals what is computed afresh without a cache."""
    cache = str(tmp_path / "cache")
    base = dict(resolution=16, n_train=16, steps=1)
    nets = {}
    for change in ({}, {"n_train": 20}, {"steps": 2}, {"resolution": 12}):
        kw = {**base, **change}
        ext = ev.DeadLeavesExtractor(cache_dir=cache, **kw)
        fresh = ev.train_deadleaves_net(kw["resolution"], kw["n_train"], kw["steps"])
        for k, v in fresh.state_dict().items():
            assert torch.equal(ext.net.state_dict()[k], v), (change, k)
        nets[tuple(sorted(change.items()))] = ext
    assert len(os.listdir(cache)) == 4
    ext = nets[()]
    settings = [dict(side=16, n_ref=6, seed=0), dict(side=16, n_ref=8, seed=0), dict(side=16, n_ref=6, seed=1),
                dict(side=12, n_ref=6, seed=0)]
    for extractor in (ext, nets[(("steps", 2),)]):                      # other network weights
        for s in settings:
            got = ev.deadleaves_reference(extractor, **s)
            ref = DeadLeaves(n=s["n_ref"], resolution=s["side"], seed=s["seed"])
            direct = ev.extract(extractor, [to_uint8(torch.stack([ref[i][0] for i in range(len(ref))]))], keep=False)[0]
            assert got.n == direct.n and np.allclose(got.s, direct.s) and np.allclose(got.ss, direct.ss), s
    assert len([f for f in os.listdir(cache) if f.startswith("deadleaves-ref")]) == 2 * len(settings)

