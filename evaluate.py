"""Stage 3: sampling, generation metrics, reconstruction metrics and the frequency diagnosis.

    python evaluate.py sample   --ckpt runs/sit-demo/last.pt --num-samples 100 --out runs/eval/samples   # CPU
    python evaluate.py fid      --samples runs/eval/samples.npz --ref REF_FOLDER_OR_STATS.npz
    python evaluate.py fid      --samples runs/eval/samples.npz --ref VIRTUAL_imagenet256_labeled.npz  # ADM batch
    python evaluate.py fid      --make-ref-stats ref.npz --ref /data/imagenet/val --resolution 256  # reference stats
    python evaluate.py recon    --vae runs/vae-demo/last.pt --n 500
    python evaluate.py diagnose --vae runs/vae-demo/last.pt --n 256 --out runs/eval/diagnosis
    python evaluate.py diagnose --vae diffusers:Wan-AI/Wan2.2-TI2V-5B-Diffusers#vae --image-size 512 --data VAL_FOLDER
    python evaluate.py export   --ckpt runs/sit-demo/last.pt --out runs/export/sit-demo [--push-to-hub USER/NAME]
    python evaluate.py curve    runs/sit-a runs/sit-b --num-samples 1000 --out runs/curve   # runs with --keep-every
    python evaluate.py figures  --demo demo_out --study runs/study --out docs/figures    # the docs' figures
    torchrun --nproc_per_node=8 evaluate.py sample --ckpt SIT.pt --num-samples 50000 --sample-steps 250 --cfg-scale 1.8
    torchrun --nnodes=4 --node_rank=$NODE_RANK --master_addr=$MASTER --master_port=29500 --nproc_per_node=8 \\
             evaluate.py sample --ckpt SIT.pt --num-samples 50000

sample   : EMA weights, class-balanced labels (image i has class i mod K; or --labels random), indices sharded
           over ranks (rank r draws i = r, r + W, ...), noise seeded per image, PNGs written as they finish
           (a rerun skips existing ones), then an ADM-style .npz (uint8 NHWC `arr_0`, labels `arr_1`).
           --sampler euler / heun (ODE) or sde (SiT's Euler-Maruyama sampler).
fid      : gFID, sFID, Inception Score and improved precision / recall (k = 3) from clean-fid's Inception
           file under one of two protocols: --fid-mode adm (default; ADM's evaluator, the protocol of the
           published tables and of ADM reference batches; precision / recall from its float16 distances) or
           clean (clean-fid's PIL-bicubic resize). Results name how the samples' labels were drawn.
recon    : PSNR, SSIM, LPIPS (and rFID, rsFID, IS with Inception) of D(S_l(z)) against x for each MLSR level,
           plus the latent high-frequency energy ratio (Denoising-VAE Tables 1, 2 and 4).
diagnose : FreqWarm Findings 1-3 on any VAE: (F1) PSNR of D(z_low), D(z_high) over a radius sweep,
           (F2) cumulative RGB spectral energy vs radius, (F3) latent high-frequency energy vs the RGB
           low-pass radius r0, and the radially averaged latent spectra per MLSR level; JSON + PNG figures.
curve    : samples and scores the EMA checkpoints runs kept with --keep-every: metric vs step (table, JSON, figure).
figures  : the figures of the README and docs/results.md (the method on dead leaves and the demo's autoencoder,
           the demo's runs, the study's), PNG; one whose inputs are missing is skipped with one line.
export   : a 'sit' or 'vae' checkpoint's EMA weights as model.safetensors + config.json (provenance sealed
           into the safetensors header); `sample --ckpt DIR` and `--vae DIR` read it like the checkpoint.
Every printed metric names the network that produced it.
"""
import argparse
import hashlib
import json
import math
import os
import zipfile

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

import fft_ops
from common import (UserError, atomic_write, autocast, barrier, check_finite, check_needs, check_out_dir, check_range,
                    checkpoint_path, derive_seed, explicit_dests, file_hash, load_checkpoint, log0, read_export,
                    read_json, read_jsonl, run_main, setup_distributed, wait_for_files, when, write_export, write_json)
from data import (DeadLeaves, ImageFiles, build_dataset, image_batches, load_rgb, random_subset, to_uint8,
                  train_val_split)
from dit import SAMPLERS, denoiser_from_config, guided_velocity, sample_ode, sample_sde
from vae import (DEFAULT_IMAGE_SIZE, F3_SUBSETS, R0_SWEEP, VGG16_FILE, LatentSpace, checkpoint_identity,
                 describe_peak_height, f3_peak, f3_peak_test, f3_scores, find_vgg_weights, latent_stats, level_scores,
                 load_autoencoder, locate_autoencoder, psnr, resolve_image_size)

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
CLEANFID_CACHE = "/tmp"             # where clean-fid itself downloads the file on Linux
INCEPTION_DIMS = (2048, 1008)       # pool features, class logits of the 2015-12-05 graph
FID_MODES = ("adm", "clean")
FID_MODE_HELP = ("adm: the ADM evaluator's pipeline (uint8 images at their own size, resized to 299 inside the "
                 "network by TensorFlow's bilinear rule; clean-fid's 'legacy_tensorflow'), the protocol of the "
                 "DiT / SiT / REPA / LightningDiT / Denoising-VAE tables and of ADM reference batches; "
                 "clean: clean-fid's PIL-bicubic resize outside the network")
SFID_CHANNELS = 7                   # ADM's sFID: mixed_6/conv (17 x 17 x 192), first 7 channels = 2023 dims
IS_SPLIT = 5000                     # ADM's Inception Score: consecutive chunks of 5000 images
RSFID_DEFINITION = "Frechet distance of ADM's sFID features (mixed_6/conv, 7 x 17 x 17) of D(S_l(z)) vs x"


# ----------------------------------------------------------------------------- sampling

def shard(n, rank, world_size):
    """Indices of the n images that `rank` draws: rank, rank + W, ... (disjoint, covering)."""
    return list(range(rank, n, world_size))


def balanced_labels(indices, num_classes):
    return torch.tensor([i % num_classes for i in indices], dtype=torch.long)


def sample_labels(n, num_classes, mode, seed):
    """Labels of images 0..n-1: 'balanced' (image i has class i mod K) or 'random' (uniform, as DiT's and SiT's
    sample_ddp.py draw them; here one seeded draw for the whole set, so independent of ranks and batches)."""
    if mode == "balanced":
        return balanced_labels(range(n), num_classes)
    g = torch.Generator().manual_seed(derive_seed(seed, "labels"))
    return torch.randint(num_classes, (n,), generator=g)


def image_generators(indices, seed):
    """One random stream per image: its initial noise, then (SDE sampler) its Brownian increments."""
    return [torch.Generator().manual_seed(derive_seed(seed, "image", i)) for i in indices]


