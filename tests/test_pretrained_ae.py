"""Pretrained diffusers autoencoders (AutoencoderKL, AutoencoderDC, AutoencoderKLWan, AutoencoderKLLTXVideo) through
--vae diffusers:FOLDER: tiny random ones built from a config and saved with save_pretrained, compared with calling
the diffusers models directly; FreqWarm latents and cache, training, sampling, diagnosis and the error lines."""
import json
import math
import os
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers

import evaluate as ev
import fft_ops
import train_diffusion as td
from common import UserError, load_checkpoint, run_main
from data import FlipView, ImageFolder
from helpers import Stage2Latents, assert_one_line_error, read_metrics, run, spy_sampling
from vae import DiffusersAutoencoder, dataset_latent_stats, load_autoencoder, locate_autoencoder, scalar_stats

CPU = types.SimpleNamespace(rank=0, world_size=1, main=True, device=torch.device("cpu"))
KINDS = ("AutoencoderKL", "AutoencoderDC", "AutoencoderKLWan", "AutoencoderKLLTXVideo")
SIZE = 32                                    # test image side; every tiny autoencoder below is f8


def tiny(kind):
    """A randomly initialised f8 autoencoder of `kind`, small enough for CPU tests, in the real architecture."""
    torch.manual_seed(0)
    if kind == "AutoencoderKL":
        return diffusers.AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                                       up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4)
    if kind == "AutoencoderDC":
        return diffusers.AutoencoderDC(
            latent_channels=8, attention_head_dim=4,
            encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8, 16, 16), decoder_block_out_channels=(8, 8, 16, 16),
            encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
            encoder_qkv_multiscales=((), (), (5,), (5,)), decoder_qkv_multiscales=((), (), (5,), (5,)))
    if kind == "AutoencoderKLWan":                     # Wan2.2 layout: residual blocks and 2x2 patches
        return diffusers.AutoencoderKLWan(base_dim=8, z_dim=6, dim_mult=[1, 2, 2], num_res_blocks=1,
                                          temperal_downsample=[False, False], is_residual=True, patch_size=2,
                                          in_channels=12, out_channels=12, scale_factor_spatial=8,
                                          latents_mean=[0.0] * 6, latents_std=[1.0] * 6)
    return diffusers.AutoencoderKLLTXVideo(           # LTX 0.9.1+ layout: timestep-conditioned decoder, injected noise
        latent_channels=8, block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        down_block_types=("LTXVideoDownBlock3D",) * 3, layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1), spatio_temporal_scaling=(True, True, False),
        decoder_spatio_temporal_scaling=(True, True, False), decoder_inject_noise=(True, False, False, False),
        downsample_type=("conv", "conv", "conv"), upsample_residual=(False, False, False), upsample_factor=(1, 1, 1),
        patch_size=2, timestep_conditioning=True)


@torch.no_grad()
def direct_encode(kind, model, x):
    """The deterministic latent, by calling the diffusers model itself."""
    if kind == "AutoencoderDC":
        return model.encode(x).latent
    if kind == "AutoencoderKL":
        return model.encode(x).latent_dist.mean
    return model.encode(x.unsqueeze(2)).latent_dist.mean.squeeze(2)             # video models: one frame


@torch.no_grad()
def direct_decode(kind, model, z):
    if kind in ("AutoencoderKL", "AutoencoderDC"):
        return model.decode(z).sample
    if kind == "AutoencoderKLWan":
        return model.decode(z.unsqueeze(2)).sample.squeeze(2)
    torch.manual_seed(0)                                                        # LTX: timestep 0, seeded noise
    return model.decode(z.unsqueeze(2), temb=torch.zeros(len(z))).sample.squeeze(2)


