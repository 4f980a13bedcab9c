"""Helpers for running the scripts as a user would."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from common import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_FIGURES = ("mlsr_levels.png", "diagnosis_f1_bands.png", "diagnosis_f2_rgb_energy.png",     # evaluate.py figures
                "diagnosis_f3_latent_hf.png", "demo_samples.png", "demo_val_loss.png", "demo_curve.png")
STUDY_FIGURES = ("study_a_mlsr_psnr.png", "study_b_f3.png", "study_d_curve.png")


def run(args, timeout=300, env=None, torchrun=0):
    """Run a script (`python X.py ...` or `torchrun --nproc_per_node=N X.py ...`) from the repo root."""
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                              if torchrun else []) + list(args)
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)


def ranks_report(proc):
    """What a failed torchrun run says about each rank: its exit status, torchrun's lines on failed ranks
    (exit code, signal), every error line, and the end of stderr."""
    lines = proc.stderr.splitlines()
    keys = ("exitcode", "Signal", "signal", "error", "Error", "Traceback", "terminate", "abort", "Abort", "what():")
    found = [l for l in lines if any(k in l for k in keys)]
    return "\n".join([f"torchrun exit status {proc.returncode}", *found[-40:], "--- stderr tail ---",
                      proc.stderr[-3000:], "--- stdout tail ---", proc.stdout[-1000:]])


def assert_drawn(path):
    """A PNG with something drawn in it: grey levels that vary, and coloured pixels (images, viridis lines and
    maps), which empty axes, titles and grid lines (black, grey, white) do not have."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)          # (H, W, 3)
    assert rgb.mean(-1).var() > 100, path
    saturation = rgb.max(-1) - rgb.min(-1)
    assert (saturation > 60).mean() > 0.005, (path, (saturation > 60).mean())


def read_metrics(path, kind="train"):
    """Lines of a metrics.jsonl: 'train' (those with a loss) or 'val' (validation lines)."""
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    return [r for r in lines if ("loss" in r) == (kind == "train")]


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) >= 1 and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


def sigterm_after_first_log(args, metrics_path, timeout=120, sig=signal.SIGTERM):
    """Start a run, send SIGTERM (or `sig`) once its metrics file has a line, return the finished process."""
    e = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable] + list(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=e)
    t0 = time.time()
    while not (os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0):
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.2)
    p.send_signal(sig)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def spy_sampling(monkeypatch, module, load_module):
    """Record the model, guidance scale (and interval) given to guided_velocity, the sampler's output and the decoder's input."""
    seen = {}
    real_gv, real_ode, real_load = module.guided_velocity, module.sample_ode, load_module.load_autoencoder

    def gv(model, y, scale=1.0, *rest):
        seen["model"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["scale"], seen["guidance_rest"] = scale, rest
        return real_gv(model, y, scale, *rest)

    def ode(*a, **k):
        seen["z"] = real_ode(*a, **k)
        return seen["z"]

    def load(*a, **k):
        ae = real_load(*a, **k)
        real_decode = ae.decode

        def decode(z):
            seen["decoder_input"] = z.clone()
            seen["decoded"] = real_decode(z)
            return seen["decoded"]
        ae.decode = decode
        return ae

    monkeypatch.setattr(module, "guided_velocity", gv)
    monkeypatch.setattr(module, "sample_ode", ode)
    monkeypatch.setattr(load_module, "load_autoencoder", load)
    return seen


def assert_ema_weights_and_statistics(seen, ck, vae_ckpt):
    """The sampler ran the EMA (not the trained model) and the decoder got z * std + mean of the VAE checkpoint."""
    sit_model = {k[len("sit."):]: v for k, v in ck["model"].items() if k.startswith("sit.")}
    assert seen["model"].keys() == ck["ema"].keys() == sit_model.keys()
    assert all(torch.equal(seen["model"][k], ck["ema"][k]) for k in ck["ema"])
    assert any(not torch.equal(ck["ema"][k], sit_model[k]) for k in sit_model)
    stats = load_checkpoint(vae_ckpt, "vae")["latent_stats"]
    mean, std = stats["mean"].view(1, -1, 1, 1), stats["std"].view(1, -1, 1, 1)
    assert not torch.allclose(std, torch.ones_like(std), atol=0.05) and not torch.allclose(mean, 0 * mean, atol=0.05)
    torch.testing.assert_close(seen["decoder_input"], seen["z"] * std + mean)


class Stage2Latents:
    """Stage 2's latents of a batch as train_diffusion's loop makes them, for a given step: the frozen
    encoder's latents of x (of lowpass(x, r0) while FreqWarm warms up: steps < warmup), normalised by the
    run's LatentSpace; from the images (get(step, images=x)) or the latent cache (get(step, keys=...))."""

    def __init__(self, ae, stats, args, warmup, device="cpu"):
        from vae import LatentSpace
        self.ae, self.args, self.warmup, self.device = ae, args, warmup, torch.device(device)
        self.space = LatentSpace(stats, ae.mlsr_fractions, args.denoise_level, args.renorm_level, device)
        self.cache = None

    def radius(self, step):
        import train_diffusion as td
        return td.freqwarm_radius(step, self.warmup if self.args.freqwarm else 0, self.args)

    def get(self, step, images=None, keys=None):
        import train_diffusion as td
        r = self.radius(step)
        if keys is not None:
            return self.space.normalize(self.cache[r].batch(keys, self.device)[0])
        return self.space.normalize(td.encode_images(self.ae, images, r, self.args))

    def build_cache(self, dataset, out_dir, d):
        """train_diffusion.build_cache into `out_dir`."""
        import copy
        import train_diffusion as td
        d = type("D", (), dict(rank=d.rank, world_size=d.world_size, main=d.main, device=self.device))()
        args = copy.copy(self.args)
        args.out = str(out_dir)
        self.cache = td.build_cache(self.ae, dataset, args, d)