def image_noise(indices, shape, seed, generators=None):
    """Per-image initial noise, identical whatever the world size or batch split."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators or image_generators(indices, seed)])


def load_sit(path, device, vae=None):
    """EMA SiT, its frozen autoencoder and latent space from a Stage-2 checkpoint or its export folder.

    The autoencoder is found at --vae (when given), else at the path recorded at training time
    (absolute, then relative to the working directory, then to the checkpoint's folder); whichever is used
    must hash to the content recorded in the checkpoint, so a retrained or swapped VAE is refused.
    """
    path = checkpoint_path(path)
    ck = export_as_checkpoint(path) if os.path.isdir(path) else load_checkpoint(path, "sit")
    ema = denoiser_from_config(ck["model_config"])
    ema.load_state_dict(ck["ema"])
    rec = ck.get("autoencoder", {"spec": ck["config"]["vae"]})
    spec = vae or locate_autoencoder(rec, os.path.join(path, "config.json") if os.path.isdir(path) else path)
    ae = load_autoencoder(spec, device)
    if ae.latent_dim != ema.in_channels:
        raise UserError(f"autoencoder {spec} has {ae.latent_dim} latent channels, but {path} was trained on "
                        f"{ema.in_channels}-channel latents")
    if rec.get("content_hash") and ae.content_hash != rec["content_hash"]:
        raise UserError(f"{spec} is not the autoencoder {path} was trained with (content {ae.content_hash}, "
                        f"expected {rec['content_hash']}): pass the original with --vae")
    cfg = ck["config"]
    if not ck.get("latent_stats"):
        raise UserError(f"{path} holds no latent statistics (latent_stats), so its latents cannot be decoded; "
                        f"it is not a checkpoint train_diffusion.py finished writing")
    space = LatentSpace(ck["latent_stats"], ae.mlsr_fractions, cfg.get("denoise_level", 0),
                        cfg.get("renorm_level", False), device)
    return ema.to(device).eval(), ae, space, ck


def sample_manifest(a, ck_path, ck, device):
    """What decides the pictures in a sample folder: a rerun may only add to a folder made the same way.
    Also what they came from (checkpoint step, training data, classes), for `fid --record` and `compare`."""
    if os.path.isdir(ck_path):                          # an export: its weights file (config sealed inside)
        ck_path = os.path.join(ck_path, "model.safetensors")
    precision = "bf16" if device.type == "cuda" and not a.no_bf16 else "float32"
    return {"checkpoint": file_hash(ck_path), "step": ck["step"], "cfg_scale": a.cfg_scale,
            "cfg_interval": list(a.cfg_interval), "sampler": a.sampler, "sample_steps": a.sample_steps,
            "seed": a.seed, "labels": a.labels, "no_bf16": a.no_bf16, "precision": precision,
            "num_classes": ck["model_config"].get("num_classes"), "data": ck["config"].get("data")}


def check_manifest(out, manifest):
    """Refuse a folder whose samples were drawn with other settings; else record them (atomically)."""
    path = os.path.join(out, "manifest.json")
    if os.path.isfile(path):
        old = read_json(path, f"it records how the samples in {out} were drawn; remove the folder or use "
                              f"another --out")
        diff = [f"{k}: {old.get(k)} there, {v} now" for k, v in manifest.items() if old.get(k) != v]
        if diff:
            raise UserError(f"{out} holds samples drawn with other settings ({'; '.join(diff)}): "
                            f"use another --out or remove it")
    else:
        write_json(path, manifest)


def folder_to_npz(folder, n, path, chunk=1000, labels=None):
    """Stream PNGs 000000..n-1 into an ADM-style .npz (arr_0 uint8 NHWC, and arr_1 int64 class labels when
    given, as ADM's class-conditional sample files) without holding them all; atomic."""
    first = np.asarray(load_rgb(os.path.join(folder, f"{0:06d}.png")))
    shape = (n, *first.shape)
    with atomic_write(path) as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for i in range(0, n, chunk):
                block = np.stack([np.asarray(load_rgb(os.path.join(folder, f"{j:06d}.png")))
                                  for j in range(i, min(i + chunk, n))])
                f.write(np.ascontiguousarray(block, dtype=np.uint8).tobytes())
        if labels is not None:
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
    return shape


@torch.no_grad()
def draw_latents(ema, idx, labels, a, device):
    """The latents (b, C, h, w) of images `idx` of a sample set, before decoding: each image's noise (and, with
    the SDE, its Brownian increments) from its own seeded stream, its label labels[i]; the same whatever the
    batch split or rank count. a: --seed, --sampler, --sample-steps, --cfg-scale, --cfg-interval, --no-bf16."""
    shape = (ema.in_channels, ema.config["input_size"], ema.config["input_size"])
    gens = image_generators(idx, a.seed)
    noise = image_noise(idx, shape, a.seed, gens).to(device)
    velocity = guided_velocity(ema, labels[idx].to(device), a.cfg_scale, tuple(a.cfg_interval))
    with autocast(device, not a.no_bf16):
        if a.sampler == "sde":                                      # each image's increments from its own stream
            return sample_sde(velocity, noise, a.sample_steps, generator=gens)
        return sample_ode(velocity, noise, a.sample_steps, a.sampler)


@torch.no_grad()
def cmd_sample(a, d):
    a.ckpt = checkpoint_path(a.ckpt)                                     # a run folder: its last.pt
    ema, ae, space, ck = load_sit(a.ckpt, d.device, a.vae)
    labels = sample_labels(a.num_samples, ema.num_classes, a.labels, a.seed)            # (num_samples,)
    if d.main:
        os.makedirs(a.out, exist_ok=True)
        check_manifest(a.out, sample_manifest(a, a.ckpt, ck, d.device))
        for f in os.listdir(a.out):                                 # temporaries of an interrupted run
            if f.startswith(".") and f.endswith(".png"):
                os.remove(os.path.join(a.out, f))
    barrier()
    todo = [i for i in shard(a.num_samples, d.rank, d.world_size) if not os.path.exists(os.path.join(a.out, f"{i:06d}.png"))]
    log0(f"sampling {a.num_samples} images ({len(todo)} left on rank {d.rank}) with {a.sampler} x {a.sample_steps}, "
         f"CFG {a.cfg_scale} on t in {a.cfg_interval}, {a.labels} labels; decoder {ae.name}", d)
    for s in range(0, len(todo), a.batch):
        idx = todo[s:s + a.batch]
        z = draw_latents(ema, idx, labels, a, d.device)             # (b, C, h, w), in the SiT's latent space
        x = ae.decode(space.to_autoencoder(z))                       # float32 decode, outside autocast
        if not (torch.isfinite(z).all() and torch.isfinite(x).all()):   # checked like a training loss
            raise UserError(f"sampling images {idx[0]}..{idx[-1]} gave non-finite "
                            f"{'latents' if not torch.isfinite(z).all() else 'decoded images'} (--cfg-scale "
                            f"{a.cfg_scale}, {a.ckpt}): nothing written for them")
        imgs = to_uint8(x)
        for i, im in zip(idx, imgs):
            with atomic_write(os.path.join(a.out, f"{i:06d}.png")) as f:
                Image.fromarray(im).save(f, format="PNG")
    # ranks with less work left wait for the others' files, not in a collective (which would time out)
    wait_for_files([os.path.join(a.out, f"{i:06d}.png") for i in range(a.num_samples)], "sampling")
    barrier()                                                        # all ranks are here within a poll
    if d.main:
        shape = folder_to_npz(a.out, a.num_samples, a.out.rstrip("/") + ".npz", labels=labels.numpy())
        log0(f"wrote {a.out}/ and {a.out.rstrip('/')}.npz (arr_0 {shape} uint8, arr_1 its {a.labels} labels)", d)


# ----------------------------------------------------------------------------- export (and the Hub)

def export_config(ck, path):
    """config.json of an export: what a user of the weights needs, and where they came from."""
    cfg = ck["config"]
    common = {"kind": ck["kind"], "step": ck["step"], "model_config": ck["model_config"],
              "latent_stats": ck.get("latent_stats"),
              "source": {"checkpoint": os.path.abspath(path), "checkpoint_hash": file_hash(path)},
              "train_config": {k: v for k, v in cfg.items() if k != "explicit"}}
    if ck["kind"] == "vae":
        # the content hash is the checkpoint's own: Stage 2 / 3 see the export as that autoencoder
        return {**common, "architecture": "ViTVAE", "content_hash": checkpoint_identity(path, ck),
                "mlsr_fractions": list(cfg.get("mlsr_fractions", fft_ops.MLSR_FRACTIONS))}
    return {**common, "architecture": ck["model_config"].get("arch", "sit"),
            "denoise_level": cfg.get("denoise_level", 0), "renorm_level": cfg.get("renorm_level", False),
            "autoencoder": ck.get("autoencoder", {"spec": cfg["vae"]}), "freqwarm": ck.get("freqwarm"),
            "fda": {"enabled": cfg.get("fda", False), "weight": cfg.get("fda_weight"), "depth": cfg.get("fda_depth"),
                    "schedule": cfg.get("fda_schedule")}}


def export_as_checkpoint(folder):
    """A SiT export read back into the fields of a checkpoint that sampling uses (EMA weights only)."""
    cfg, weights = read_export(folder, ("sit",))
    train = {**cfg["train_config"], "denoise_level": cfg["denoise_level"], "renorm_level": cfg["renorm_level"]}
    return {"kind": "sit", "step": cfg["step"], "model_config": cfg["model_config"], "ema": weights,
            "latent_stats": cfg["latent_stats"], "autoencoder": cfg["autoencoder"], "freqwarm": cfg["freqwarm"],
            "config": train}


def cmd_export(a, d):
    """The EMA weights of a Stage-1 or Stage-2 checkpoint as OUT/model.safetensors + OUT/config.json (no optimizer,
    discriminator, FDA projector or random state); `sample --ckpt OUT` / `--vae OUT` read it like the checkpoint."""
    a.ckpt = checkpoint_path(a.ckpt)
    if os.path.isdir(a.ckpt):
        raise UserError(f"--ckpt {a.ckpt} is an export already; export its checkpoint (RUN/last.pt), or copy the "
                        f"folder")
    ck = load_checkpoint(a.ckpt, ("sit", "vae"))
    config = write_export(a.out, ck["ema"], export_config(ck, a.ckpt))
    n = sum(v.numel() for v in ck["ema"].values())
    log0(f"exported the EMA weights of {a.ckpt} ({config['kind']}, step {config['step']}, {n / 1e6:.2f}M values) "
         f"to {a.out}/model.safetensors and {a.out}/config.json")
    if a.push_to_hub:
        push_to_hub(a.out, a.push_to_hub, a.private)


def check_hub_repo(repo):
    """Before exporting: huggingface_hub imports and `repo` is a valid Hub repo id (USER/NAME); one line if not."""
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        raise UserError("--push-to-hub needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise UserError(f"--push-to-hub {repo!r} is not a Hub repo id (USER/NAME): {str(e).split(':')[0]}") from None


def push_to_hub(folder, repo, private=False):
    """Upload an export folder to the Hugging Face Hub model repo `repo` (created if needed); one line if it fails
    (offline, no token, no permission): the export itself is complete either way."""
    try:
        import huggingface_hub
    except ImportError:
        raise UserError(f"--push-to-hub needs huggingface_hub (pip install huggingface_hub); the export in "
                        f"{folder} is complete") from None
    try:
        api = huggingface_hub.HfApi()
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=folder, repo_type="model",
                                 commit_message=f"FreqLDM export ({os.path.basename(os.path.abspath(folder))})")
    except Exception as e:
        raise UserError(f"could not push {folder} to the Hub repo {repo} ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:160]}); the export in {folder} is complete: "
                        f"push it again when online and logged in (`hf auth login` or HF_TOKEN)") from None
    log0(f"pushed {folder} to https://huggingface.co/{repo} ({getattr(info, 'commit_url', info)})")


# ----------------------------------------------------------------------------- metric math

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), via scipy's sqrtm (float64)."""
    mu1, mu2, s1, s2 = (np.asarray(v, dtype=np.float64) for v in (mu1, mu2, sigma1, sigma2))
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def feature_stats(feats):
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def inception_score(probs, splits=10, split_size=None):
    """exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` equal chunks, or over consecutive chunks of
    `split_size` images (ADM: 5000, the last one shorter)."""
    probs = np.asarray(probs, dtype=np.float64)
    parts = (np.array_split(probs, min(splits, len(probs))) if split_size is None else
             [probs[i:i + split_size] for i in range(0, len(probs), split_size)])
    scores = []
    for part in parts:
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


class StreamedIS:
    """inception_score(probs, split_size=IS_SPLIT) without keeping more than one chunk of probabilities."""

    def __init__(self, split_size=IS_SPLIT):
        self.size, self.buf, self.scores = split_size, np.zeros((0, 0)), []

    def add(self, p):
        self.buf = np.concatenate([self.buf.reshape(-1, p.shape[1]), np.asarray(p, dtype=np.float64)])
        while len(self.buf) >= self.size:
            self.scores.append(inception_score(self.buf[:self.size], splits=1)[0])
            self.buf = self.buf[self.size:]

    def result(self):
        scores = self.scores + ([inception_score(self.buf, splits=1)[0]] if len(self.buf) else [])
        return float(np.mean(scores)), float(np.std(scores))


ADM_PR_BLOCK = 10000     # ADM's ManifoldEstimator: distances in blocks of 10 000 x 10 000 features


def adm_distances(u, v):
    """ADM's evaluator's DistanceBlock on features u (n, D), v (m, D) -> (n, m) float32: squared distances
    |u|^2 - 2 u.v + |v|^2, clipped at 0, from the features cast to float16, each step rounded to float16 (squares,
    norms, the product, the sums; accumulated in float32, as a GPU does); a block with a non-finite float16
    entry (an overflow) is computed again in float32, as ADM's tf.cond does."""
    u16, v16 = u.to(torch.float16), v.to(torch.float16)
    nu, nv = ((w * w).float().sum(1).half() for w in (u16, v16))               # (n,), (m,) float16
    d = torch.clamp(nu[:, None] - 2 * (u16.float() @ v16.float().t()).half() + nv[None], min=0)
    if torch.isfinite(d).all():
        return d.float()
    u, v = u.float(), v.float()
    return torch.clamp((u * u).sum(1)[:, None] - 2 * u @ v.t() + (v * v).sum(1)[None], min=0)


def distance_blocks(rows, cols, adm, batch=1024):
    """Distances of consecutive blocks of rows to every col: float64 Euclidean distances, or (adm) ADM's
    float16 squared ones (adm_distances) in its 10 000 x 10 000 blocks; either is compared only with radii of
    its own kind."""
    if not adm:
        r, c = torch.as_tensor(rows, dtype=torch.float64), torch.as_tensor(cols, dtype=torch.float64)
        for i in range(0, len(r), batch):
            yield torch.cdist(r[i:i + batch], c)
        return
    r, c = torch.as_tensor(rows, dtype=torch.float32), torch.as_tensor(cols, dtype=torch.float32)
    for i in range(0, len(r), ADM_PR_BLOCK):
        yield torch.cat([adm_distances(r[i:i + ADM_PR_BLOCK], c[j:j + ADM_PR_BLOCK])
                         for j in range(0, len(c), ADM_PR_BLOCK)], dim=1)


def knn_radii(feats, k=3, adm=False):
    """Distance of each feature to its k-th nearest other feature (ADM: squared, float16, as distance_blocks)."""
    return torch.cat([dist.kthvalue(k + 1, dim=1).values                 # +1 skips the point itself
                      for dist in distance_blocks(feats, feats, adm)])


def coverage_fraction(query, ref, ref_radii, adm=False):
    """Fraction of query points inside at least one ball B(ref_j, radius_j)."""
    inside = [(dist <= ref_radii[None]).any(1) for dist in distance_blocks(query, ref, adm)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real, fake, k=3, adm=False):
    """Improved precision / recall (Kynkaanniemi et al. 2019) with k-NN balls; adm: with the distances of ADM's
    evaluator (float16, adm_distances), which move them by about 0.005 on Inception-like features."""
    precision = coverage_fraction(fake, real, knn_radii(real, k, adm), adm)
    recall = coverage_fraction(real, fake, knn_radii(fake, k, adm), adm)
    return precision, recall


# ----------------------------------------------------------------------------- Inception: two protocols

def find_inception(path=None):
    """Path of clean-fid's Inception torchscript file, or one clear error saying where to put it."""
    path = path or os.path.join(CLEANFID_CACHE, INCEPTION_FILE)
    if not os.path.isfile(path):
        raise UserError(f"FID / IS need clean-fid's Inception weights: download {INCEPTION_URL} to "
                        f"{os.path.join(CLEANFID_CACHE, INCEPTION_FILE)} or pass --inception-path FILE")
    return path


def load_inception(path, verify=True):
    """clean-fid's Inception TorchScript from `path`, checked to be that network before its output is
    called Inception: it must load as TorchScript with a `layers` trunk whose pool features are 2048-d
    and whose class head has 1008 outputs (the 2015-12-05 graph) on a probe batch. One line otherwise."""
    what = f"{path} is not clean-fid's {INCEPTION_FILE} (from {INCEPTION_URL})"
    try:
        net = torch.jit.load(path, map_location="cpu").eval()
    except Exception as e:
        raise UserError(f"{what}: it does not load as TorchScript ({type(e).__name__})") from None
    if not verify:
        return net
    try:
        with torch.no_grad():
            x = torch.full((2, 3, 299, 299), 128.0)
            feats = net.layers.forward((x - 128) / 128).reshape(2, -1)
            probs = net(x, no_output_bias=True)
    except Exception as e:
        raise UserError(f"{what}: it does not run as that network ({type(e).__name__}: {str(e)[:80]})") from None
    got = (tuple(feats.shape[1:]), tuple(probs.shape[1:]))
    if got != ((INCEPTION_DIMS[0],), (INCEPTION_DIMS[1],)):
        raise UserError(f"{what}: its features / class outputs have sizes {got[0]} / {got[1]}, "
                        f"expected ({INCEPTION_DIMS[0]},) / ({INCEPTION_DIMS[1]},)")
    return net


def tf_resize(x, size=299):
    """TensorFlow-1 ResizeBilinear (align_corners=False, no half-pixel centres) of float images (B, 3, H, W):
    output pixel i reads the input at i * H / size, edges clamped. The Inception TorchScript does exactly
    this inside its forward (affine_grid shifted by 1/H - 1/size, then grid_sample); sFID needs it here
    because the network's forward returns no intermediate map. Checked against the network's own forward."""
    B, _, H, W = x.shape
    theta = torch.tensor([[1.0, 0.0, 1 / W - 1 / size], [0.0, 1.0, 1 / H - 1 / size]], device=x.device)
    grid = F.affine_grid(theta.expand(B, 2, 3), [B, 3, size, size], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def trunk_to_mixed_6(layers, x):
    """The trunk's blocks in order, up to (not including) mixed_6."""
    for name, block in layers.named_children():
        if name == "mixed_6":
            break
        x = block(x)
    return x


def spatial_features(layers, x):
    """ADM's sFID features: the mixed_6/conv map (B, 192, 17, 17) of normalised 299-px input x, first 7
    channels, flattened in TensorFlow's NHWC order as ADM does -> (B, 17 * 17 * 7 = 2023)."""
    m = layers.mixed_6.conv(trunk_to_mixed_6(layers, x))[:, :SFID_CHANNELS]
    return m.permute(0, 2, 3, 1).reshape(len(m), -1)


def check_sfid_path(net, verify):
    """None if sFID can be read from this network, else why not. The blocks of `layers`, run one by one,
    must give its own forward, and in adm mode tf_resize must be the network's own resize (probe batches
    at 299 px and at 61 x 83 px); the real file must give a 17 x 17 map of at least 7 channels."""
    if not hasattr(net.layers, "mixed_6") or not hasattr(net.layers.mixed_6, "conv"):
        return "the network has no layers.mixed_6.conv"
    try:
        with torch.no_grad():
            x = torch.randint(0, 256, (2, 3, 61, 83), generator=torch.Generator().manual_seed(0)).float()
            h = (tf_resize(x) - 128) / 128
            chained = h
            for _, block in net.layers.named_children():
                chained = block(chained)
            whole = net.layers.forward(h)
            own = net(x, return_features=True)
            m = net.layers.mixed_6.conv(trunk_to_mixed_6(net.layers, h))
    except Exception as e:
        return f"probing its blocks failed ({type(e).__name__}: {str(e)[:80]})"
    if not torch.allclose(chained, whole, rtol=1e-4, atol=1e-4):
        return "its blocks run in order do not give its forward"
    if not torch.allclose(whole.reshape(len(x), -1), own.reshape(len(x), -1), rtol=1e-3, atol=1e-3):
        return "tf_resize is not the network's own resize"
    if verify and (m.shape[-2:] != (17, 17) or m.shape[1] < SFID_CHANNELS):
        return f"mixed_6.conv gives {tuple(m.shape[1:])}, not (192, 17, 17)"
    return None


class InceptionExtractor:
    """clean-fid's Inception TorchScript (StyleGAN2-ADA's conversion of the 2015-12-05 TensorFlow graph).

    __call__(uint8 (B, H, W, 3)) -> (pool features (B, 2048), class probabilities (B, 1008), sFID features
    (B, 2023) or None). mode "adm": the uint8 images go into the network at their own size and it resizes
    them itself (clean-fid's legacy_tensorflow, ADM's evaluator); "clean": PIL bicubic to 299 outside, then
    the trunk. Probabilities: softmax of the pool features times the class weights without bias (ADM's
    `softmax/logits/MatMul`). The file is checked (load_inception) first; `verify=False` (tests only)
    accepts another TorchScript network with the same interface, and then the name says its numbers are
    not FID / IS. `name` carries the protocol, `network_hash` the file's sha256 prefix.
    """

    def __init__(self, path, device, verify=True, mode="adm"):
        from cleanfid.resize import build_resizer
        if mode not in FID_MODES:
            raise UserError(f"--fid-mode must be one of {FID_MODES}, got {mode}")
        base = load_inception(path, verify)
        self.sfid_missing = check_sfid_path(base, verify)
        self.base, self.mode, self.network_hash, self.device = base.to(device), mode, file_hash(path), device
        net = ("Inception-v3 (clean-fid, inception-2015-12-05)" if verify else
               f"unverified stand-in network {os.path.basename(path)} (its numbers are not FID / IS)")
        self.name = f"{net}, {mode} protocol"
        self.resize = build_resizer("clean")
        probe = np.random.default_rng(0).integers(0, 256, (2, 32, 40, 3), dtype=np.uint8)
        f, p, sp = self(probe)                                  # feature sizes: (2048, 2023) for the real file
        self.dims = (f.shape[1], None if sp is None else sp.shape[1])
        with torch.no_grad():                                   # the class head read from `output` is the forward's
            own = self.base(self._input(probe).float(), no_output_bias=True)
        if not np.allclose(p, own.double().cpu().numpy(), rtol=1e-3, atol=1e-5):
            raise UserError(f"{path}: softmax(features x output.weight) is not its own no_output_bias forward")

    def _probs(self, feats, x):
        if hasattr(self.base, "output"):
            return torch.softmax(feats @ self.base.output.weight.t(), dim=1)
        return self.base(x.float(), no_output_bias=True)    # stand-ins without a class layer of that name

    def _input(self, imgs):
        """What goes into the network: adm, the uint8 images at their own size (B, 3, H, W); clean, float
        images PIL-bicubic resized to 299 (B, 3, 299, 299)."""
        if self.mode == "adm":
            return torch.tensor(np.asarray(imgs)).permute(0, 3, 1, 2).to(self.device)
        return torch.from_numpy(np.stack([self.resize(im) for im in imgs])).permute(0, 3, 1, 2).float().to(self.device)

    @torch.no_grad()
    def __call__(self, imgs):
        x = self._input(imgs)
        if self.mode == "adm":
            feats = self.base(x, return_features=True).reshape(len(x), -1)     # resized inside the network
            h = None if self.sfid_missing else (tf_resize(x.float()) - 128) / 128
        else:
            h = (x - 128) / 128
            feats = self.base.layers.forward(h).reshape(len(x), -1)            # clean-fid's InceptionV3W
        probs = self._probs(feats, x)
        spatial = None if self.sfid_missing else spatial_features(self.base.layers, h).double().cpu().numpy()
        return feats.double().cpu().numpy(), probs.double().cpu().numpy(), spatial


class FeatureMoments:
    """Running mean and covariance of features (float64 sums): FID statistics without keeping features."""

    def __init__(self):
        self.n, self.s, self.ss = 0, None, None

    def add(self, f):
        f = np.asarray(f, dtype=np.float64)
        if self.s is None:
            self.s, self.ss = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        self.n, self.s, self.ss = self.n + len(f), self.s + f.sum(0), self.ss + f.T @ f

    def stats(self):
        """(mu, sigma) with the unbiased covariance, as np.cov."""
        mu = self.s / self.n
        return mu, (self.ss - self.n * np.outer(mu, mu)) / (self.n - 1)


def extract(extractor, batches, keep=True, spatial=None):
    """Features of a stream of uint8 batches (b, H, W, 3): (moments, features or None, probabilities);
    sFID features (when the extractor gives them) go into the FeatureMoments `spatial`."""
    moments, fs, ps = FeatureMoments(), [], []
    for imgs in batches:
        f, p, *rest = extractor(np.asarray(imgs))
        moments.add(f), ps.append(p.astype(np.float32))
        if keep:
            fs.append(f.astype(np.float32))
        if spatial is not None and rest and rest[0] is not None:
            spatial.add(rest[0])
    return moments, (np.concatenate(fs) if keep else None), np.concatenate(ps)


def npz_batches(path, batch=500):
    """Stream arr_0 of an .npz in batches without loading the whole array (stored or deflated entries)."""
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        shape, dtype = _npy_header(f)
        per = int(np.prod(shape[1:]))
        for i in range(0, shape[0], batch):
            b = min(batch, shape[0] - i)
            yield np.frombuffer(f.read(b * per), dtype=np.uint8).reshape(b, *shape[1:])


def _npy_header(f):
    """(shape, dtype) from the header of an open .npy stream, leaving it at the data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran:
        raise UserError("Fortran-ordered arrays are not supported; save C-ordered uint8 (N, H, W, 3)")
    return shape, dtype


def npz_shape(path, flag):
    """(shape, dtype) of arr_0 in an .npz, read from its header alone; one line if it is not there."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            if "arr_0.npy" not in zf.namelist():
                raise UserError(f"{flag} {path} has no 'arr_0' image array (keys: "
                                f"{sorted(n[:-4] for n in zf.namelist())})")
            with zf.open("arr_0.npy") as f:
                return _npy_header(f)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"{flag} {path} is not a readable .npz file ({type(e).__name__}: {str(e)[:100]})") from None


def check_images(shape, dtype, what):
    """One line unless images are what FID expects: uint8, NHWC with 3 channels, at least 2 of them."""
    if np.dtype(dtype) != np.uint8:
        raise UserError(f"{what}: images must be uint8 in [0, 255] (ADM .npz layout), not {np.dtype(dtype)}")
    if len(shape) != 4 or shape[-1] != 3:
        hint = ("; this looks like NCHW, transpose it with arr.transpose(0, 2, 3, 1)"
                if len(shape) == 4 and shape[1] == 3 else "")
        raise UserError(f"{what}: images must be NHWC RGB, (N, H, W, 3), not shape {tuple(shape)}{hint}")
    if shape[0] < 2:
        raise UserError(f"{what}: FID needs at least 2 images (a covariance), got {shape[0]}")


def image_source(src, flag, resolution=None, batch=100, workers=0):
    """(uint8 batch stream, count, side) of an .npz (arr_0) or of every image below a folder (nested, any
    sizes: ADM centre crop to `resolution`, default the first image's side), checked with check_images."""
    if src.endswith(".npz"):
        shape, dtype = npz_shape(src, flag)
        check_images(shape, dtype, f"{flag} {src}")
        return npz_batches(src, batch), shape[0], shape[1]
    if not os.path.isdir(src):
        raise UserError(f"{flag} {src} is neither an .npz file nor a folder of images")
    files = ImageFiles(src, resolution or 1)
    if resolution is None:
        files.resolution = min(load_rgb(files.files[0]).size)
    check_images((len(files), files.resolution, files.resolution, 3), np.uint8, f"{flag} {src}")
    loader = torch.utils.data.DataLoader(files, batch_size=batch, num_workers=workers, collate_fn=np.stack)
    return loader, len(files), files.resolution


def npz_keys(path, flag):
    """Names of the arrays in an .npz, from its zip directory alone (nothing is read)."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{flag} {path} is not a readable .npz file ({type(e).__name__}: {str(e)[:100]})") from None


def read_npz_array(path, key, flag):
    """One array of an .npz, read from its own zip entry (a 2 GB ADM batch is not loaded for its mu)."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise UserError(f"{flag} {path}: cannot read '{key}' ({type(e).__name__}: {str(e)[:100]})") from None


ADM_BATCH_KEYS = {"arr_0", "mu", "sigma"}           # plus mu_s, sigma_s (sFID): ADM's reference batches
REF_META = ("fid_mode", "resolution", "n_images", "source", "network", "network_hash")


class Reference:
    """What --ref holds, recognised by its keys; each array is read once, when first needed.

    "adm-batch": an ADM reference batch (VIRTUAL_imagenet256_labeled.npz ...): arr_0 (its images, for
        precision / recall) and ADM's evaluator's mu, sigma, mu_s, sigma_s of the training set: adm mode only.
    "stats": statistics from --make-ref-stats, with the mode, resolution, image count, source and network
        file they were made with; usable only with the same ones.
    "images": an .npz with arr_0, or a folder (nested, any sizes: ADM centre crop at `resolution`).
    """

    def __init__(self, src, resolution, flag="--ref", workers=0):
        self.src, self.flag, self._cache, self.meta, self.keys, self.mode = src, flag, {}, {}, set(), None
        self.kind = "images"
        if src.endswith(".npz"):
            self.keys = npz_keys(src, flag)
            if ADM_BATCH_KEYS <= self.keys:
                self.kind, self.mode = "adm-batch", "adm"
            elif "mu" in self.keys:
                self.kind = "stats"
                self.meta = {k: read_npz_array(src, k, flag).item() for k in REF_META if k in self.keys}
                self.resolution, self.mode = self.meta.get("resolution"), self.meta.get("fid_mode")
        if self.kind != "stats":                                    # checked now, streamed later
            self._images, n, self.resolution = image_source(src, flag, resolution, workers=workers)
            self.meta["n_images"] = n
        if self.kind == "adm-batch":
            self.meta["source"] = "ADM reference batch (mu, sigma, mu_s, sigma_s from ADM's evaluator)"

    def describe(self):
        """The reference's name, kind and what it records, for the result."""
        return {"reference": self.src, "reference_kind": self.kind,
                **{f"reference_{k}": v for k, v in self.meta.items()}}

    def check(self, mode, side):
        """One line unless the reference can stand beside samples of side `side` measured in `mode`
        (all it records is checked before any network is loaded)."""
        where = f"{self.flag} {self.src}"
        if self.kind == "stats":
            self.stats()                                    # a foreign file says what it is first
            if self.mode is None or self.resolution is None:
                raise UserError(f"{where} records no protocol / resolution (older or foreign statistics): "
                                f"rebuild it with fid --make-ref-stats")
        if self.kind == "adm-batch" and mode != "adm":
            raise UserError(f"{where} is an ADM reference batch: its mu / sigma come from ADM's evaluator and "
                            f"stand only beside --fid-mode adm; for {mode} mode, make statistics of its "
                            f"{self.meta['n_images']} images with --make-ref-stats OUT.npz --fid-mode {mode}")
        if self.mode is not None and self.mode != mode:
            raise UserError(f"{where} holds {self.mode}-mode statistics, the samples are measured in {mode} "
                            f"mode: pass --fid-mode {self.mode} or a reference made in {mode} mode")
        if self.resolution != side:
            raise UserError(f"{where} is at {self.resolution} px, the samples at {side} px: FID across "
                            f"resolutions is no number of either; use a reference made at {side} px")

    def check_network(self, ext):
        """One line unless statistics stored here were made by `ext`'s network (file and feature sizes)."""
        where = f"{self.flag} {self.src}"
        if self.kind == "stats" and self.meta.get("network_hash") not in (None, ext.network_hash):
            raise UserError(f"{where} was made with network file {self.meta['network_hash']}, this run uses "
                            f"{ext.network_hash} ({ext.name})")
        for keys, dim in ((("mu", "sigma"), ext.dims[0]), (("mu_s", "sigma_s"), ext.dims[1])):
            st = self.stats(*keys)
            if st is not None and dim is not None and len(st[0]) != dim:
                raise UserError(f"{where}: its {keys[0]} is {len(st[0])}-d, {ext.name} gives {dim}-d features")

    def array(self, key):
        if key not in self._cache:
            self._cache[key] = read_npz_array(self.src, key, self.flag)
        return self._cache[key]

    def stats(self, mu_key="mu", sigma_key="sigma"):
        """(mu, sigma) under those keys, checked to be finite and of matching sizes; None if absent."""
        if mu_key not in self.keys:
            return None
        mu, sigma = self.array(mu_key), self.array(sigma_key) if sigma_key in self.keys else None
        if not (sigma is not None and mu.ndim == 1 and sigma.shape == (len(mu), len(mu))
                and np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise UserError(f"{self.flag} {self.src}: reference statistics must be finite {mu_key} (D,) and "
                            f"{sigma_key} (D, D), got {mu.shape} and {None if sigma is None else sigma.shape}")
        return mu, sigma

    def images(self):
        """Its images as a uint8 batch stream (None for statistics alone)."""
        return None if self.kind == "stats" else self._images


def generation_metrics(extractor, fake, real=None, ref_stats=None, ref_spatial=None, k=3, is_split=None, adm=False):
    """gFID, sFID, IS and (with real images) precision / recall, all from one feature network.

    fake, real: streams of uint8 batches (or arrays (N, H, W, 3)); ref_stats / ref_spatial: (mu, sigma) of
    the reference's pool / sFID features, used instead of those of `real` when given (an ADM batch: its
    statistics for FID / sFID, its images for precision / recall, as ADM's evaluator does); adm: precision /
    recall from ADM's float16 distances.
    """
    fs, rs = FeatureMoments(), FeatureMoments()
    fm, ff, fp = extract(extractor, _batched(fake), keep=real is not None, spatial=fs)
    out = {"network": extractor.name, "n_fake": fm.n}
    if real is not None:
        rm, rf, _ = extract(extractor, _batched(real), spatial=rs)
        out["n_real"] = rm.n
        if min(fm.n, rm.n) > k:                                     # each point needs k other points
            out["precision"], out["recall"] = precision_recall(rf, ff, k, adm)
            out["pr_distances"] = "float16, as ADM's evaluator" if adm else "float64"
        else:
            out["pr_missing"] = (f"precision / recall need more than k = {k} images in each set "
                                 f"({fm.n} samples, {rm.n} reference images)")
        if ref_stats is None:                                       # everything from the reference images
            ref_stats, ref_spatial = rm.stats(), (rs.stats() if rs.n else None)
    out["fid"] = frechet_distance(*fm.stats(), *ref_stats)
    if fs.n and ref_spatial is not None:
        out["sfid"] = frechet_distance(*fs.stats(), *ref_spatial)
    out["is"], out["is_std"] = inception_score(fp, split_size=is_split)
    return out


def _batched(images, batch=100):
    """An array (N, H, W, 3) as batches; a stream passes through."""
    if isinstance(images, np.ndarray):
        return (images[i:i + batch] for i in range(0, len(images), batch))
    return images


def inception(a, d):
    return InceptionExtractor(find_inception(a.inception_path), d.device, mode=a.fid_mode)


def make_ref_stats(a, d, samples_side=None):
    """--make-ref-stats: pool and sFID statistics of --ref's images (a folder: ADM centre crop at
    --resolution, else at the side of --samples), stored with what they were made with."""
    src, n, side = image_source(a.ref, "--ref", a.resolution or samples_side, workers=a.workers)
    if a.resolution and side != a.resolution:
        raise UserError(f"--ref {a.ref} holds {side}-px images, not --resolution {a.resolution}")
    ext = inception(a, d)
    sm = FeatureMoments()
    mu, sigma = extract(ext, src, keep=False, spatial=sm)[0].stats()
    arrays = dict(mu=mu, sigma=sigma, fid_mode=ext.mode, resolution=side, n_images=n,
                  source=os.path.abspath(a.ref), network=ext.name, network_hash=ext.network_hash)
    if sm.n:
        arrays["mu_s"], arrays["sigma_s"] = sm.stats()
    with atomic_write(a.make_ref_stats) as f:
        np.savez(f, **arrays)
    how = "--resolution" if a.resolution else "its images' side" if a.ref.endswith(".npz") else "the side of --samples"
    log0(f"wrote reference statistics {a.make_ref_stats}: {n} images of {a.ref} at {side} px ({how}), "
         f"{ext.mode} mode, {ext.name} (file {ext.network_hash}){', with sFID' if sm.n else ''}")
def samples_manifest(samples):
    """The manifest.json `sample` wrote for a sample set (in FOLDER/ for FOLDER or FOLDER.npz), or None."""
    folder = samples[:-len(".npz")] if samples.endswith(".npz") else samples
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        return None
    return read_json(path, f"it records how the samples in {folder} were drawn; sample them again into a new --out")


def sample_set_protocol(samples):
    """How a sample set's class labels were drawn ('balanced' or 'random', from the manifest.json `sample` wrote;
    sets of earlier versions, without the entry, were balanced), or 'unknown' for a set without a manifest."""
    manifest = samples_manifest(samples)
    if manifest is None:
        return "unknown (no manifest.json of evaluate.py sample)"
    return manifest.get("labels", "balanced")


def sample_set_classes(samples):
    """The number of classes of the SiT a sample set was drawn from when it was trained on the built-in
    dead-leaves set (from the set's manifest), else None: class_acc_dl knows only those classes."""
    manifest = samples_manifest(samples) or {}
    return manifest.get("num_classes") if manifest.get("data") == "deadleaves" else None


def record_checkpoint(a):
    """With --record RUN: the checkpoint the samples came from, which must be RUN/last.pt as it is now
    (content hash): {path, step, content_hash}; one line otherwise."""
    if not a.samples:
        raise UserError(f"--record {a.record} records the metrics of --samples; none given")
    manifest, ck_path = samples_manifest(a.samples), os.path.join(a.record, "last.pt")
    if manifest is None or "step" not in manifest:
        raise UserError(f"--record {a.record}: {a.samples} has no manifest.json of `evaluate.py sample` naming the "
                        f"checkpoint and step they came from, so they cannot be recorded as that run's metrics")
    if not os.path.isfile(ck_path):
        raise UserError(f"--record {a.record}: no checkpoint {ck_path} there")
    current = file_hash(ck_path)
    if manifest["checkpoint"] != current:
        step = load_checkpoint(ck_path, "sit")["step"]
        raise UserError(f"--record {a.record}: {a.samples} were drawn from checkpoint {manifest['checkpoint']} "
                        f"(step {manifest['step']}), not from {ck_path} as it is now ({current}, step {step}): "
                        f"sample again from it, or record into the run the samples came from")
    return {"path": os.path.abspath(ck_path), "step": manifest["step"], "content_hash": current}


def cmd_fid(a, d):
    checkpoint = record_checkpoint(a) if a.record else None
    if a.features == "deadleaves":
        fake, _, side = image_source(a.samples, "--samples", a.resolution, workers=a.workers)
        ext = DeadLeavesExtractor(side, d.device, n_train=a.dl_train_images, steps=a.dl_steps)
        classes = sample_set_classes(a.samples)
        if classes is None:
            log0("class_acc_dl skipped: the samples' classes are not known to be the built-in dead-leaves classes "
                 "(it needs samples of `evaluate.py sample` from a SiT trained on --data deadleaves)")
        res = deadleaves_metrics(ext, np.concatenate(list(fake)), labels=sample_set_labels(a.samples),
                                 sample_classes=classes)
        return report_generation(a, res, checkpoint)
    if a.make_ref_stats:
        return make_ref_stats(a, d, image_source(a.samples, "--samples")[2] if a.samples else None)
    fake, n_fake, side = image_source(a.samples, "--samples", a.resolution, workers=a.workers)
    if a.resolution and side != a.resolution:
        raise UserError(f"--samples {a.samples} are {side}-px images, not --resolution {a.resolution}")
    ref = Reference(a.ref, side, workers=a.workers)
    ref.check(a.fid_mode, side)
    ext = inception(a, d)
    ref.check_network(ext)
    if n_fake < 50000:
        log0(f"note: {n_fake} samples; the papers' tables use 50 000 (FID is biased upwards with fewer)")
    res = generation_metrics(ext, fake, real=ref.images(), ref_stats=ref.stats(),
                             ref_spatial=ref.stats("mu_s", "sigma_s") if ref.kind != "images" else None,
                             is_split=IS_SPLIT if ext.mode == "adm" else None, adm=ext.mode == "adm")
    res = {"fid_mode": ext.mode, "network": ext.name, "network_hash": ext.network_hash, "resolution": side,
           **ref.describe(), **res}
    if "sfid" not in res:
        res["sfid_missing"] = ext.sfid_missing or "the reference has no sFID statistics (mu_s, sigma_s)"
    report_generation(a, res, checkpoint)


def report_generation(a, res, checkpoint=None):
    """Print the metrics with the label protocol of the samples; with --record RUN_DIR also keep them there for
    `compare` (generation_metrics.json, one entry per network), with the checkpoint (path, step, content hash)
    the samples came from."""
    labels = sample_set_protocol(a.samples)
    path = a.record and os.path.join(a.record, "generation_metrics.json")
    old = read_json(path, "delete it and record the metrics again") if a.record and os.path.isfile(path) else {}
    res = {"samples": a.samples, "labels": labels, **res, **({"checkpoint": checkpoint} if checkpoint else {})}
    if res.get("fid_mode") == "adm" and labels != "random":
        log0(f"note: the samples' labels are {labels}; the published tables (DiT, SiT, ADM) draw them uniformly at "
             f"random (sample --labels random), and class-balanced labels raise the Inception Score")
    log0(json.dumps(res, indent=1))
    if a.record:
        write_json(path, {**old, res["network"]: res})


# ----------------------------------------------------------------------------- offline metric for dead leaves

DL_NAME = "DL-net (a small CNN trained on dead-leaves classes and blur; not Inception)"


class DeadLeavesNet(torch.nn.Module):
    """A small CNN on dead-leaves images: features (B, 4 * width), class logits and sharp-vs-blurred logits."""

    def __init__(self, num_classes=10, width=16):
        super().__init__()
        c = width
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())                       # (B, 4c) features
        self.head = torch.nn.Linear(4 * c, num_classes)
        self.sharp = torch.nn.Linear(4 * c, 2)

    def forward(self, x):                                                          # x float (B, 3, S, S) in [-1, 1]
        f = self.body(x)
        return f, self.head(f), self.sharp(f)


def train_deadleaves_net(resolution, n_train=1000, steps=300, seed=0):
    """Train DeadLeavesNet once on dead-leaves images (seed 4242: not the images it is later asked about).

    Two tasks: the class (hue band and shape) and whether the image was blurred (Gaussian, sigma 0.5-2 px,
    half of each batch), so that the features see sharpness too: a class-only network is blind to blur.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ds = DeadLeaves(n=n_train, resolution=resolution, seed=4242)
    x = torch.stack([ds[i][0] for i in range(n_train)])
    y = torch.tensor([ds.label(i) for i in range(n_train)])
    net = DeadLeavesNet(ds.num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(0, n_train, (64,), generator=g)
        xb = x[idx].flip(-1) if torch.rand((), generator=g) < 0.5 else x[idx].clone()
        sigma = 0.5 + 1.5 * torch.rand((), generator=g).item()
        xb[32:] = fft_ops.gaussian_blur(xb[32:], sigma)
        blurred = (torch.arange(64) >= 32).long()
        _, cls, sharp = net(xb)
        loss = F.cross_entropy(cls, y[idx]) + F.cross_entropy(sharp, blurred)
        opt.zero_grad(), loss.backward(), opt.step()
    return net.eval()


class DeadLeavesExtractor:
    """The offline metric's network, trained once per resolution and cached (deterministic given the seed).

    __call__(uint8 (B, H, W, 3)) -> (features (B, 64), class probabilities (B, 10)), like InceptionExtractor.
    """

    name = DL_NAME
    metric = "fd_dl"

    def __init__(self, resolution, device="cpu", cache_dir=None, n_train=1000, steps=300):
        cache_dir = cache_dir or os.environ.get("FREQLDM_CACHE", os.path.expanduser("~/.cache/freqldm"))
        path = os.path.join(cache_dir, f"deadleaves-net2-r{resolution}-n{n_train}-s{steps}.pt")
        self.net = DeadLeavesNet()
        if os.path.isfile(path):
            self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            log0(f"training the dead-leaves feature network once ({n_train} images at {resolution} px) -> {path}")
            self.net = train_deadleaves_net(resolution, n_train, steps)
            os.makedirs(cache_dir, exist_ok=True)
            with atomic_write(path) as f:
                torch.save(self.net.state_dict(), f)
        self.net.to(device).eval().requires_grad_(False)
        self.device, self.cache_dir = device, cache_dir

    def reference_path(self, side, n_ref, seed):
        """Where the feature moments of the dead-leaves reference are cached: keyed by the network's weights,
        since rendering the reference images is the slow part of the metric."""
        h = hashlib.sha256()
        for _, t in sorted(self.net.state_dict().items()):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return os.path.join(self.cache_dir, f"deadleaves-ref-r{side}-n{n_ref}-seed{seed}-{h.hexdigest()[:16]}.npz")

    @torch.no_grad()
    def __call__(self, imgs):
        x = torch.from_numpy(np.asarray(imgs)).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device)
        f, logits, _ = self.net(x)
        return f.double().cpu().numpy(), torch.softmax(logits, 1).double().cpu().numpy()


def sample_set_labels(src):
    """The class labels a sample set was drawn with: arr_1 of its .npz (written by `sample`), or None for
    class-balanced ones (image i has class i mod K). A folder drawn with --labels random is refused: its
    labels are in the .npz beside it."""
    if src.endswith(".npz"):
        return read_npz_array(src, "arr_1", "--samples") if "arr_1" in npz_keys(src, "--samples") else None
    if (samples_manifest(src) or {}).get("labels", "balanced") != "balanced":
        raise UserError(f"{src} was drawn with --labels random: pass {src.rstrip('/')}.npz, which holds its labels")
    return None


def deadleaves_reference(extractor, side, n_ref=2000, seed=0):
    """DL-net feature moments of n_ref dead-leaves images at `side` px (the training set: seed 0), cached on
    disk beside the network (DeadLeavesExtractor.reference_path)."""
    path = extractor.reference_path(side, n_ref, seed) if hasattr(extractor, "reference_path") else None
    moments = FeatureMoments()
    if path and os.path.isfile(path):
        with np.load(path) as z:
            moments.n, moments.s, moments.ss = int(z["n"]), z["s"], z["ss"]
        return moments
    ref = DeadLeaves(n=n_ref, resolution=side, seed=seed)
    real = to_uint8(torch.stack([ref[i][0] for i in range(n_ref)]))
    moments = extract(extractor, _batched(real), keep=False)[0]
    if path:
        with atomic_write(path) as f:
            np.savez(f, n=moments.n, s=moments.s, ss=moments.ss)
    return moments


def deadleaves_metrics(extractor, fake, n_ref=2000, seed=0, labels=None, ref_moments=None, sample_classes=10):
    """Frechet distance in DL-net features against dead-leaves images (the training set: seed 0; or
    `ref_moments` from deadleaves_reference) and the accuracy with which DL-net recognises the intended class
    of the samples (`labels`, default class-balanced: image i has class i mod 10, as `sample` draws them by
    default), only when they were drawn from a model of the dead-leaves classes (`sample_classes` = 10; None:
    unknown). Named for what they are: fd_dl and class_acc_dl, never FID."""
    fake = np.asarray(fake)
    rm = ref_moments or deadleaves_reference(extractor, fake.shape[1], n_ref, seed)
    fm, _, fp = extract(extractor, _batched(fake), keep=False)
    out = {"network": extractor.name, "n_fake": fm.n, "n_real": rm.n,
           "fd_dl": frechet_distance(*fm.stats(), *rm.stats())}
    if sample_classes == fp.shape[1]:                           # the dead-leaves classes (DL-net's head)
        labels = np.arange(len(fake)) % sample_classes if labels is None else np.asarray(labels)
        if len(labels) != len(fake):
            raise UserError(f"{len(fake)} samples but {len(labels)} labels")
        out["class_acc_dl"] = float((fp.argmax(1) == labels).mean())
    return out


DAMAGES = {                                 # known damage of held-out images, each family by increasing amount
    "blur sigma (px)": (0.5, 1.0, 2.0),
    "noise std": (0.05, 0.1, 0.2),
    "low-pass r0": (0.4, 0.2, 0.1),
}


def damage(x, family, amount, seed):
    """Held-out images x (B, 3, H, W) in [-1, 1] with one known damage of DAMAGES (clamped to [-1, 1])."""
    if family.startswith("blur"):
        return fft_ops.gaussian_blur(x, amount)
    if family.startswith("noise"):
        g = torch.Generator().manual_seed(derive_seed(seed, "damage-noise", int(amount * 1e6)))
        return (x + amount * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return fft_ops.lowpass(x, amount).clamp(-1, 1)


def cmd_metric_check(a, d):
    """Does the offline sample metric see damage? On --subsets disjoint sets of --n held-out dead-leaves images
    (seed --heldout-seed: no run trains on it), fd_dl of the undamaged images (the metric's floor) and of each
    known damage (DAMAGES): a usable metric rises monotonically with each damage above that floor, by more than
    its spread over the subsets (sample std), which is also what two sample sets of one model differ by."""
    if not d.main:
        return
    ext = DeadLeavesExtractor(a.image_size, d.device, n_train=a.dl_train_images, steps=a.dl_steps)
    ref = deadleaves_reference(ext, a.image_size)
    pool = DeadLeaves(n=a.n * a.subsets, resolution=a.image_size, seed=a.heldout_seed)
    rows = {"undamaged": []}
    for k in range(a.subsets):                                     # disjoint subsets: images k, k + S, ...
        idx = list(range(k, a.n * a.subsets, a.subsets))
        x = torch.stack([pool[i][0] for i in idx])                  # (n, 3, S, S)
        labels = np.array([pool.label(i) for i in idx])
        score = lambda imgs: deadleaves_metrics(ext, to_uint8(imgs), labels=labels, ref_moments=ref)["fd_dl"]
        rows["undamaged"].append(score(x))
        for family, amounts in DAMAGES.items():
            for amount in amounts:
                rows.setdefault(f"{family} {amount:g}", []).append(score(damage(x, family, amount, a.seed + k)))
    stat = {name: (float(np.mean(v)), float(np.std(v, ddof=1))) for name, v in rows.items()}
    floor, spread = stat["undamaged"]
    verdict = {}
    for family, amounts in DAMAGES.items():
        means = [floor] + [stat[f"{family} {x:g}"][0] for x in amounts]
        steps = np.diff(means)
        verdict[family] = {"monotonic": bool((steps > 0).all()), "smallest_step": float(steps.min()),
                           "steps_above_spread": bool((steps > spread).all())}
    lines = [f"fd_dl ({DL_NAME}; reference: {ref.n} dead-leaves images of seed 0) of {a.n} held-out dead-leaves "
             f"images (seed {a.heldout_seed}) at {a.image_size} px; mean ± sample std over {a.subsets} disjoint "
             f"subsets", "", "| images | fd_dl |", "|---|---|"]
    lines += [f"| {name} | {m:.3f} ± {sd:.3f} |" for name, (m, sd) in stat.items()]
    lines += ["", "| damage | rises monotonically from the floor | smallest rise | every rise above the spread "
              f"({spread:.3f}) |", "|---|---|---|---|"]
    lines += [f"| {f} | {'yes' if v['monotonic'] else 'NO'} | {v['smallest_step']:+.3f} | "
              f"{'yes' if v['steps_above_spread'] else 'NO'} |" for f, v in verdict.items()]
    text = "\n".join(lines)
    os.makedirs(a.out, exist_ok=True)
    write_json(os.path.join(a.out, "metric_check.json"), {
        "metric": "fd_dl", "network": DL_NAME, "dl_train_images": a.dl_train_images, "dl_steps": a.dl_steps,
        "n": a.n, "subsets": a.subsets, "heldout_seed": a.heldout_seed, "image_size": a.image_size,
        "values": rows, "mean_std": stat, "verdict": verdict,
        "usable": all(v["monotonic"] and v["steps_above_spread"] for v in verdict.values())})
    with atomic_write(os.path.join(a.out, "metric_check.md"), text=True) as f:
        f.write(text + "\n")
    log0(f"{text}\n-> {a.out}/metric_check.md, metric_check.json", d)


# ----------------------------------------------------------------------------- reconstruction metrics

SSIM_SIDE = 11                                              # SSIM's window: the smallest image it can score


def ssim(x, y, sigma=1.5, radius=5):
    """SSIM (Wang et al. 2004) with an 11-tap Gaussian window on [0, 1] images, per image (B,)."""
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    C = x.shape[1]

    def blur(t):                                            # valid separable Gaussian filtering
        t = F.conv2d(t, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
        return F.conv2d(t, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


HF_RADIUS = 0.25
HF_NAME = f"latent_hf_ratio@{HF_RADIUS}"
HF_DEFINITION = (f"{HF_NAME}: share of the latent's spectral energy at radius > {HF_RADIUS} cycles/latent pixel, "
                 f"per-channel mean (DC) removed first")


def find_vgg(path=None):
    """torchvision's VGG16 weights for LPIPS: `path`, else torchvision's hub cache; one line otherwise."""
    return find_vgg_weights(path, flag="--vgg-path", needed_by="LPIPS", otherwise="")


def load_lpips(path, device):
    """LPIPS v0.1, VGG (Zhang et al. 2018; Denoising-VAE Table 2): the `lpips` package's learned linear heads
    (shipped inside it) on torchvision's VGG16 read from `path`; inputs in [-1, 1]. Nothing is downloaded."""
    import warnings
    import lpips
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                      # torchvision's deprecation note on `pretrained`
        net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)   # pnet_rand: the trunk is not downloaded
    try:
        vgg = torch.load(path, map_location="cpu", weights_only=True)
        # lpips keeps VGG's layer indices: its slice1.0.weight is torchvision's features.0.weight
        net.net.load_state_dict({k: vgg["features." + k.split(".", 1)[1]] for k in net.net.state_dict()})
    except Exception as e:
        raise UserError(f"{path} is not torchvision's VGG16 weights {VGG16_FILE} ({type(e).__name__}: "
                        f"{str(e)[:80]})") from None
    net.net_file = f"{os.path.basename(path)} {file_hash(path)}"
    return net.eval().requires_grad_(False).to(device)


@torch.no_grad()
def recon_table(ae, batches, extractor=None, hf_radius=HF_RADIUS, lpips=None):
    """Per MLSR level l: PSNR / SSIM of D(S_l(z)) vs x, latent HF ratio of S_l(z); with an extractor rFID,
    rsFID (sFID features) and the Inception Score of the reconstructions; with `lpips` LPIPS vs x.

    One pass over `batches` (float images (b, 3, H, W) in [-1, 1]): each batch is encoded once and decoded
    at every level; only per-image scores, running feature moments and one IS chunk are kept
    (Denoising-VAE Tables 1, 2).
    """
    L = len(ae.mlsr_fractions)
    p, s, hf, lp = ([[] for _ in range(L)] for _ in range(4))
    real_m, real_s = FeatureMoments(), FeatureMoments()
    fake_m, fake_s, score = ([FeatureMoments() for _ in range(L)], [FeatureMoments() for _ in range(L)],
                             [StreamedIS() for _ in range(L)])
    for x in batches:
        x = x.to(ae.device).float()
        if extractor is not None:
            f, _, *sp = extractor(to_uint8(x))
            real_m.add(f)
            if sp and sp[0] is not None:
                real_s.add(sp[0])
        for level, (r, ps, h) in enumerate(level_scores(ae, x, hf_radius)):   # encode once, decode per level
            p[level].append(ps), s[level].append(ssim(r, x)), hf[level].append(h)
            if lpips is not None:
                lp[level].append(lpips(r, x).flatten().cpu())
            if extractor is not None:
                f, pr, *sp = extractor(to_uint8(r))
                fake_m[level].add(f), score[level].add(pr)
                if sp and sp[0] is not None:
                    fake_s[level].add(sp[0])
    rows = []
    for level in range(L):
        row = {"level": level, "psnr": torch.cat(p[level]).mean().item(), "ssim": torch.cat(s[level]).mean().item(),
               f"latent_hf_ratio@{hf_radius}": torch.cat(hf[level]).mean().item(), "n_images": sum(map(len, p[level]))}
        if lpips is not None:
            row["lpips"] = torch.cat(lp[level]).mean().item()
        if extractor is not None:
            row["rfid"] = frechet_distance(*fake_m[level].stats(), *real_m.stats())
            if real_s.n:
                row["rsfid"] = frechet_distance(*fake_s[level].stats(), *real_s.stats())
            row["is"], row["is_std"] = score[level].result()
            row["rfid_network"] = extractor.name
            row["network_hash"] = getattr(extractor, "network_hash", None)
        rows.append(row)
    return rows


def eval_batches(a, ae, image_size, n_default, d, batch=64):
    """Float image batches of a seeded random subset of --n images of --data (all of it with --n all)."""
    ds = build_dataset(a.data, image_size, n=a.n_images, seed=0)
    n = None if (a.n or n_default) == "all" else int(a.n or n_default)
    if n is not None and n < 1:
        raise UserError(f"--n must be at least 1 (or 'all'), got {n}")
    idx = random_subset(len(ds), n, a.seed)
    return image_batches(ds, idx, batch, a.workers), len(idx)


def evaluated_fractions(a, ae):
    """The p_l that recon / diagnose apply (--mlsr-fractions, else the autoencoder's own), and their source."""
    if a.mlsr_fractions:
        ae.mlsr_fractions = tuple(a.mlsr_fractions)
        return {"mlsr_fractions": list(ae.mlsr_fractions), "mlsr_fractions_source": "--mlsr-fractions"}
    return {"mlsr_fractions": list(ae.mlsr_fractions), "mlsr_fractions_source": f"those of {ae.name}"}


def cmd_recon(a, d):
    ae = load_autoencoder(a.vae, d.device)
    fractions = evaluated_fractions(a, ae)
    ext = lp = None
    try:
        ext = inception(a, d)
    except UserError as e:
        log0(f"rFID skipped: {e}")
    vgg = find_vgg(a.vgg_path) if a.vgg_path else None             # an explicit file must exist
    try:
        lp = load_lpips(vgg or find_vgg(), d.device)
    except UserError as e:
        if vgg:
            raise
        log0(f"LPIPS skipped: {e}")
    size = resolve_image_size(ae, a.image_size)
    if size < SSIM_SIDE:
        raise UserError(f"recon needs images of at least {SSIM_SIDE} px (SSIM's {SSIM_SIDE}-tap window), "
                        f"got {size} px; use a larger --image-size")
    batches, n = eval_batches(a, ae, size, "all" if ext is not None else 1000, d)
    if ext is not None and n < 2048:
        log0(f"WARNING: rFID from {n} images (fewer than the 2048 feature dimensions) is heavily biased; "
             f"the papers' protocol uses all 50 000 ImageNet validation images (--n all)")
    if ext is not None and n < 2:
        ext = None
        log0(f"rFID skipped: it needs at least 2 images, got {n}")
    rows = recon_table(ae, batches, extractor=ext, lpips=lp)
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |" for r in rows]
    lpips_name = f" / LPIPS v0.1 VGG ({lp.net_file})" if lp else ""
    protocol = {"image_metrics": f"PSNR / SSIM{lpips_name} on [-1, 1] images",
                "hf_definition": HF_DEFINITION, **fractions}
    if ext is not None:
        protocol.update(fid_mode=ext.mode, network=ext.name, network_hash=ext.network_hash,
                        rsfid=RSFID_DEFINITION if ext.sfid_missing is None else f"skipped: {ext.sfid_missing}",
                        inception_score=f"of the reconstructions, chunks of {IS_SPLIT} images (ADM)")
    log0(f"reconstruction of {ae.name} on {n} random images of {a.data} (seed {a.seed}); "
         + "; ".join(f"{k}: {v}" for k, v in protocol.items()) + ":\n" + "\n".join(lines))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        write_json(os.path.join(a.out, "recon.json"), {"autoencoder": ae.name, "data": a.data, "n_images": n,
                                                       "seed": a.seed, **protocol, "rows": rows})


# ----------------------------------------------------------------------------- frequency diagnosis (FreqWarm)

RADII = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)