@pytest.fixture(scope="module")
def aes(tmp_path_factory):
    """{kind: (spec, in-memory diffusers model)} for every supported class, saved to a folder each."""
    root = tmp_path_factory.mktemp("aes")
    out = {}
    for kind in KINDS:
        model = tiny(kind).eval()
        model.save_pretrained(root / kind)
        out[kind] = (f"diffusers:{root / kind}", model)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A class-sorted ImageFolder: 6 classes x 4 images of different sizes; class k has its own colour."""
    root = tmp_path_factory.mktemp("imgs") / "train"
    rng = np.random.default_rng(0)
    for k in range(6):
        (root / f"n{k:08d}").mkdir(parents=True)
        for j in range(4):
            h, w = SIZE + int(rng.integers(0, 9)), SIZE + int(rng.integers(0, 9))
            arr = np.clip(np.array([40 * k, 200 - 30 * k, 120]) + rng.normal(0, 40, (h, w, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(root / f"n{k:08d}" / f"{j}.png")
    return root


def images(folder, n=4):
    ds = ImageFolder(folder, SIZE)
    return ds, torch.stack([ds[i][0] for i in range(0, len(ds), len(ds) // n)][:n])


def in_process(fn, capsys):
    """Run a script's main through run_main as its __main__ does; (exit code, stdout, stderr) like a process."""
    capsys.readouterr()
    code = 0
    try:
        run_main(fn)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


# ----------------------------------------------------------------------------- the interface