def cumulative_energy(x, radii):
    """F2: fraction of spectral energy (per-image mean removed) within each radius, (len(radii),)."""
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    P = torch.fft.fft2(x.float()).abs().pow(2).sum(dim=(0, 1))              # (H, W)
    rad = fft_ops.radius_grid(*x.shape[-2:], device=x.device)
    return [(P * (rad <= r)).sum().item() / P.sum().clamp(min=1e-20).item() for r in radii]


@torch.no_grad()
def diagnose(ae, x, normalize, radii=RADII, r0_sweep=R0_SWEEP, hf_radius=HF_RADIUS):
    """Findings 1-3 and per-level latent spectra of autoencoder `ae` on images x (B, 3, H, W), as lists.

    F1: PSNR of D(z_low), D(z_high) with (z_low, z_high) = split(z, r) for each radius r.
    F2: cumulative RGB energy within radius r.  F3: latent HF energy (and ratio) of E(lowpass(x, r0)).
    """
    z = ae.encode(x)                                                        # (B, C, h, w)
    out = {"radii": list(radii), "f1_psnr_low": [], "f1_psnr_high": []}
    for r in radii:                                                         # F1
        low, high = fft_ops.split_frequencies(z, r)
        out["f1_psnr_low"].append(psnr(ae.decode(low).clamp(-1, 1), x).mean().item())
        out["f1_psnr_high"].append(psnr(ae.decode(high).clamp(-1, 1), x).mean().item())
    out["f2_radii"] = [i / 100 for i in range(0, 72)]                       # F2
    out["f2_cumulative_energy"] = cumulative_energy(x, out["f2_radii"])
    out["f3_r0"], out["f3_latent_hf_energy"], out["f3_latent_hf_ratio"] = list(r0_sweep), [], []
    per_image = []
    for r0 in r0_sweep:                                                     # F3
        energy, ratio = f3_scores(ae, x, normalize, r0, hf_radius)         # (B,) each
        per_image.append(energy)
        out["f3_latent_hf_energy"].append(energy.mean().item())
        out["f3_latent_hf_ratio"].append(ratio.mean().item())
    out["f3_peak_r0"] = f3_peak(r0_sweep, out["f3_latent_hf_energy"])       # None: no interior peak
    if len(x) >= 2 * F3_SUBSETS:                                            # its spread: disjoint image subsets
        e = torch.stack(per_image, 1)                                       # (B, len(r0_sweep))
        test = f3_peak_test(r0_sweep, [e[k::F3_SUBSETS].mean(0).tolist() for k in range(F3_SUBSETS)])
        out["f3_subsets"] = {"n_subsets": F3_SUBSETS, "std": test["std"], "peak": test["peak"],
                             "height": test["height"], "height_std": test["height_std"], "stands": test["stands"]}
    out["f3_hf_radius"], out["hf_definition"] = hf_radius, HF_DEFINITION
    out["spectra"] = {}
    for level in range(len(ae.mlsr_fractions)):                             # latent spectra per MLSR level
        rr, p = fft_ops.radial_power_spectrum(fft_ops.attenuate(normalize(z), level, ae.mlsr_fractions))
        out["spectra"][level] = p.tolist()
    out["spectra_radii"] = rr.tolist()
    return out


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def plot_diagnosis(res, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figs = {
        "f1_band_psnr.png": (res["radii"], [("D(z_low)", res["f1_psnr_low"]), ("D(z_high)", res["f1_psnr_high"])],
                             "latent mask radius r (cycles/pixel)", "PSNR vs x (dB)", "F1: decoding one latent band"),
        "f2_cumulative_energy.png": (res["f2_radii"], [("RGB", res["f2_cumulative_energy"])], "radius (cycles/pixel)",
                                     "cumulative energy fraction", "F2: RGB energy within radius"),
        "f3_latent_hf_vs_r0.png": (res["f3_r0"], [(f"energy at r > {res['f3_hf_radius']}", res["f3_latent_hf_energy"])],
                                   "RGB low-pass radius r0 (cycles/pixel)", "latent high-frequency energy",
                                   "F3: latent HF energy vs input low-pass"),
    }
    for name, (xs, series, xl, yl, title) in figs.items():
        fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
        for label, ys in series:
            ax.plot(xs, ys, marker="o", ms=3, label=label)
        ax.set(xlabel=xl, ylabel=yl, title=title)
        ax.legend(fontsize=8), ax.grid(alpha=0.3)
        save_figure(fig, os.path.join(out_dir, name))
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    for level, p in res["spectra"].items():
        ax.semilogy(res["spectra_radii"], np.maximum(p, 1e-12), label=f"S_{level}(z)")
    ax.set(xlabel="radius (cycles/latent pixel)", ylabel="power", title="Latent spectra per MLSR level")
    ax.legend(fontsize=8), ax.grid(alpha=0.3)
    save_figure(fig, os.path.join(out_dir, "latent_spectra_levels.png"))


def cmd_diagnose(a, d):
    ae = load_autoencoder(a.vae, d.device)
    fractions = evaluated_fractions(a, ae)
    batches, n = eval_batches(a, ae, resolve_image_size(ae, a.image_size), 256, d)
    x = torch.cat(list(batches)).to(d.device)
    stats = ae.stats or latent_stats(ae.encode, ae.latent_dim, x.split(64), d.device, ae.mlsr_fractions)
    log0(f"latent statistics: those of {ae.name}" if ae.stats else f"latent statistics: computed over the {n} images")
    space = LatentSpace(stats, ae.mlsr_fractions, device=d.device)
    res = diagnose(ae, x, space.normalize)
    res.update(autoencoder=ae.name, data=a.data, n_images=n, seed=a.seed, **fractions)
    os.makedirs(a.out, exist_ok=True)
    write_json(os.path.join(a.out, "diagnosis.json"), res)
    plot_diagnosis(res, a.out)
    i02 = res["f3_r0"].index(0.2)
    log0(f"diagnosis of {ae.name} on {n} random images of {a.data} (seed {a.seed}; MLSR fractions "
         f"{fractions['mlsr_fractions']}, {fractions['mlsr_fractions_source']}) -> {a.out}/diagnosis.json "
         f"and 4 PNG figures\n"
         f"  F1 PSNR at r=0.25: D(z_low) {res['f1_psnr_low'][4]:.2f} dB, D(z_high) {res['f1_psnr_high'][4]:.2f} dB\n"
         f"  F2 RGB energy within r=0.2: {res['f2_cumulative_energy'][20]:.3f}\n"
         f"  F3 latent HF energy: r0=0.2 {res['f3_latent_hf_energy'][i02]:.4f} vs full {res['f3_latent_hf_energy'][-1]:.4f}; "
         + describe_peak(res))


def describe_peak(res):
    """diagnose's F3 peak in words: with image subsets, their mean curve's peak and its height (the numbers
    --r0 auto judges); else the peak of the curve over all images."""
    sub = res.get("f3_subsets")
    if sub is None:
        return f"peak at r0 = {res['f3_peak_r0']:g}" if res["f3_peak_r0"] is not None else "no interior peak"
    if sub["peak"] is None:
        return f"no interior peak (mean over {sub['n_subsets']} image subsets)"
    return (f"{describe_peak_height(sub)} over {sub['n_subsets']} image subsets: "
            f"{'stands above' if sub['stands'] else 'within'} its spread")


# ----------------------------------------------------------------------------- the mechanism: latent spectra

SPECTRUM_HF_RADIUS = 0.25
SPECTRUM_NAME = "latent_hf_log_ratio"
SPECTRUM_DEFINITION = (
    f"{SPECTRUM_NAME}: ln(P_gen / P_real), P = the mean power per frequency bin at radius > {SPECTRUM_HF_RADIUS} "
    f"cycles/latent pixel (orthonormal FFT, each channel's spatial mean removed, averaged over channels and "
    f"images) of the SiT's generated latents before decoding (P_gen) and of real full-frequency latents of the "
    f"same autoencoder in the same normalised space and level (P_real: held-out images of the run's data); 0: the "
    f"generated latents carry the real high frequencies, < 0: they lack them (FreqWarm's mechanism)")


def latent_power(z):
    """Power per frequency bin (h, w), fft order, of latents z (N, C, h, w): each channel's spatial mean
    removed, orthonormal FFT (white noise of variance s^2 gives s^2 everywhere), averaged over images and channels."""
    z = z.float() - z.float().mean(dim=(-2, -1), keepdim=True)
    return torch.fft.fft2(z, norm="ortho").abs().pow(2).mean(dim=(0, 1))


def spectrum_comparison(z_gen, z_real, hf_radius=SPECTRUM_HF_RADIUS):
    """Generated against real latents (N, C, h, w), per radius band and in one number (SPECTRUM_DEFINITION):
    {radii, power_gen, power_real, log_ratio per band, latent_hf_log_ratio}. Bands are 1 / h wide (fft_ops)."""
    if z_gen.shape[1:] != z_real.shape[1:]:
        raise UserError(f"generated latents {tuple(z_gen.shape[1:])} and real ones {tuple(z_real.shape[1:])} "
                        f"differ in shape: not latents of one autoencoder")
    p_gen, p_real = latent_power(z_gen), latent_power(z_real)                       # (h, w) each
    h, w = p_gen.shape
    rad = fft_ops.radius_grid(h, w, device=p_gen.device)
    b = torch.round(rad * min(h, w)).long().flatten()                                # the radial bands
    n = int(b.max()) + 1
    band = lambda p: (torch.zeros(n, dtype=torch.float64).index_add_(0, b, p.flatten().double())
                      / torch.zeros(n, dtype=torch.float64).index_add_(0, b, torch.ones(h * w, dtype=torch.float64)))
    bg, br = band(p_gen), band(p_real)
    hf = rad > hf_radius
    return {"radii": [i / min(h, w) for i in range(n)], "power_gen": bg.tolist(), "power_real": br.tolist(),
            "log_ratio": torch.log(bg.clamp(min=1e-30) / br.clamp(min=1e-30)).tolist(),
            "hf_power_gen": p_gen[hf].mean().item(), "hf_power_real": p_real[hf].mean().item(),
            SPECTRUM_NAME: math.log(max(p_gen[hf].mean().item(), 1e-30) / max(p_real[hf].mean().item(), 1e-30)),
            "hf_radius": hf_radius, "n_gen": len(z_gen), "n_real": len(z_real), "definition": SPECTRUM_DEFINITION}


@torch.no_grad()
def real_latents(ck, ae, space, n, device, data=None, batch=64):
    """Full-frequency latents of up to n images the run held out (its validation images; a seeded random subset
    of its data when it held none out), normalised and at the run's level as the SiT sees them: (n, C, h, w)."""
    cfg = ck["config"]
    dataset = build_dataset(data or cfg["data"], cfg["image_size"], n=cfg.get("n_images"), seed=cfg.get("seed", 0))
    train_idx, val_idx = train_val_split(len(dataset), cfg.get("val_images", 0), cfg.get("seed", 0))
    idx = val_idx[:n] if val_idx else [train_idx[i] for i in random_subset(len(train_idx), n, cfg.get("seed", 0))]
    zs = [space.at_level(space.normalize(ae.encode(x.to(device).float())), cfg.get("denoise_level", 0))
          for x in image_batches(dataset, idx, batch, 0)]
    return torch.cat(zs)


@torch.no_grad()
def checkpoint_spectrum(ema, ae, space, ck, a, device, n, real=None):
    """spectrum_comparison of n latents drawn as a sample set of `a`'s settings draws images 0..n-1 (the
    same streams, so these are that set's first latents) against the run's real latents (`real`, else made)."""
    labels = sample_labels(n, ema.num_classes, a.labels, a.seed)
    z = torch.cat([draw_latents(ema, list(range(i, min(i + a.batch, n))), labels, a, device).float()
                   for i in range(0, n, a.batch)])
    if not torch.isfinite(z).all():
        raise UserError(f"the latents drawn from {a.ckpt} are not finite (--cfg-scale {a.cfg_scale})")
    real = real if real is not None else real_latents(ck, ae, space, n, device, getattr(a, "data", None))
    return spectrum_comparison(z, real)


def plot_spectra(series, path, title):
    """Radial power of generated latents (one line per entry of series: label -> spectrum_comparison result)
    beside the real latents' (dashed), log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.8, 3.3), dpi=120)
    first = next(iter(series.values()))
    ax.semilogy(first["radii"], first["power_real"], "k--", label="real latents")
    for label, res in series.items():
        ax.semilogy(res["radii"], res["power_gen"], marker="o", ms=2.5, label=f"{label}: {res[SPECTRUM_NAME]:+.3f}")
    ax.axvline(first["hf_radius"], color="gray", lw=0.8, ls=":")
    ax.set(xlabel="radius (cycles/latent pixel)", ylabel="power per bin", title=title)
    ax.legend(fontsize=7, title=SPECTRUM_NAME, title_fontsize=7), ax.grid(alpha=0.3)
    save_figure(fig, path)


@torch.no_grad()
def cmd_spectrum(a, d):
    """The latent spectrum of one checkpoint's samples against real latents (SPECTRUM_DEFINITION)."""
    a.ckpt = checkpoint_path(a.ckpt)                                     # a run folder: its last.pt
    record = a.record and os.path.join(a.record, "last.pt")
    if record and not (os.path.isfile(a.ckpt) and os.path.isfile(record) and file_hash(a.ckpt) == file_hash(record)):
        raise UserError(f"--record {a.record}: {a.ckpt} is not {record} as it is now, so its spectrum is not that "
                        f"run's: pass --ckpt {record}, or record into the run the checkpoint belongs to")
    ema, ae, space, ck = load_sit(a.ckpt, d.device, a.vae)
    if not d.main:
        return
    res = checkpoint_spectrum(ema, ae, space, ck, a, d.device, a.num_samples)
    res.update(checkpoint=a.ckpt, checkpoint_hash=file_hash(a.ckpt) if os.path.isfile(a.ckpt) else None,
               step=ck["step"], sampler=a.sampler, sample_steps=a.sample_steps, cfg_scale=a.cfg_scale,
               cfg_interval=list(a.cfg_interval), labels=a.labels, seed=a.seed, autoencoder=ae.name)
    if record:                                      # for `compare`, beside the validation loss and fd_dl
        path = os.path.join(a.record, "generation_metrics.json")
        old = read_json(path, "delete it and record the metrics again") if os.path.isfile(path) else {}
        write_json(path, {**old, SPECTRUM_NAME: {
            SPECTRUM_NAME: res[SPECTRUM_NAME], "definition": SPECTRUM_DEFINITION, "labels": a.labels,
            "n_gen": res["n_gen"], "n_real": res["n_real"], "sampler": a.sampler, "sample_steps": a.sample_steps,
            "cfg_scale": a.cfg_scale, "seed": a.seed,
            "checkpoint": {"path": os.path.abspath(record), "step": ck["step"], "content_hash": res["checkpoint_hash"]}}})
    os.makedirs(a.out, exist_ok=True)
    write_json(os.path.join(a.out, "spectrum.json"), res)
    plot_spectra({f"step {ck['step']}": res}, os.path.join(a.out, "spectrum.png"),
                 f"Latent spectra, {a.num_samples} samples vs real")
    log0(f"{SPECTRUM_NAME} = {res[SPECTRUM_NAME]:+.4f} ({a.ckpt}, step {ck['step']}; {a.num_samples} latents drawn "
         f"with {a.sampler} x {a.sample_steps}, CFG {a.cfg_scale}, {a.labels} labels, seed {a.seed}, against "
         f"{res['n_real']} real latents of {ae.name}) -> {a.out}/spectrum.json, spectrum.png\n  {SPECTRUM_DEFINITION}",
         d)


# ----------------------------------------------------------------------------- comparing runs

IGNORED_IN_GROUPS = {"seed", "out", "explicit", "preset_set", "inert", "resume", "overwrite", "workers", "device",
                     "compile", "no_bf16", "log_every", "ckpt_every", "sample_every", "preset", "on_nonfinite",
                     "log_to", "keep_every", "sampler", "sample_steps", "cfg_scale", "dist_timeout"}
FINAL_KEYS = ("val_loss", "val_psnr_l0", "val_psnr_l3", "fd_dl", "class_acc_dl", "fid", SPECTRUM_NAME)


def run_summary(run_dir):
    """A run folder's settings, validation curve and final metrics (last validation line, recorded metrics).

    Recorded generation metrics count only when they are of the run's checkpoint as it is now (content hash);
    the others are left out and named in `stale`."""
    ck_path = os.path.join(run_dir, "last.pt")
    if not os.path.isfile(ck_path):
        raise UserError(f"{run_dir} holds no run (no last.pt)")
    ck = torch.load(ck_path, map_location="cpu", weights_only=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    lines = read_jsonl(metrics) if os.path.isfile(metrics) else []
    val = [r for r in lines if "loss" not in r and len(r) > 1]
    final = {k: v for k, v in (val[-1] if val else {}).items() if k in FINAL_KEYS}
    gm_path, stale, labels = os.path.join(run_dir, "generation_metrics.json"), [], {}
    if os.path.isfile(gm_path):
        current = file_hash(ck_path)
        records = read_json(gm_path, "delete it and record the metrics again (fid --record)")
        for net, res in records.items():
            keys = [k for k in res if k in FINAL_KEYS]
            rec = res.get("checkpoint") or {}
            if rec.get("content_hash") == current:
                final.update({k: res[k] for k in keys})
                labels.update({k: res.get("labels", "unknown") for k in keys})    # how the samples were drawn
            elif keys:
                of = f"step {rec['step']} (checkpoint {rec['content_hash']})" if rec else "an unrecorded checkpoint"
                stale.append(f"{run_dir}: {', '.join(keys)} ({net}) are of {of}, not of its last.pt now "
                             f"(step {ck.get('step')}): sample again and rerun fid --record")
    return {"dir": run_dir, **run_settings(ck), "step": ck.get("step"), "val": val, "final": final, "stale": stale,
            "labels": labels}


def run_settings(ck):
    """What a run was asked to do, as compare and curve group it: its settings without those it recorded as inert
    (common.check_needs: they acted on nothing), and --r0 auto as asked, 'auto', whatever r0 its seed's curve
    chose (kept as r0_chosen, from the checkpoint's freqwarm.auto)."""
    config = dict(ck.get("config", {}))
    for k in config.get("inert", ()):
        config.pop(k, None)
    auto = (ck.get("freqwarm") or {}).get("auto")
    if auto:
        config["r0"] = "auto"
    return {"config": config, "r0_chosen": auto["chosen"] if auto else None}


def labels_cell(label, rs):
    """The label protocol of a group's recorded sample metrics ('random', or per metric when they differ);
    one line if runs of the group recorded one metric from samples drawn differently (no mean over them)."""
    per_key = {}
    for r in rs:
        for k, v in r["labels"].items():
            per_key.setdefault(k, {}).setdefault(v, r["dir"])
    mixed = {k: v for k, v in per_key.items() if len(v) > 1}
    if mixed:
        k, v = next(iter(mixed.items()))
        raise UserError(f"runs '{label}' recorded {k} of samples drawn with different labels "
                        f"({', '.join(f'{p} in {d}' for p, d in v.items())}): sample them the same way")
    protocols = {k: next(iter(v)) for k, v in per_key.items()}
    if len(set(protocols.values())) <= 1:
        return next(iter(protocols.values()), "-")
    return ", ".join(f"{k} {p}" for k, p in sorted(protocols.items()))


def group_runs(runs):
    """Runs that differ only in seed (and bookkeeping) form a group, labelled by the settings that differ between
    the runs they acted in (one that was idle in a run is not in its settings: run_settings; a run that differs
    in it differs in the setting that made it idle) and, for --r0 auto, the r0 each run chose."""
    keys = sorted({k for r in runs for k in r["config"]} - IGNORED_IN_GROUPS)
    varying = [k for k in keys if len({json.dumps(r["config"][k]) for r in runs if k in r["config"]}) > 1]
    groups = {}
    for r in runs:
        parts = [f"{k}={r['config'][k]}" for k in varying if k in r["config"]]
        parts += ["r0=auto"] if r.get("r0_chosen") is not None and "r0" not in varying else []
        groups.setdefault(", ".join(parts) or "all runs", []).append(r)
    chosen = {label: [r.get("r0_chosen") for r in rs] for label, rs in groups.items()}
    return {label + (f" (r0 chosen: {', '.join(f'{c:g}' for c in chosen[label])})"
                     if any(c is not None for c in chosen[label]) else ""): rs for label, rs in groups.items()}


def check_distinct_runs(cmd, runs, groups):
    """A spread over seeds needs distinct runs: the same folder twice, or two runs of one setting with the same
    seed (e.g. a run and its copy), would show an invented spread; one line instead."""
    seen = {}
    for r in runs:
        key = os.path.realpath(r["dir"])
        if key in seen:
            raise UserError(f"{cmd}: {r['dir']} is given twice (as {seen[key]}): a spread over seeds needs "
                            f"distinct runs")
        seen[key] = r["dir"]
    for rs in groups.values():
        seeds = [r["config"].get("seed") for r in rs]
        dup = next((s for s in seeds if seeds.count(s) > 1), None)
        if dup is not None:
            both = [r["dir"] for r in rs if r["config"].get("seed") == dup]
            raise UserError(f"{cmd}: {' and '.join(both[:2])} have the same settings and the same seed {dup}: "
                            f"a spread over seeds needs runs with distinct --seed")


def mean_spread(values):
    """'mean ± std' over seeds (sample std), or the single value."""
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.4f}" if len(v) == 1 else f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"


def markdown_table(header, rows):
    """A markdown table: every row has as many cells as the header."""
    assert all(len(r) == len(header) for r in rows)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                      ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def cmd_compare(a, d):
    check_distinct_runs("compare", [{"dir": r} for r in a.runs], {})
    runs = [run_summary(r) for r in a.runs]
    groups = group_runs(runs)
    check_distinct_runs("compare", runs, groups)
    cols = [k for k in FINAL_KEYS if any(k in r["final"] for r in runs)]
    sampled = any(r["labels"] for r in runs)            # metrics of samples: say how their labels were drawn
    rows = []
    for label, rs in groups.items():
        steps = sorted({r["step"] for r in rs})
        if len(steps) > 1:                          # a mean over seeds is only a number at one step
            raise UserError(f"runs '{label}' differ only in seed but stand at steps {' and '.join(map(str, steps))} "
                            f"({', '.join(r['dir'] for r in rs)}): finish them, or compare them separately")
        cells = [mean_spread([r["final"][k] for r in rs if k in r["final"]]) if any(k in r["final"] for r in rs)
                 else "-" for k in cols]
        seeds = ",".join(str(r["config"].get("seed")) for r in rs)
        steps = ",".join(sorted({str(r["step"]) for r in rs}, key=int))
        rows.append([label, seeds, steps, *cells] + ([labels_cell(label, rs)] if sampled else []))
    table = markdown_table(["runs", "seeds", "step", *cols] + (["sample labels"] if sampled else []), rows)
    notes = [n for r in runs for n in r["stale"]]
    if not cols:
        notes.append("no final metrics: none of these runs logged validation metrics or recorded generation metrics")
    if notes:
        table += "\n\n" + "\n".join(f"- not shown: {n}" if "not of its" in n else f"- {n}" for n in notes)
    os.makedirs(a.out, exist_ok=True)
    with atomic_write(os.path.join(a.out, "compare.md"), text=True) as f:
        f.write(table + "\n")
    plot_val_curves(groups, os.path.join(a.out, "compare.png"))
    log0(f"{len(runs)} runs in {len(groups)} group(s) -> {a.out}/compare.md, {a.out}/compare.png\n{table}")


def plot_val_curves(groups, path, title=None):
    """The runs' validation curves ({label: [run_summary]}; a group's runs share one style): val_loss, or the
    VAE's val_psnr_l0, against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for rs in groups.values() for r in rs]
    curve = next((k for k in ("val_loss", "val_psnr_l0") if any(k in v for r in runs for v in r["val"])), None)
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    for i, (label, rs) in enumerate(groups.items()):
        for j, r in enumerate(rs):
            pts = [(v["step"], v[curve]) for v in r["val"] if curve in v]
            if pts:
                ax.plot(*zip(*pts), alpha=0.8, label=label if j == 0 else None, **series_style(i, len(groups)))
    unit = {"val_loss": "flow-matching MSE of v", "val_psnr_l0": "dB"}.get(curve, "")
    ax.set(xlabel="training step", ylabel=f"{curve} ({unit})" if curve else "",
           title=title or f"validation: {curve} (EMA, held-out)")
    ax.grid(alpha=0.3)
    if curve:
        ax.legend(fontsize=7)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- convergence curves

def kept_checkpoints(run_dir):
    """[(step, path)] of the EMA checkpoints a run kept with --keep-every (OUT/keep/ema_STEP.pt), by step."""
    folder = os.path.join(run_dir, "keep")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    names = sorted(f for f in names if f.startswith("ema_") and f.endswith(".pt") and f[4:-3].isdigit())
    if not names:
        raise UserError(f"{run_dir} holds no kept checkpoints ({folder}/ema_STEP.pt): train it with --keep-every N")
    return [(int(f[4:-3]), os.path.join(folder, f)) for f in names]


def curve_reference(a, runs):
    """Before any sampling: the Inception file exists and --ref stands beside the runs' samples (their side,
    --fid-mode); one line otherwise."""
    sides = {r["config"].get("image_size") for r in runs}
    if len(sides) != 1:
        raise UserError(f"curve: the runs sample images of different sides {sorted(map(str, sides))}; one FID "
                        f"reference stands beside one side")
    side = sides.pop()
    ref = Reference(a.ref, side, workers=a.workers)
    ref.check(a.fid_mode, side)
    find_inception(a.inception_path)
    return ref


def sample_set_metrics(a, npz, d, cache):
    """The curve's metric of one sample .npz: the offline dead-leaves metric, or gFID / sFID / IS against --ref.

    cache holds the feature networks (built once) and the reference statistics (cache["ref"]: the Reference)."""
    if a.features == "deadleaves":
        side = npz_shape(npz, "--samples")[0][1]
        if side not in cache:
            ext = DeadLeavesExtractor(side, d.device, n_train=a.dl_train_images, steps=a.dl_steps)
            cache[side] = ext, deadleaves_reference(ext, side)
        ext, ref = cache[side]
        fake = np.concatenate(list(npz_batches(npz)))
        return deadleaves_metrics(ext, fake, labels=sample_set_labels(npz), ref_moments=ref,
                                  sample_classes=sample_set_classes(npz))
    ref = cache["ref"]
    if "ext" not in cache:
        ext = inception(a, d)
        ref.check_network(ext)
        if ref.kind == "images":                     # the reference's moments once for every point of the curve
            spatial = FeatureMoments()
            moments = extract(ext, ref.images(), keep=False, spatial=spatial)[0]
            stats = moments.stats(), (spatial.stats() if spatial.n else None)
        else:
            stats = ref.stats(), ref.stats("mu_s", "sigma_s")
        cache.update(ext=ext, stats=stats)
    ext, (ref_stats, ref_spatial) = cache["ext"], cache["stats"]
    res = generation_metrics(ext, npz_batches(npz), ref_stats=ref_stats, ref_spatial=ref_spatial,
                             is_split=IS_SPLIT if ext.mode == "adm" else None)
    return {"fid_mode": ext.mode, "network_hash": ext.network_hash, **ref.describe(), **res}


def curve_extras(a, run, step, path, sa, d):
    """Beside the sample metric at one kept checkpoint: the latent spectrum of its samples against the run's real
    latents (--spectrum-samples, the real ones made once per run) and the run's validation loss at that step."""
    out = {}
    if a.spectrum_samples:
        ema, ae, space, ck = load_sit(path, d.device)
        if "real" not in run:
            run["real"] = real_latents(ck, ae, space, a.spectrum_samples, d.device)
        res = checkpoint_spectrum(ema, ae, space, ck, sa, d.device, a.spectrum_samples, run["real"])
        out.update({SPECTRUM_NAME: res[SPECTRUM_NAME], "spectrum": {k: res[k] for k in
                    ("radii", "power_gen", "power_real", "log_ratio", "n_gen", "n_real", "hf_radius")}})
    log = os.path.join(run["dir"], "metrics.jsonl")
    val = [r for r in read_jsonl(log) if r.get("step") == step and "val_loss" in r] if os.path.isfile(log) else []
    if val:
        out["val_loss"] = val[-1]["val_loss"]
    return out


def cmd_curve(a, d):
    """Sample every kept checkpoint of every run (OUT/samples/RUN-ID/step_STEP, resumable as `sample`), score
    each sample set, and tabulate the metric against the step: runs that differ only in --seed form one column
    (mean ± sample std over seeds), the others stand side by side."""
    runs = []
    for run_dir in a.runs:
        kept = kept_checkpoints(run_dir)
        where = os.path.abspath(run_dir)                    # sample sets of each run in their own folder
        tag = f"{os.path.basename(where)}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"
        runs.append({"dir": run_dir, "tag": tag, **run_settings(load_checkpoint(kept[-1][1], "sit")), "kept": kept,
                     "points": {}})
    groups = group_runs(runs)
    check_distinct_runs("curve", runs, groups)                  # before any sampling
    metric = "fd_dl" if a.features == "deadleaves" else "fid"
    cache = {"ref": curve_reference(a, runs)} if a.features == "inception" else {}
    for run in runs:
        for step, path in run["kept"]:
            out = os.path.join(a.out, "samples", run["tag"], f"step_{step:07d}")
            sa = argparse.Namespace(ckpt=path, vae=None, num_samples=a.num_samples, batch=a.batch,
                                    sample_steps=a.sample_steps, sampler=a.sampler, cfg_scale=a.cfg_scale,
                                    cfg_interval=a.cfg_interval, labels=a.labels, seed=a.seed, no_bf16=a.no_bf16,
                                    out=out)
            cmd_sample(sa, d)
            if d.main:
                res = sample_set_metrics(a, out + ".npz", d, cache)
                run["points"][step] = {"checkpoint": path, "checkpoint_hash": file_hash(path), "step": step, **res,
                                       **curve_extras(a, run, step, path, sa, d)}
    if not d.main:
        return
    steps = sorted({s for r in runs for s in r["points"]})
    first = next(iter(runs[0]["points"].values()))
    what = (f"{metric} ({first['network']}; {a.num_samples} samples per point, {a.sampler} x {a.sample_steps}, "
            f"CFG {a.cfg_scale} on t in {list(a.cfg_interval)}, {a.labels} labels, sampling seed {a.seed}"
            + (f"; reference {a.ref}" if a.features == "inception" else "") + ")")
    metrics = [m for m in (metric, SPECTRUM_NAME, "val_loss") if any(m in p for r in runs for p in r["points"].values())]
    lines = [f"{what}, EMA weights kept at each step; mean ± sample std over the seeds of a column"]
    if SPECTRUM_NAME in metrics:
        lines.append(f"{SPECTRUM_NAME}: {a.spectrum_samples} latents per point drawn as the samples; {SPECTRUM_DEFINITION}")
    if "val_loss" in metrics:
        lines.append("val_loss: the run's own validation line at that step (metrics.jsonl: EMA, held-out latents)")
    for m in metrics:
        lines += ["", f"**{m}**", "",
                  "| step | " + " | ".join(f"{label} (seeds {','.join(str(r['config'].get('seed')) for r in rs)})"
                                           for label, rs in groups.items()) + " |", "|---" * (1 + len(groups)) + "|"]
        for step in steps:
            cells = []
            for rs in groups.values():
                vals = [r["points"][step][m] for r in rs if step in r["points"] and m in r["points"][step]]
                cells.append((mean_spread(vals) + (f" ({len(vals)} of {len(rs)} seeds)" if len(vals) < len(rs) else ""))
                             if vals else "-")
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    os.makedirs(a.out, exist_ok=True)
    with atomic_write(os.path.join(a.out, "curve.md"), text=True) as f:
        f.write(table + "\n")
    record = {
        "metric": metric, "features": a.features, "network": first["network"],
        "ref": a.ref if a.features == "inception" else None, "num_samples": a.num_samples, "sampler": a.sampler,
        "sample_steps": a.sample_steps, "cfg_scale": a.cfg_scale, "cfg_interval": list(a.cfg_interval),
        "labels": a.labels, "seed": a.seed, "groups": {label: [r["dir"] for r in rs] for label, rs in groups.items()},
        "spectrum_samples": a.spectrum_samples, "spectrum_definition": SPECTRUM_DEFINITION,
        "runs": [{"dir": r["dir"], "seed": r["config"].get("seed"), "r0_chosen": r["r0_chosen"],
                  "points": [r["points"][s] for s in sorted(r["points"])]} for r in runs]}
    write_json(os.path.join(a.out, "curve.json"), record)
    plot_metric_curve(record, os.path.join(a.out, "curve.png"))
    log0(f"{len(runs)} runs in {len(groups)} column(s), {len(steps)} steps -> {a.out}/curve.md, curve.json, curve.png\n"
         f"{table}")