@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_equal_the_diffusers_model(aes, folder, kind):
    spec, model = aes[kind]
    ae = load_autoencoder(spec)
    assert isinstance(ae, DiffusersAutoencoder) and ae.class_name == kind and ae.name.startswith(kind)
    C = model.config["z_dim" if kind == "AutoencoderKLWan" else "latent_channels"]
    assert (ae.latent_dim, ae.downsample, ae.stats, ae.image_size) == (C, 8, None, None)
    assert ae.mlsr_fractions == tuple(fft_ops.MLSR_FRACTIONS)
    _, x = images(folder)
    with torch.autocast("cpu", dtype=torch.bfloat16):                 # float32 whatever the caller's autocast
        z = ae.encode(x)
        y = ae.decode(z)
    assert z.dtype == y.dtype == torch.float32
    assert z.shape == (4, C, SIZE // 8, SIZE // 8) and y.shape == x.shape
    torch.testing.assert_close(z, direct_encode(kind, model, x), atol=1e-5, rtol=1e-5)
    ref = direct_decode(kind, model, z)
    assert ref.abs().max() > 0.2                                       # the comparison has signal
    torch.testing.assert_close(y, ref.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    assert y.min() >= -1 and y.max() <= 1
    if kind == "AutoencoderKLLTXVideo":                                # seeded noise: repeatable, global RNG untouched
        state = torch.get_rng_state()
        torch.testing.assert_close(ae.decode(z), y)
        assert torch.equal(torch.get_rng_state(), state)


def test_content_hash_follows_the_weights_not_the_files(aes, tmp_path):
    spec, model = aes["AutoencoderKL"]
    h = load_autoencoder(spec).content_hash
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)        # other files, same weights
    assert sorted(os.listdir(tmp_path / "bin")) == ["config.json", "diffusion_pytorch_model.bin"]
    assert load_autoencoder(f"diffusers:{tmp_path / 'bin'}").content_hash == h
    changed = tiny("AutoencoderKL")
    with torch.no_grad():
        changed.decoder.conv_out.bias[0] += 1e-3
    changed.save_pretrained(tmp_path / "changed")
    assert load_autoencoder(f"diffusers:{tmp_path / 'changed'}").content_hash != h


def test_subfolder_and_class_found_without_class_name(aes, tmp_path):
    spec, model = aes["AutoencoderKLWan"]
    pipe = tmp_path / "pipeline"
    shutil.copytree(spec[len("diffusers:"):], pipe / "vae")                 # a pipeline folder: model_index + vae/
    (pipe / "model_index.json").write_text("{}")
    ae = load_autoencoder(f"diffusers:{pipe}#vae")
    assert ae.class_name == "AutoencoderKLWan" and ae.name.endswith("(subfolder vae)")
    cfg = json.loads((pipe / "vae" / "config.json").read_text())
    del cfg["_class_name"]
    (pipe / "vae" / "config.json").write_text(json.dumps(cfg))
    again = load_autoencoder(f"diffusers:{pipe}#vae")                        # the class is found from the config
    assert again.class_name == "AutoencoderKLWan" and again.content_hash == ae.content_hash
    rec = {"spec": f"diffusers:{pipe}#vae", "abs_spec": f"diffusers:{tmp_path / 'gone'}#vae"}
    assert locate_autoencoder(rec, str(tmp_path / "x.pt")) == f"diffusers:{pipe}#vae"


# ----------------------------------------------------------------------------- FreqWarm latents and the cache

@pytest.mark.parametrize("kind", KINDS)
def test_freqwarm_latents_and_cache(aes, folder, tmp_path, kind):
    spec, model = aes[kind]
    ae = load_autoencoder(spec)
    ds, x = images(folder)
    stats = dataset_latent_stats(ae, ds, len(ds), 0, CPU)
    args = td.get_args(["--preset", "smoke", "--vae", spec, "--out", str(tmp_path), "--image-size", str(SIZE),
                        "--freqwarm", "--r0", "0.2", "--warmup-steps", "3"])
    lat = Stage2Latents(ae, stats, args, 3)
    mean, std = stats["mean"].view(1, -1, 1, 1), stats["std"].view(1, -1, 1, 1)
    low = (direct_encode(kind, model, fft_ops.lowpass(x, 0.2)) - mean) / std
    full = (direct_encode(kind, model, x) - mean) / std
    assert (low - full).abs().max() > 1e-2
    torch.testing.assert_close(lat.get(2, images=x), low, atol=1e-5, rtol=1e-5)     # before the switch
    torch.testing.assert_close(lat.get(3, images=x), full, atol=1e-5, rtol=1e-5)    # after it
    lat.build_cache(ds, str(tmp_path / "cache"), CPU)
    keys = list(range(0, len(ds), len(ds) // 4))[:4]
    raw = direct_encode(kind, model, x).abs().max()
    tol = dict(atol=float(2e-3 * raw / std.min()), rtol=2e-3)                          # float16 storage
    torch.testing.assert_close(lat.get(2, keys=keys), low, **tol)
    torch.testing.assert_close(lat.get(3, keys=keys), full, **tol)
    flipped = (direct_encode(kind, model, x.flip(-1)) - mean) / std
    torch.testing.assert_close(lat.get(3, keys=[len(ds) + k for k in keys]), flipped, **tol)
    assert len(FlipView(ds)) == 2 * len(ds)


# ----------------------------------------------------------------------------- train, sample, diagnose

EXTRA = {"AutoencoderKL": ["--cache-latents"],
         "AutoencoderDC": ["--denoise-level", "1", "--fda", "--model", "uvit-smoke/1"],
         "AutoencoderKLWan": ["--cache-latents", "--fda", "--renorm-level", "--denoise-level", "1"],
         "AutoencoderKLLTXVideo": ["--model", "uvit-smoke/1"]}


@pytest.mark.parametrize("kind", KINDS)
def test_train_sample_and_diagnose(aes, folder, tmp_path, monkeypatch, kind):
    """The card's command (--preset smoke --freqwarm --r0 0.2) for 2 steps on an ImageFolder, then sample and
    diagnose: statistics over every image of every class, stored in the checkpoint, used to decode."""
    spec, model = aes[kind]
    out = tmp_path / "sit"
    td.main(["--preset", "smoke", "--vae", spec, "--freqwarm", "--r0", "0.2", "--data", str(folder), "--out", str(out),
             "--image-size", str(SIZE), "--steps", "2", "--warmup-steps", "1", "--stats-images", "1000",
             "--sample-every", "2", "--val-images", "0", *EXTRA[kind]])     # no held-out images: stats over all
    assert [r["phase"] for r in read_metrics(out / "metrics.jsonl")] == ["warmup", "full"]
    assert (out / "samples_0000002.png").is_file()
    ck = load_checkpoint(str(out / "last.pt"), "sit")
    assert ck["model_config"]["arch"] == ("uvit" if "uvit-smoke/1" in EXTRA[kind] else "sit")
    assert ck["autoencoder"]["content_hash"] == load_autoencoder(spec).content_hash
    ds = ImageFolder(folder, SIZE)
    z = direct_encode(kind, model, torch.stack([ds[i][0] for i in range(len(ds))]))     # all 24 images, 6 classes
    st = ck["latent_stats"]
    assert st["n_images"] == len(ds) and len({ds.label(i) for i in range(len(ds))}) == 6
    torch.testing.assert_close(st["mean"], z.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(st["std"], z.transpose(0, 1).flatten(1).std(1, unbiased=False), atol=1e-4, rtol=1e-4)

    seen = spy_sampling(monkeypatch, ev, ev)
    ev.main(["sample", "--ckpt", str(out / "last.pt"), "--num-samples", "3", "--sample-steps", "2",
             "--out", str(tmp_path / "samples")])
    assert sorted(os.listdir(tmp_path / "samples")) == ["000000.png", "000001.png", "000002.png", "manifest.json"]
    level = ck["config"]["denoise_level"]
    scale = st["level_std"][level].view(1, -1, 1, 1) if ck["config"]["renorm_level"] else 1.0
    expected = seen["z"] * scale * st["std"].view(1, -1, 1, 1) + st["mean"].view(1, -1, 1, 1)
    torch.testing.assert_close(seen["decoder_input"], expected)
    torch.testing.assert_close(seen["decoded"], direct_decode(kind, model, expected).clamp(-1, 1), atol=1e-5, rtol=1e-5)

    diag = tmp_path / "diag"
    ev.main(["diagnose", "--vae", spec, "--data", str(folder), "--image-size", str(SIZE), "--n", "8", "--out", str(diag)])
    res = json.loads((diag / "diagnosis.json").read_text())
    for key in ("f1_psnr_low", "f1_psnr_high", "f2_cumulative_energy", "f3_latent_hf_energy", "f3_latent_hf_ratio"):
        assert all(math.isfinite(v) for v in res[key]), key
    f2 = res["f2_cumulative_energy"]
    assert all(b >= a - 1e-9 for a, b in zip(f2, f2[1:])) and f2[0] < 0.5 and f2[-1] == pytest.approx(1.0)
    assert res["n_images"] == 8 and res["autoencoder"].startswith(kind)
    assert {"f1_band_psnr.png", "f2_cumulative_energy.png", "f3_latent_hf_vs_r0.png",
            "latent_spectra_levels.png"} <= set(os.listdir(diag))


def test_card_command_under_torchrun_with_uvit_equals_one_process(aes, tmp_path):
    """torchrun --nproc_per_node=2 train_diffusion.py --preset smoke --vae diffusers:FOLDER --freqwarm --r0 0.2 (the
    default 256-px images), with a U-ViT: 2 CPU ranks give the losses and weights of one process."""
    spec = aes["AutoencoderKLLTXVideo"][0]
    flags = ["--preset", "smoke", "--vae", spec, "--freqwarm", "--r0", "0.2", "--model", "uvit-smoke/1",
             "--stats-images", "16", "--sample-steps", "1", "--sampler", "euler"]          # cheaper statistics and grid
    two = run(["train_diffusion.py", *flags, "--out", str(tmp_path / "two")], torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "image size: 256 px" in two.stdout and "switching from low-passed" in two.stdout
    td.main([*flags, "--out", str(tmp_path / "one")])
    m1, m2 = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("one", "two"))
    assert [r["phase"] for r in m2] == ["warmup"] * 3 + ["full"] * 3
    assert [r["loss"] for r in m1] == pytest.approx([r["loss"] for r in m2], rel=1e-4)
    a, b = (load_checkpoint(str(tmp_path / r / "last.pt"), "sit") for r in ("one", "two"))
    assert a["model_config"]["arch"] == "uvit" and a["config"]["image_size"] == 256
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- one clear line each

def test_errors_are_one_clear_line(aes, folder, tmp_path, capsys):
    unet = tmp_path / "unet"
    diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(unet)
    smoke = ["--preset", "smoke", "--image-size", str(SIZE), "--steps", "1"]
    p = in_process(lambda: td.main([*smoke, "--vae", f"diffusers:{unet}", "--out", str(tmp_path / "x")]), capsys)
    assert_one_line_error(p, "holds a UNet2DModel, not an autoencoder")
    p = in_process(lambda: ev.main(["diagnose", "--vae", f"diffusers:{folder}", "--out", str(tmp_path / "d")]), capsys)
    assert_one_line_error(p, "is not a diffusers model folder (it has no config.json)")
    p = in_process(lambda: td.main([*smoke, "--vae", "diffusers:/no/such/folder", "--out", str(tmp_path / "x")]), capsys)
    assert_one_line_error(p, "there is no folder /no/such/folder")
    spec4, spec8 = aes["AutoencoderKL"][0], aes["AutoencoderDC"][0]
    p = in_process(lambda: td.main([*smoke, "--vae", spec4, "--image-size", "36", "--out", str(tmp_path / "x")]), capsys)
    assert_one_line_error(p, "image size 36 is not divisible by the downsampling factor 8")
    p = in_process(lambda: ev.main(["diagnose", "--vae", spec8, "--image-size", "20", "--out", str(tmp_path / "d")]),
                   capsys)
    assert_one_line_error(p, "image size 20 is not divisible by the downsampling factor 8")
    td.main([*smoke, "--vae", spec4, "--out", str(tmp_path / "sit4")])
    p = in_process(lambda: ev.main(["sample", "--ckpt", str(tmp_path / "sit4" / "last.pt"), "--vae", spec8,
                                    "--num-samples", "1", "--out", str(tmp_path / "s")]), capsys)
    assert_one_line_error(p, "has 8 latent channels", "trained on 4-channel latents")
    p = in_process(lambda: td.main([*smoke, "--vae", spec8, "--out", str(tmp_path / "y"), "--steps", "2",
                                    "--resume", str(tmp_path / "sit4" / "last.pt")]), capsys)
    assert_one_line_error(p, "4-channel latents", "8 channels")


def test_scalar_latent_norm_round_trips_through_sample(aes, folder, tmp_path, monkeypatch, capsys):
    """--latent-norm scalar trains on (z - shift_factor) * scaling_factor of the autoencoder's own config (FLUX
    style, here 0.1 and 0.37), stores that in the checkpoint, and `sample` decodes z / 0.37 + 0.1; a given
    --latent-scale wins (shift 0); channel stays the default; the choice is fixed on resume."""
    model = tiny("AutoencoderKL").eval()
    model.register_to_config(scaling_factor=0.37, shift_factor=0.1)
    model.save_pretrained(tmp_path / "ae")
    spec, out = f"diffusers:{tmp_path / 'ae'}", tmp_path / "sit"
    flags = ["--preset", "smoke", "--vae", spec, "--data", str(folder), "--image-size", str(SIZE), "--out", str(out),
             "--sample-every", "100"]
    td.main([*flags, "--steps", "2", "--latent-norm", "scalar"])
    st = load_checkpoint(str(out / "last.pt"), "sit")["latent_stats"]
    assert st["norm"] == "scalar" and st["scale"] == pytest.approx(0.37) and st["shift"] == pytest.approx(0.1)
    assert "its publisher's value, not measured here" in st["source"]        # where the scale came from

    args = td.get_args([*flags, "--latent-norm", "scalar"])
    ae = load_autoencoder(spec)
    latents = Stage2Latents(ae, td.training_stats(ae, None, args, CPU), args, 0)
    ds, x = images(folder)
    torch.testing.assert_close(latents.get(0, images=x), (direct_encode("AutoencoderKL", model, x) - 0.1) * 0.37)

    seen = spy_sampling(monkeypatch, ev, ev)
    ev.main(["sample", "--ckpt", str(out / "last.pt"), "--num-samples", "2", "--sample-steps", "2",
             "--out", str(tmp_path / "samples")])
    torch.testing.assert_close(seen["decoder_input"], seen["z"] / 0.37 + 0.1)

    given = td.get_args([*flags, "--latent-norm", "scalar", "--latent-scale", "0.5"])
    s = td.training_stats(ae, None, given, CPU)
    assert torch.equal(s["std"], torch.full((4,), 2.0)) and torch.equal(s["mean"], torch.zeros(4))
    assert td.get_args(flags).latent_norm == "channel"
    p = in_process(lambda: td.main([*flags, "--steps", "3"]), capsys)
    assert_one_line_error(p, "--latent-norm scalar, not channel")
    p = in_process(lambda: td.main([*flags, "--steps", "3", "--latent-norm", "scalar", "--latent-scale", "0.5"]), capsys)
    assert_one_line_error(p, "--latent-scale None, not 0.5")
    p = in_process(lambda: td.main([*flags, "--latent-scale", "0.5"]), capsys)
    assert_one_line_error(p, "--latent-scale 0.5 acts only with --latent-norm scalar")
    wan = load_autoencoder(aes["AutoencoderKLWan"][0])
    with pytest.raises(UserError, match=r"no scaling factor to use \(its diffusers config has no scaling_factor\)"):
        scalar_stats(wan)