def plot_metric_curve(record, path, labels=None, title=None):
    """A `curve` result (curve.json's record) against the step, one panel per metric it holds (the sample metric,
    latent_hf_log_ratio, val_loss): one line per column, mean ± sample std over its seeds shaded; `labels` renames
    the columns."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = record["groups"]
    metrics = [m for m in (record["metric"], SPECTRUM_NAME, "val_loss")
               if any(m in p for r in record["runs"] for p in r["points"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.0 * len(metrics), 3.5), dpi=110, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, (label, dirs) in enumerate(groups.items()):
            points = [{p["step"]: p[metric] for p in r["points"] if metric in p} for r in record["runs"]
                      if r["dir"] in dirs]
            xs = sorted({s for p in points for s in p})
            vals = [np.array([p[s] for p in points if s in p]) for s in xs]
            mean = np.array([v.mean() for v in vals])
            style = series_style(i, len(groups))
            name = (labels or {}).get(label, label)
            ax.plot(xs, mean, label=f"{name} ({len(dirs)} seed{'s' if len(dirs) > 1 else ''})", **style)
            if len(dirs) > 1:
                std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals])
                ax.fill_between(xs, mean - std, mean + std, color=style["color"], alpha=0.2, lw=0)
        what = {record["metric"]: f"{metric} ({'offline, ' if metric == 'fd_dl' else ''}lower is better)",
                SPECTRUM_NAME: f"{metric} (0: real HF)", "val_loss": "val_loss (EMA, held-out)"}[metric]
        ax.set(xlabel="training step", ylabel=what,
               title=(title or f"{record['metric']} vs step ({record['num_samples']} samples, {record['sampler']})")
               if metric == record["metric"] else f"{metric} vs step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- figures (README, docs/results.md)
#
# `figures` draws every figure of the README and docs/results.md into one folder: the method from the built-in
# dead-leaves set and the demo's autoencoder, the demo's runs, and the study where it ran. The numbers come
# from the computations above (level_scores, diagnose, run_summary, the compare and curve plots); a figure
# whose inputs are missing is skipped with one line naming the command that makes them.

FIGURE_R0S = (0.05, 0.2, 0.4)          # FreqWarm's three thresholds (cycles/pixel)
FIGURE_SIDE = 64                       # side of the dead-leaves image of the FreqWarm figure
F1_RADIUS = 0.25                       # latent split radius of the F1 figure (cycles/latent pixel), as study.py's
DEMO_RUNS = ("baseline", "freqwarm", "dvae")


def series_style(i, n):
    """Style of line i of n, told apart in grey scale too: viridis shade, marker and dash pattern all differ."""
    import matplotlib
    return dict(color=matplotlib.colormaps["viridis"](0.85 * i / max(n - 1, 1)), marker="osD^v"[i % 5],
                linestyle=("-", "--", ":", "-.")[i % 4], ms=3.5)


def band_plot(ax, xs, runs, label, style, over="seeds"):
    """Mean over runs (rows of `runs`, e.g. seeds) against xs, ± sample std shaded when there are several."""
    v = np.asarray(runs, dtype=np.float64)                                   # (runs, len(xs))
    mean = v.mean(0)
    ax.plot(xs, mean, label=label + (f" (mean ± std over {len(v)} {over})" if len(v) > 1 else ""),
            markevery=max(len(xs) // 12, 1), **style)
    if len(v) > 1:
        std = v.std(0, ddof=1)
        ax.fill_between(xs, mean - std, mean + std, color=style["color"], alpha=0.2, lw=0)


def show_image(ax, x, title=None):
    """One image (3, H, W) in [-1, 1], pixels unsmoothed, no ticks."""
    ax.imshow(to_uint8(x[None])[0], interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def run_label(run_dir):
    """A run's short name: its folder's name without the seed suffix (sit-freqwarm, sitd-baseline)."""
    name = os.path.basename(os.path.normpath(run_dir))
    head, _, tail = name.rpartition("-s")
    return head if head and tail.isdigit() else name


def figure_freqwarm_input(path):
    """FreqWarm's encoder input: a dead-leaves image, its centred log power spectrum with the circles r = r0,
    and the image low-passed at each r0 (fft_ops.lowpass, the ideal mask)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle
    x = DeadLeaves(n=10, resolution=FIGURE_SIDE)[3][0]                       # (3, H, W), class 3
    power = fft_ops.centered_fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs().pow(2).sum(0)   # (H, W)
    fig, axes = plt.subplots(1, 2 + len(FIGURE_R0S), figsize=(10, 2.5), dpi=100)
    show_image(axes[0], x, f"x ({FIGURE_SIDE} px dead leaves)")
    edge = 0.5 + 0.5 / FIGURE_SIDE                                          # bin centres run -0.5 .. 0.5 - 1/side
    logp = torch.log10(power + 1e-6).numpy()                                # the DC bin is 0 (mean removed)
    im = axes[1].imshow(logp, cmap="viridis", origin="lower", vmin=np.percentile(logp, 1),
                        extent=(-edge, 0.5 - 0.5 / FIGURE_SIDE, -edge, 0.5 - 0.5 / FIGURE_SIDE))
    for i, r0 in enumerate(FIGURE_R0S):
        axes[1].add_patch(Circle((0, 0), r0, fill=False, color="white", lw=1.2, ls=("--", "-", ":")[i % 3]))
        axes[1].text(r0 * 0.71, r0 * 0.71, f"{r0:g}", color="white", fontsize=6)
    axes[1].set_xlabel("f_x (cycles/pixel)", fontsize=7), axes[1].set_ylabel("f_y (cycles/pixel)", fontsize=7)
    axes[1].set_title("log10 power, circles r = r0", fontsize=7)
    axes[1].tick_params(labelsize=6)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    kept = fft_ops.radius_grid(FIGURE_SIDE, FIGURE_SIDE)
    for ax, r0 in zip(axes[2:], FIGURE_R0S):
        show_image(ax, fft_ops.lowpass(x[None], r0)[0],
                   f"lowpass(x, r0 = {r0:g})\nkeeps {100 * (kept <= r0).float().mean():.1f} % of the bins")
    fig.suptitle("FreqWarm: the encoder's input during the warm-up", fontsize=8)
    save_figure(fig, path)


@torch.no_grad()
def figure_mlsr_levels(ae, x, path):
    """Denoising-VAE's MLSR (Eq. 3): which latent bins S_l removes, the latent S_l(z) (one channel) and its decode
    D(S_l(z)) per level l, with the PSNR of that image and the mean over all of x (level_scores)."""
    import matplotlib.pyplot as plt
    scores = level_scores(ae, x)                                            # per level: (D(S_l(z)), psnr, hf)
    z = ae.encode(x[:1])                                                    # (1, C, h, w)
    h, w = z.shape[-2:]
    L = len(ae.mlsr_fractions)
    removed_by = torch.zeros(h, w)                                          # the first level that removes a bin
    for level in reversed(range(1, L)):
        removed_by[fft_ops.attenuation_mask(h, w, level, ae.mlsr_fractions) == 0] = level
    fig, axes = plt.subplots(2, 1 + L, figsize=(1.75 * (1 + L) + 0.6, 4.3), dpi=100)
    ext = (-0.5 - 0.5 / w, 0.5 - 0.5 / w, -0.5 - 0.5 / h, 0.5 - 0.5 / h)      # bin centres -0.5 .. 0.5 - 1/side
    im = axes[0, 0].imshow(torch.fft.fftshift(removed_by).numpy(), cmap=plt.get_cmap("viridis", L), vmin=-0.5,
                           vmax=L - 0.5, origin="lower", extent=ext)
    cb = fig.colorbar(im, ax=axes[0, 0], fraction=0.046, pad=0.04, ticks=range(L))
    cb.ax.tick_params(labelsize=6)
    axes[0, 0].set_title("latent bins: first level\nthat removes them (0: none)", fontsize=7)
    axes[0, 0].set(xlabel="f_x (cycles/latent px)", ylabel="f_y (cycles/latent px)")
    axes[0, 0].xaxis.label.set_size(7), axes[0, 0].yaxis.label.set_size(7), axes[0, 0].tick_params(labelsize=6)
    show_image(axes[1, 0], x[0], "x")
    lat = [fft_ops.attenuate(z, level, ae.mlsr_fractions)[0, 0] for level in range(L)]
    lo, hi = min(v.min().item() for v in lat), max(v.max().item() for v in lat)
    for level, (zl, (rec, p, _)) in enumerate(zip(lat, scores)):
        axes[0, 1 + level].imshow(zl.cpu().numpy(), cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        axes[0, 1 + level].set_xticks([]), axes[0, 1 + level].set_yticks([])
        axes[0, 1 + level].set_title(f"S_{level}(z), channel 0\n(p_{level} = {ae.mlsr_fractions[level]:g})",
                                     fontsize=7)
        show_image(axes[1, 1 + level], rec[0], f"D(S_{level}(z)): {p[0]:.1f} dB\n"
                                               f"mean {p.mean():.1f} dB over {len(x)}")
    fig.suptitle(f"MLSR levels of {ae.name}: latent {tuple(z.shape[1:])}, PSNR of D(S_l(z)) vs x", fontsize=8)
    save_figure(fig, path)


@torch.no_grad()
def figure_diagnosis(ae, x, normalize, subsets, out_dir):
    """FreqWarm's Findings 1-3 on `subsets` disjoint subsets of the images x (diagnose on each): F1 as decodes
    of z_low and z_high (PSNR mean ± std over the subsets), F2 and F3 as curves with their spread."""
    import matplotlib.pyplot as plt
    parts = x[: len(x) // subsets * subsets].split(len(x) // subsets)      # disjoint, equal sizes
    res = [diagnose(ae, part, normalize) for part in parts]
    n, i25 = len(parts[0]), res[0]["radii"].index(F1_RADIUS)
    z = ae.encode(x[:4])
    low, high = fft_ops.split_frequencies(z, F1_RADIUS)
    fig, axes = plt.subplots(3, 4, figsize=(4.6, 3.9), dpi=100)
    rows = [("x", x[:4]), ("D(z_low)", ae.decode(low).clamp(-1, 1)), ("D(z_high)", ae.decode(high).clamp(-1, 1))]
    for r, (name, imgs) in enumerate(rows):
        for c in range(4):
            show_image(axes[r, c], imgs[c])
        axes[r, 0].set_ylabel(name, fontsize=7)
    for key, r in (("f1_psnr_low", 1), ("f1_psnr_high", 2)):
        v = np.array([s[key][i25] for s in res])
        axes[r, 0].set_title(f"PSNR {v.mean():.1f} ± {v.std(ddof=1):.1f} dB ({subsets} subsets of {n})",
                             fontsize=7, loc="left")
    fig.suptitle(f"F1: decoding one latent band (split at r = {F1_RADIUS} cycles/latent pixel)", fontsize=8)
    save_figure(fig, os.path.join(out_dir, "diagnosis_f1_bands.png"))
    curves = (("diagnosis_f2_rgb_energy.png", "f2_radii", "f2_cumulative_energy", "radius r (cycles/pixel)",
               "RGB energy within r (fraction)", "F2: cumulative RGB energy"),
              ("diagnosis_f3_latent_hf.png", "f3_r0", "f3_latent_hf_energy", "RGB low-pass radius r0 (cycles/pixel)",
               f"latent HF energy: mean square of z_n\nabove {res[0]['f3_hf_radius']} cycles/latent px",
               "F3: latent HF energy of E(lowpass(x, r0))"))
    for name, xk, yk, xl, yl, title in curves:
        fig, ax = plt.subplots(figsize=(4.5, 3.0), dpi=100)
        band_plot(ax, res[0][xk], [s[yk] for s in res], f"{n} images each", series_style(0, 1), "subsets")
        ax.axvline(0.2, color="0.4", lw=0.8, ls="--", label="FreqWarm's r0 = 0.2")
        ax.set(xlabel=xl, ylabel=yl, title=title)
        ax.legend(fontsize=7), ax.grid(alpha=0.3)
        save_figure(fig, os.path.join(out_dir, name))


def figure_samples(demo, path, per_class=3):
    """The demo's three runs side by side: the first `per_class` samples of each class, one column per class."""
    import matplotlib.pyplot as plt
    grids = []
    for name in DEMO_RUNS:
        with np.load(os.path.join(demo, f"samples-{name}.npz")) as npz:
            images, labels = npz["arr_0"], npz["arr_1"]                     # (N, H, W, 3) uint8, (N,)
        classes = sorted(set(labels.tolist()))
        framed = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=255)   # a white line between
        cols = [framed[labels == c][:per_class] for c in classes]          # (<= per_class, H + 2, W + 2, 3) each
        rows = min(len(c) for c in cols)
        grids.append((name, classes, np.concatenate([np.concatenate(list(c[:rows]), axis=0) for c in cols], axis=1)))
    h, w = grids[0][2].shape[:2]
    fig, axes = plt.subplots(1, len(DEMO_RUNS), figsize=(3.3 * len(DEMO_RUNS), 0.9 + 3.1 * h / w), dpi=100)
    for ax, (name, classes, grid) in zip(axes, grids):
        ax.imshow(grid, interpolation="nearest")
        side = grid.shape[1] / len(classes)
        ax.set_xticks([(i + 0.5) * side for i in range(len(classes))], classes, fontsize=6)
        ax.set_yticks([]), ax.tick_params(length=0)
        final = run_summary(os.path.join(demo, f"sit-{name}"))["final"]
        ax.set_title(f"{name}" + (f": fd_dl {final['fd_dl']:.1f}" if "fd_dl" in final else ""), fontsize=8)
        ax.set_xlabel("class", fontsize=7)
    fig.suptitle("Demo samples (SiT, one column per class)", fontsize=8)
    save_figure(fig, path)


def figure_val_loss(run_dirs, path, title):
    """Validation curves of runs (compare's figure), one line per run, labelled by folder name."""
    groups = {}
    for r in run_dirs:
        groups.setdefault(run_label(r), []).append(run_summary(r))
    plot_val_curves(groups, path, title)


def figure_curve(curve_json, path, title):
    """A `curve` result (curve.json) as curve draws it, columns labelled by folder name."""
    with open(curve_json) as f:
        record = json.load(f)
    plot_metric_curve(record, path, {label: run_label(dirs[0]) for label, dirs in record["groups"].items()}, title)


def study_runs(study, prefix, rel):
    """The study's results of one kind, by setting: {setting: [JSON of each seed]} from the folders
    STUDY/PREFIX<setting>-s<seed>/REL (e.g. prefix "vae-d", rel "diagnosis/diagnosis.json": by latent channels)."""
    found = {}
    for folder in sorted(os.listdir(study)):
        label, path = run_label(folder), os.path.join(study, folder, rel)
        if label != folder and label.startswith(prefix) and os.path.isfile(path):
            with open(path) as f:
                found.setdefault(label[len(prefix):], []).append(json.load(f))
    return found


def figure_study_mlsr(study, path):
    """Study part A: PSNR of D(S_l(z)) per level, MLSR against plain VAEs (mean ± std over seeds)."""
    import matplotlib.pyplot as plt
    runs = {k: v for k, v in study_runs(study, "vae-", "recon.json").items() if k in ("MLSR", "plain")}
    fig, ax = plt.subplots(figsize=(4.5, 3.0), dpi=100)
    for i, (name, rs) in enumerate(sorted(runs.items())):
        band_plot(ax, [r["level"] for r in rs[0]["rows"]], [[r["psnr"] for r in x["rows"]] for x in rs],
                  f"{name} VAE", series_style(i, len(runs)))
    ax.set(xlabel="MLSR level l", ylabel="PSNR of D(S_l(z)) vs x (dB)", title="Study A: MLSR vs plain VAE",
           xticks=range(4))
    ax.legend(fontsize=7), ax.grid(alpha=0.3)
    save_figure(fig, path)


def figure_study_f3(study, path):
    """Study part B: F3 (latent HF energy vs r0) per latent channel count, ViT VAE and conv autoencoder."""
    import matplotlib.pyplot as plt
    diag = os.path.join("diagnosis", "diagnosis.json")
    kinds = [(kind, {k: v for k, v in study_runs(study, prefix, diag).items() if k.isdigit()})
             for kind, prefix in (("ViT VAE", "vae-d"), ("conv AE", "dcae-d"))]
    kinds = [(k, runs) for k, runs in kinds if runs]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.3 * len(kinds), 3.0), dpi=100, squeeze=False)
    for ax, (kind, runs) in zip(axes[0], kinds):
        dims = sorted(runs, key=int)
        for i, dim in enumerate(dims):
            band_plot(ax, runs[dim][0]["f3_r0"], [r["f3_latent_hf_energy"] for r in runs[dim]], f"{dim} channels",
                      series_style(i, len(dims)))
        ax.set(xlabel="RGB low-pass radius r0 (cycles/pixel)",
               ylabel="latent HF energy: mean square of z_n\nabove 0.25 cycles/latent px",
               title=f"Study B: F3 of the {kind}")
        ax.legend(fontsize=6), ax.grid(alpha=0.3)
    save_figure(fig, path)


def cmd_figures(a, d):
    import matplotlib
    matplotlib.use("Agg")
    demo, study, out = a.demo, a.study, a.out
    vae_path = os.path.join(demo, "vae", "last.pt")
    sits = [os.path.join(demo, f"sit-{r}") for r in DEMO_RUNS]
    demo_cmd = f"bash demo.sh {demo}"
    study_cmd = f"python study.py --setting cpu --out {study}"
    state = {}

    def demo_images():
        """The demo autoencoder and --n seeded random dead-leaves images at its size (as `diagnose` takes them)."""
        if "ae" not in state:
            ae = load_autoencoder(vae_path, d.device)
            side = resolve_image_size(ae)
            ea = argparse.Namespace(data="deadleaves", n_images=10000, n=str(a.n), seed=a.seed, workers=0)
            batches, _ = eval_batches(ea, ae, side, a.n, d)
            state.update(ae=ae, x=torch.cat(list(batches)).to(d.device))
        return state["ae"], state["x"]

    def diagnosis():
        ae, x = demo_images()
        stats = ae.stats or latent_stats(ae.encode, ae.latent_dim, x.split(64), d.device, ae.mlsr_fractions)
        figure_diagnosis(ae, x, LatentSpace(stats, ae.mlsr_fractions, device=d.device).normalize, a.subsets, out)

    # (figures written, the inputs they need, the command that makes those, how to draw them)
    figures = [
        (["freqwarm_input.png"], [], None, lambda: figure_freqwarm_input(os.path.join(out, "freqwarm_input.png"))),
        (["mlsr_levels.png"], [vae_path], demo_cmd,
         lambda: figure_mlsr_levels(*demo_images(), os.path.join(out, "mlsr_levels.png"))),
        (["diagnosis_f1_bands.png", "diagnosis_f2_rgb_energy.png", "diagnosis_f3_latent_hf.png"], [vae_path],
         demo_cmd, diagnosis),
        (["demo_samples.png"], [os.path.join(demo, f"samples-{r}.npz") for r in DEMO_RUNS]
         + [os.path.join(s, "last.pt") for s in sits], demo_cmd,
         lambda: figure_samples(demo, os.path.join(out, "demo_samples.png"))),
        (["demo_val_loss.png"], [os.path.join(s, "metrics.jsonl") for s in sits]
         + [os.path.join(s, "last.pt") for s in sits], demo_cmd,
         lambda: figure_val_loss(sits, os.path.join(out, "demo_val_loss.png"), "Demo: validation loss")),
        (["demo_curve.png"], [os.path.join(demo, "curve", "curve.json")], demo_cmd,
         lambda: figure_curve(os.path.join(demo, "curve", "curve.json"), os.path.join(out, "demo_curve.png"),
                              "Demo: fd_dl vs step")),
        (["study_a_mlsr_psnr.png"], [os.path.join(study, "vae-MLSR-s0", "recon.json"),
                                     os.path.join(study, "vae-plain-s0", "recon.json")], study_cmd + " --parts A",
         lambda: figure_study_mlsr(study, os.path.join(out, "study_a_mlsr_psnr.png"))),
        (["study_b_f3.png"], [os.path.join(study, "dcae-d4-s0", "diagnosis", "diagnosis.json")],
         study_cmd + " --parts B", lambda: figure_study_f3(study, os.path.join(out, "study_b_f3.png"))),
        (["study_d_curve.png"], [os.path.join(study, "partD-curve", "curve.json")], study_cmd + " --parts D",
         lambda: figure_curve(os.path.join(study, "partD-curve", "curve.json"), os.path.join(out, "study_d_curve.png"),
                              "Study D: fd_dl vs step")),
    ]
    os.makedirs(out, exist_ok=True)
    written = []
    for names, needs, command, draw in figures:
        missing = next((p for p in needs if not os.path.exists(p)), None)
        if missing:
            log0(f"skipped {', '.join(names)}: {missing} is missing (`{command}` makes it)")
            continue
        draw()
        written += names
    log0(f"{len(written)} figures -> {out}: {', '.join(written)}")


# ----------------------------------------------------------------------------- CLI

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Stage 3: evaluation and frequency diagnosis",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="DDP sampling to PNGs and an ADM-style .npz")
    s.add_argument("--ckpt", required=True, help="Stage-2 checkpoint (kind 'sit'), or its export folder")
    s.add_argument("--vae", default=None, help="the run's autoencoder, if it has moved (checked by content hash)")
    s.add_argument("--num-samples", type=int, default=50000, help="images to draw over all ranks")
    s.add_argument("--batch", type=int, default=64, help="images per forward on each rank")
    s.add_argument("--sample-steps", type=int, default=250)
    s.add_argument("--sampler", default="heun", choices=SAMPLERS,
                   help="euler / heun: the ODE; sde: SiT's Euler-Maruyama sampler (--sample-steps network calls)")
    s.add_argument("--labels", default="balanced", choices=("balanced", "random"),
                   help="balanced: image i has class i mod K; random: uniform labels, as DiT / SiT sample")
    s.add_argument("--cfg-scale", type=float, default=1.0)
    s.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], help="guide only for t in [lo, hi]")
    s.add_argument("--out", default="runs/eval/samples")
    s.add_argument("--dist-timeout", type=int, default=None,
                   help="seconds a collective waits for the slowest rank (torch's default if unset); ranks with "
                        "more images left do not hold the others in one")
    f = sub.add_parser("fid", help="gFID / sFID / IS / precision-recall with clean-fid's Inception")
    f.add_argument("--samples", help="generated images: .npz (arr_0 uint8 NHWC) or folder")
    f.add_argument("--ref", help="reference: an ADM reference batch (.npz with arr_0, mu, sigma, mu_s, sigma_s; adm "
                                 "mode), statistics from --make-ref-stats, or images (.npz arr_0, or a folder, "
                                 "nested, any sizes: ADM centre crop at the samples' size)")
    f.add_argument("--resolution", type=int, default=None,
                   help="side of the samples and of the reference crop (default: the samples' side; "
                        "--make-ref-stats of a folder needs it or --samples)")
    f.add_argument("--make-ref-stats", default=None, help="write reference statistics of --ref to this .npz")
    f.add_argument("--features", default="inception", choices=("inception", "deadleaves"),
                   help="inception: FID / IS; deadleaves: the offline fd_dl and class_acc_dl (a small network "
                        "trained on the built-in set, needs no --ref; never called FID)")
    f.add_argument("--record", default=None, help="also write the metrics to RUN_DIR/generation_metrics.json")
    e = sub.add_parser("export", help="EMA weights as model.safetensors + config.json (for sample / --vae / the Hub)")
    e.add_argument("--ckpt", required=True, help="a Stage-1 ('vae') or Stage-2 ('sit') checkpoint, e.g. RUN/last.pt")
    e.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier export: replaced whole)")
    e.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="also upload the folder to this Hugging Face Hub model repo (USER/NAME)")
    e.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    c = sub.add_parser("compare", help="validation curves and final metrics of several runs (mean ± std over seeds)")
    c.add_argument("runs", nargs="+", help="run folders (each with last.pt and metrics.jsonl)")
    c.add_argument("--out", default="runs/compare")
    cv = sub.add_parser("curve", help="metric vs training step over the kept checkpoints of several runs")
    cv.add_argument("runs", nargs="+", help="run folders trained with --keep-every N (OUT/keep/ema_STEP.pt)")
    cv.add_argument("--features", default="deadleaves", choices=("inception", "deadleaves"),
                    help="inception: gFID / IS against --ref; deadleaves: the offline fd_dl / class_acc_dl")
    cv.add_argument("--ref", default=None, help="with --features inception: as `fid --ref`")
    cv.add_argument("--num-samples", type=int, default=10000, help="images per kept checkpoint")
    cv.add_argument("--batch", type=int, default=64, help="images per forward on each rank")
    cv.add_argument("--sample-steps", type=int, default=250)
    cv.add_argument("--sampler", default="heun", choices=SAMPLERS)
    cv.add_argument("--cfg-scale", type=float, default=1.0)
    cv.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], help="guide only for t in [lo, hi]")
    cv.add_argument("--labels", default="balanced", choices=("balanced", "random"))
    cv.add_argument("--out", default="runs/curve", help="curve.md, curve.json, curve.png and the sample sets")
    sp = sub.add_parser("spectrum", help="radial spectrum of a checkpoint's generated latents vs real latents")
    sp.add_argument("--ckpt", required=True, help="Stage-2 checkpoint (kind 'sit'), its export folder, or a kept one")
    sp.add_argument("--vae", default=None, help="the run's autoencoder, if it has moved (checked by content hash)")
    sp.add_argument("--data", default=None, help="the run's --data, if it has moved (its held-out images are the "
                                                 "real latents)")
    sp.add_argument("--out", default="runs/eval/spectrum")
    sp.add_argument("--record", default=None, help="also keep latent_hf_log_ratio in RUN_DIR/generation_metrics.json "
                                                   "for `compare` (--ckpt must be RUN_DIR/last.pt as it is now)")
    for q in (sp, cv):
        q.add_argument("--spectrum-samples" if q is cv else "--num-samples", type=int, default=256,
                       help="latents drawn (and real held-out latents) for the latent spectrum"
                            + (" at each kept checkpoint (0: none)" if q is cv else ""))
    sp.add_argument("--batch", type=int, default=64, help="latents per forward")
    sp.add_argument("--sample-steps", type=int, default=250)
    sp.add_argument("--sampler", default="heun", choices=SAMPLERS)
    sp.add_argument("--labels", default="balanced", choices=("balanced", "random"))
    sp.add_argument("--cfg-scale", type=float, default=1.0)
    sp.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], help="guide only for t in [lo, hi]")
    mc = sub.add_parser("metric-check", help="does fd_dl rise with known damage of held-out images (blur, noise, "
                                             "low-pass), above its spread over image subsets?")
    mc.add_argument("--image-size", type=int, default=32, help="side of the images (that of the samples scored)")
    mc.add_argument("--n", type=int, default=500, help="images per subset (the sample count of the metric)")
    mc.add_argument("--subsets", type=int, default=3, help="disjoint subsets (the spread is over them)")
    mc.add_argument("--heldout-seed", type=int, default=1000, help="dead-leaves seed of the held-out images")
    mc.add_argument("--out", default="runs/eval/metric-check")
    fg = sub.add_parser("figures", help="every figure of the README and docs/results.md, from the built-in set, "
                                        "the demo's outputs and the study's folder (missing inputs: skipped)")
    fg.add_argument("--demo", default="demo_out", help="the demo's folder (`bash demo.sh DIR`)")
    fg.add_argument("--study", default="runs/study", help="the study's folder (`python study.py --out DIR`)")
    fg.add_argument("--n", type=int, default=128, help="random dead-leaves images of the MLSR and diagnosis figures")
    fg.add_argument("--subsets", type=int, default=4, help="disjoint subsets of those images for the F1-F3 spread")
    fg.add_argument("--out", default="docs/figures")
    r = sub.add_parser("recon", help="PSNR / SSIM / LPIPS / rFID / rsFID / IS per MLSR level")
    g = sub.add_parser("diagnose", help="FreqWarm Findings 1-3 and latent spectra")
    for q, n_help in ((r, "all with Inception weights (the papers' protocol), else 1000"), (g, "256")):
        q.add_argument("--vae", required=True, help="Stage-1 checkpoint (kind 'vae'), its export folder, or "
                                                    "diffusers:HUB_ID_OR_FOLDER[#SUBFOLDER]")
        q.add_argument("--image-size", type=int, default=None,
                       help=f"image side (default: the VAE's training size; {DEFAULT_IMAGE_SIZE} for pretrained autoencoders)")
        q.add_argument("--data", default="deadleaves")
        q.add_argument("--n-images", type=int, default=10000, help="size of the dead-leaves set")
        q.add_argument("--n", default=None, help=f"random images of --data, or 'all' (default: {n_help})")
        q.add_argument("--mlsr-fractions", type=float, nargs=4, default=None,
                       help="p_l of S_l to evaluate with (default: those the VAE was trained with)")
    r.add_argument("--out", default=None, help="folder for recon.json")
    g.add_argument("--out", default="runs/eval/diagnosis")
    for q in (s, f, r, g, cv, sp, mc, fg):         # each command takes the ones it acts on
        q.add_argument("--device", default=None)
    for q in (s, r, g, cv, sp, mc, fg):
        q.add_argument("--seed", type=int, default=0)
    for q in (s, cv, sp):
        q.add_argument("--no-bf16", action="store_true")
    for q in (f, r, g, cv):
        q.add_argument("--workers", type=int, default=0, help="DataLoader workers for image decoding")
    for q in (f, r, cv):
        q.add_argument("--inception-path", default=None, help="local Inception torchscript file (any name)")
        q.add_argument("--fid-mode", default="adm", choices=FID_MODES, help=FID_MODE_HELP)
    r.add_argument("--vgg-path", default=None, help=f"local VGG16 weights for LPIPS (torchvision's {VGG16_FILE})")
    for q in (f, cv, mc):
        q.add_argument("--dl-train-images", type=int, default=1000, help="training images of the dead-leaves network")
        q.add_argument("--dl-steps", type=int, default=300, help="training steps of the dead-leaves network")
    a = p.parse_args(argv)
    a.explicit = sorted(explicit_dests(p, argv))
    return a


# Per command, the settings that act only with others: given without them they are refused in one line
# (common.check_needs). A new one is one line.
INCEPTION, DEADLEAVES = when("features", "inception"), when("features", "deadleaves")
NEEDS = {
    "sample": {"cfg_interval": (when("cfg_scale", 1.0, unless=True),)},
    "fid": {"ref": (INCEPTION,), "inception_path": (INCEPTION,), "fid_mode": (INCEPTION,),
            "dl_train_images": (DEADLEAVES,), "dl_steps": (DEADLEAVES,)},
    "curve": {"ref": (INCEPTION,), "inception_path": (INCEPTION,), "fid_mode": (INCEPTION,),
              "dl_train_images": (DEADLEAVES,), "dl_steps": (DEADLEAVES,),
              "cfg_interval": (when("cfg_scale", 1.0, unless=True),)},
    "export": {"private": (when("push_to_hub", None, unless=True),)},
    "spectrum": {"cfg_interval": (when("cfg_scale", 1.0, unless=True),)},
    "recon": {"n_images": (when("data", "deadleaves"),)},
    "diagnose": {"n_images": (when("data", "deadleaves"),)},
}


def check_sampling(a):
    """The sampler's flags of sample, curve and spectrum: batch and steps, SDE steps, guidance scale and interval."""
    for name in ("batch", "sample_steps"):
        check_range(a, name, 1)
    if a.sampler == "sde" and a.sample_steps < 2:
        raise UserError("--sampler sde needs --sample-steps >= 2 (Euler-Maruyama steps, then SiT's last step)")
    check_finite(a, "cfg_scale")
    lo, hi = a.cfg_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise UserError(f"--cfg-interval must be 0 <= lo <= hi <= 1; got {lo} {hi}")


def validate(a):
    """Every check of the command line, in one place (one line and exit status 2 on failure)."""
    check_needs(a, NEEDS.get(a.cmd, {}))
    if a.cmd == "sample":
        check_range(a, "num_samples", 1)
        check_sampling(a)
        check_range(a, "dist_timeout", 1, optional=True)
        check_out_dir(a.out)
    elif a.cmd == "fid":
        if a.features == "deadleaves":
            if not a.samples or a.make_ref_stats:
                raise UserError("fid --features deadleaves needs --samples (its reference is the built-in set)")
        elif not a.ref or not (a.samples or a.make_ref_stats):
            raise UserError("fid needs --samples FILE_OR_FOLDER and --ref FILE_OR_FOLDER "
                            "(or --ref FOLDER --make-ref-stats OUT.npz)")
        if a.make_ref_stats:
            check_out_dir(os.path.dirname(os.path.abspath(a.make_ref_stats)), "--make-ref-stats folder")
            if a.features == "inception" and os.path.isdir(a.ref) and not (a.resolution or a.samples):
                raise UserError("--make-ref-stats of a folder needs --resolution (the side of the ADM centre crop, "
                                "e.g. 256) or --samples (their side): the statistics stand only beside that size")
    elif a.cmd == "compare":
        check_out_dir(a.out)
    elif a.cmd == "metric-check":
        check_range(a, "image_size", 8)
        check_range(a, "n", 2)
        check_range(a, "subsets", 2)
        check_out_dir(a.out)
    elif a.cmd == "spectrum":
        check_range(a, "num_samples", 1)
        check_sampling(a)
        check_out_dir(a.out)
    elif a.cmd == "figures":
        check_range(a, "subsets", 3)
        if a.n < 2 * a.subsets:
            raise UserError(f"--n {a.n} images cannot fill --subsets {a.subsets} disjoint subsets of 2 or more")
        check_out_dir(a.out)
    elif a.cmd == "export":
        if a.push_to_hub:
            check_hub_repo(a.push_to_hub)
        check_out_dir(os.path.dirname(os.path.abspath(a.out)), "--out's parent folder")
    elif a.cmd == "curve":
        check_range(a, "num_samples", 2)
        check_range(a, "spectrum_samples", 0)
        check_sampling(a)
        if a.features == "inception" and not a.ref:
            raise UserError("curve --features inception needs --ref (as `fid --ref`)")
        check_out_dir(a.out)
    else:
        if a.mlsr_fractions is not None:
            a.mlsr_fractions = list(fft_ops.check_fractions(a.mlsr_fractions, "--mlsr-fractions"))
        check_range(a, "image_size", 1, optional=True)
        if a.n is not None and a.n != "all" and not (a.n.isdigit() and int(a.n) >= 1):
            raise UserError(f"--n must be a positive number of images or 'all', got {a.n}")
        if a.out:
            check_out_dir(a.out)


def main(argv=None):
    a = get_args(argv)
    validate(a)
    d = setup_distributed(getattr(a, "device", None), getattr(a, "dist_timeout", None))
    commands = {"sample": cmd_sample, "fid": cmd_fid, "recon": cmd_recon, "diagnose": cmd_diagnose,
                "compare": cmd_compare, "curve": cmd_curve, "export": cmd_export, "spectrum": cmd_spectrum,
                "metric-check": cmd_metric_check, "figures": cmd_figures}
    commands[a.cmd](a, d)


if __name__ == "__main__":
    run_main(main)
