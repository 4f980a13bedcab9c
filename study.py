"""The reproduction study: do the papers' mechanisms show up at our scale? Runs the real commands, several seeds.

    python study.py --setting smoke  --out runs/study-smoke    # CPU, a few minutes (what CI runs)
    python study.py --setting cpu    --out runs/study          # CPU, about an hour on 2 cores
    python study.py --setting gpu    --out runs/study-gpu      # one GPU: 64 px, f8, larger models and VAEs
    python study.py --setting cpu --parts D --out runs/study   # the conv autoencoders of B, then D only
    python study.py --setting cpu --parts E --out runs/study-e # FreqWarm vs latent channels: 3-4 h alone (estimate)
    python study.py --setting smoke --parts E --out runs/study-e-smoke   # the same chain in minutes (CI runs it)
    (single process on purpose: each command below is a plain `python SCRIPT.py ...`; for torchrun, run them
     by hand from the printed command lines)

Five parts, each over several seeds, tabulated as mean ± sample std over seeds in OUT/study.md (E only when named):
  A  MLSR vs a plain VAE (same size and steps; plain = every p_l and sigma_l zero): PSNR of D(S_l(z)) per
     level l and the latent high-frequency ratio, on held-out images (evaluate.py recon).
  B  The frequency diagnosis vs latent channels d (same compression): F1 PSNR of D(z_low) and D(z_high)
     at r = 0.25, and F3, the latent HF energy of E(lowpass(x, r0)) across r0 (evaluate.py diagnose); for
     the ViT VAE and for a DC-AE-style conv autoencoder (train_vae.py --arch dcae), with whether and where
     F3 peaks inside the r0 sweep (Finding 3, FreqWarm's precondition).
  C  SiT on denoise levels 0-3, FDA on levels 0-2, FreqWarm at several r0 vs the baseline, at equal steps:
     final validation loss (EMA, held-out latents; comparable across runs of the same level) and the
     offline dead-leaves metric fd_dl / class_acc_dl of class-balanced samples (never called FID).
  D  FreqWarm where Finding 3 holds: SiT on the conv autoencoder of part B with the clearest F3 peak,
     baseline vs FreqWarm at r0 = 0.2, at the peak (--r0 auto) and at 0.05, equal steps and warm-up; the
     validation loss, and the offline metric of the EMA weights kept along the way (--keep-every, scored by
     evaluate.py curve: a metric-vs-step curve). Not run when no conv autoencoder shows an interior F3 peak.
  E  FreqWarm where the paper finds its gain, more latent channels: one conv layout (tiny-f4w256, f4: 8 x 8
     latents at 32 px) with c = 4, 16, 64, 256, each trained until its held-out PSNR rises < 0.1 dB per round;
     F3 with its spread over 4 image subsets; SiT baseline, FreqWarm r0 = 0.2 and at the autoencoder's own peak
     (--r0 auto), 3 seeds, scored at every kept step by fd_dl of 1000 samples (checked first against known
     damage: evaluate.py metric-check), the generated-vs-real latent spectrum and the validation loss; then the
     linear / cosine schedules and a Gaussian cut where FreqWarm helps most. Table: gain vs channels, beside
     the paper's.
Parts A, B and B (conv) evaluate on OUT/heldout: dead-leaves images of seed HELDOUT_SEED, a set no run of the
study trains on (each run trains on the dead-leaves set of its own seed). Every command is printed and kept in
OUT/commands.txt; results in OUT/results.json. A rerun of the same command line finishes what is not finished:
a command counts as done only when OUT/done.json records it with the content of its inputs and output as they
are now (a stopped training run resumes; evaluations of a changed checkpoint run again). A folder holds one
--setting (OUT/study.json): another setting there is refused.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from common import UserError, atomic_write, check_out_dir, file_hash, read_jsonl, run_main, write_json
from vae import R0_SWEEP

HERE = os.path.dirname(os.path.abspath(__file__))

SETTINGS = {
    "smoke": dict(vae=["--preset", "smoke"], image_size=16, sit=["--preset", "smoke", "--steps", "4"], seeds=2, dims=(4, 8),
                  levels=(0, 1), fda_levels=(0,), r0s=(0.2,), n_samples=20, sample_steps=3, n_eval=16,
                  dl=["--dl-train-images", "200", "--dl-steps", "30"],
                  dcae=["--preset", "dcae-smoke"], dcae_size=16, dcae_dims=(4,), dcae_seeds=1,
                  d_sit=["--preset", "smoke", "--val-every", "2"], d_kept=(2, 4), d_seeds=1, d_r0s=("auto",),
                  e_dcae=["--preset", "dcae-smoke", "--val-every", "2"], e_size=16, e_dims=(4,), e_ae_round=2,
                  e_ae_max=4, e_sit=["--preset", "smoke", "--val-every", "2"], e_kept=(2, 4), e_seeds=1,
                  e_samples=20, e_spectrum=16, e_check=["--n", 10, "--subsets", 2], e_stages=2),
    "cpu": dict(vae=["--preset", "cpu-demo", "--steps", "300", "--stats-images", "1000", "--val-every", "100"],
                image_size=32,
                sit=["--preset", "cpu-demo", "--steps", "300", "--val-every", "100", "--sample-every", "100000"],
                seeds=3, dims=(4, 16, 64), levels=(0, 1, 2, 3), fda_levels=(0, 1), r0s=(0.05, 0.2, 0.4),
                n_samples=200, sample_steps=25, n_eval=256, dl=[],
                dcae=["--preset", "dcae-cpu", "--steps", "300", "--stats-images", "1000", "--val-every", "100"],
                dcae_size=32, dcae_dims=(4, 16, 64, 128), dcae_seeds=3,
                d_sit=["--preset", "cpu-demo", "--val-every", "250", "--sample-every", "100000"],
                d_kept=(500, 1000, 1500, 2000), d_seeds=3, d_r0s=(0.2, "auto", 0.05),
                e_dcae=["--preset", "dcae-cpu", "--dcae-config", "tiny-f4w256", "--stats-images", "1000",
                        "--val-every", "200"], e_size=32, e_dims=(4, 16, 64, 256), e_ae_round=400, e_ae_max=2400,
                e_sit=["--preset", "cpu-demo", "--val-every", "400", "--sample-every", "100000"],
                e_kept=(400, 800, 1200, 1600), e_seeds=3, e_samples=1000, e_spectrum=256,
                e_check=["--n", 1000, "--subsets", 3], e_stages=4),
    "gpu": dict(vae=["--size", "tiny", "--image-size", "64", "--n-images", "20000", "--steps", "20000",
                     "--global-batch", "128", "--lr", "5e-4", "--perceptual-weight", "0", "--gan-weight", "0",
                     "--val-every", "2000", "--workers", "8"], image_size=64,
                sit=["--model", "S/2", "--n-images", "20000", "--steps", "20000", "--global-batch", "256",
                     "--lr", "2e-4", "--cache-latents", "--val-every", "2000", "--sample-every", "100000",
                     "--workers", "8"],
                seeds=3, dims=(4, 16, 64), levels=(0, 1, 2, 3), fda_levels=(0, 1, 2), r0s=(0.05, 0.2, 0.4),
                n_samples=1000, sample_steps=50, n_eval=1000, dl=[],
                dcae=["--arch", "dcae", "--dcae-config", "tiny-f8", "--image-size", "64", "--n-images", "20000",
                      "--steps", "20000", "--global-batch", "128", "--lr", "5e-4", "--perceptual-weight", "0",
                      "--gan-weight", "0", "--val-every", "2000", "--workers", "8"],
                dcae_size=64, dcae_dims=(4, 16, 64, 128), dcae_seeds=3,
                d_sit=["--model", "S/2", "--n-images", "20000", "--global-batch", "256", "--lr", "2e-4",
                       "--cache-latents", "--val-every", "2000", "--ckpt-every", "5000", "--sample-every", "100000",
                       "--workers", "8"],
                d_kept=(5000, 10000, 15000, 20000), d_seeds=3, d_r0s=(0.2, "auto", 0.05),
                e_dcae=["--arch", "dcae", "--dcae-config", "tiny-f4w256", "--image-size", "64", "--n-images", "20000",
                        "--global-batch", "128", "--lr", "5e-4", "--perceptual-weight", "0", "--gan-weight", "0",
                        "--stats-images", "5000", "--val-every", "1000", "--workers", "8"],
                e_size=64, e_dims=(4, 16, 64, 256), e_ae_round=4000, e_ae_max=40000,
                e_sit=["--model", "S/2", "--n-images", "20000", "--global-batch", "256", "--lr", "2e-4",
                       "--cache-latents", "--val-every", "2500", "--ckpt-every", "5000", "--sample-every", "100000",
                       "--workers", "8"],
                e_kept=(5000, 10000, 15000, 20000), e_seeds=3, e_samples=5000, e_spectrum=1000,
                e_check=["--n", 5000, "--subsets", 3], e_stages=4),
}
R0_AUTO_REFUSED = "error: --r0 auto:"      # train_diffusion.py's refusal of a curve without a peak above its spread
HELDOUT_SEED = 1000         # dead-leaves seed of the evaluation images: no run trains on it (runs: seeds 0 ..)
PLAIN = ["--mlsr-fractions", "0", "0", "0", "0", "--mlsr-sigmas", "0", "0", "0", "0"]


class Runner:
    """Runs each command of the study, skipping one only when it already finished with exactly these settings.

    A command is done when OUT/done.json records this very command line with the content of its inputs and
    of its output as they are now (file hashes), not merely when its output exists. Otherwise it runs again:
    a training run resumes from its last.pt (a stopped run continues, a finished one has nothing to train),
    and an evaluation's outputs from other inputs (`clear`) are removed first. Each is logged to
    OUT/commands.txt.
    """

    def __init__(self, out):
        self.out = out
        os.makedirs(out, exist_ok=True)
        self.log = open(os.path.join(out, "commands.txt"), "a")
        self.done_path = os.path.join(out, "done.json")
        self.done = {}
        if os.path.isfile(self.done_path):
            with open(self.done_path) as f:
                self.done = json.load(f)

    def __call__(self, script, *args, output, inputs=(), clear=(), tolerate=None):
        """Run once (see the class); a failure stops the study, unless its error line contains `tolerate`: then
        that line is returned (an outcome to report, e.g. --r0 auto refusing a curve without a peak)."""
        cmd = [sys.executable, os.path.join(HERE, script), *map(str, args)]
        line = " ".join(["python", script, *map(str, args)])
        key = os.path.relpath(output, self.out)
        state = {"command": line, "inputs": {os.path.relpath(p, self.out): content_hash(p) for p in inputs}}
        if os.path.exists(output) and self.done.get(key) == {**state, "output": content_hash(output)}:
            return
        if tolerate and self.done.get(key, {}).get("refused") and \
                self.done[key] == {**state, "refused": self.done[key]["refused"]}:
            return self.done[key]["refused"]                        # refused before with these very inputs
        for path in clear:                                         # outputs of other inputs or settings
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        print(f"$ {line}", flush=True)
        self.log.write(line + "\n"), self.log.flush()
        t0 = time.time()
        p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
        last = (p.stderr.strip().splitlines() or [""])[-1]
        if p.returncode != 0 and tolerate and tolerate in last:
            print(f"  refused: {last}", flush=True)
            self.done[key] = {**state, "refused": last}
            write_json(self.done_path, self.done)
            return last
        if p.returncode != 0:
            sys.exit(f"error: the study stopped: `{line}` failed:\n{p.stderr[-2000:]}")
        print(f"  ({time.time() - t0:.0f} s)", flush=True)
        self.done[key] = {**state, "output": content_hash(output)}
        write_json(self.done_path, self.done)


def content_hash(path):
    """A file's content hash; for a folder, that of its files' names and contents."""
    if not os.path.isdir(path):
        return file_hash(path)
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if not f.startswith("."))
    return hashlib.sha256(repr([(os.path.relpath(f, path), file_hash(f)) for f in files]).encode()).hexdigest()[:16]


def heldout_data(run, s, out):
    """The evaluation images of parts A and B: s["n_eval"] dead-leaves images of seed HELDOUT_SEED at the
    VAEs' resolution, written once to OUT/heldout as an image folder. Every run of the study trains on the
    dead-leaves set of its own seed (0 .. seeds - 1), so these images are held out of all of them."""
    assert s["seeds"] <= HELDOUT_SEED
    folder = os.path.join(out, "heldout")
    run("data.py", "export", "--out", folder, "--n", s["n_eval"], "--resolution", s["image_size"],
        "--seed", HELDOUT_SEED, output=folder, clear=[folder])
    return ["--data", folder, "--n", "all"]


def spread(values):
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] +
                     ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def part_a(run, s, out, heldout):
    """MLSR vs plain VAE: PSNR per level and latent HF ratio (recon on the held-out images), both
    evaluated with the paper's S_l (p_l = 0, .25, .5, .75), whatever they were trained with."""
    res = {}
    for name, extra in (("MLSR", []), ("plain", PLAIN)):
        for seed in range(s["seeds"]):
            d = os.path.join(out, f"vae-{name}-s{seed}")
            ck, rec = os.path.join(d, "last.pt"), os.path.join(d, "recon.json")
            run("train_vae.py", *s["vae"], *extra, "--seed", seed, "--out", d, output=ck)
            run("evaluate.py", "recon", "--vae", ck, *heldout, "--seed", 1, "--mlsr-fractions", 0, 0.25, 0.5, 0.75,
                "--out", d, output=rec, inputs=[ck, heldout[1]], clear=[rec])
            res.setdefault(name, []).append(json.load(open(os.path.join(d, "recon.json")))["rows"])
    rows = []
    for name, runs in res.items():
        for level in range(4):
            rows.append([name, level, spread([r[level]["psnr"] for r in runs]), spread([r[level]["ssim"] for r in runs]),
                         spread([r[level]["latent_hf_ratio@0.25"] for r in runs])])
    gap = [np.mean([r[3]["psnr"] - r[0]["psnr"] for r in res["MLSR"]]),
           np.mean([r[3]["psnr"] - r[0]["psnr"] for r in res["plain"]])]
    text = table(["VAE", "level l", "PSNR D(S_l(z)) dB", "SSIM", "latent HF ratio"], rows)
    text += (f"\n\nPSNR(level 3) - PSNR(level 0): MLSR {gap[0]:+.3f} dB, plain {gap[1]:+.3f} dB "
             f"(the paper: within about 0.05 dB for MLSR)")
    return {"rows": res}, text


def part_b(run, s, out, heldout):
    """Diagnosis vs latent channels at the same compression (on the held-out images)."""
    res = {}
    for dim in s["dims"]:
        for seed in range(s["seeds"]):
            d = os.path.join(out, f"vae-d{dim}-s{seed}")
            ck, diag = os.path.join(d, "last.pt"), os.path.join(d, "diagnosis", "diagnosis.json")
            run("train_vae.py", *s["vae"], "--latent-dim", dim, "--seed", seed, "--out", d, output=ck)
            run("evaluate.py", "diagnose", "--vae", ck, *heldout, "--seed", 1, "--out", os.path.dirname(diag),
                output=diag, inputs=[ck, heldout[1]], clear=[os.path.dirname(diag)])
            res.setdefault(dim, []).append(json.load(open(os.path.join(d, "diagnosis", "diagnosis.json"))))
    first = next(iter(res.values()))[0]
    i25, r0s = first["radii"].index(0.25), first["f3_r0"]
    rows = []
    for dim, runs in res.items():
        f3 = np.array([r["f3_latent_hf_energy"] for r in runs])                         # (seeds, len(r0s))
        peak = [r0s[i] for i in f3.argmax(1)]
        rows.append([dim, spread([r["f1_psnr_low"][i25] for r in runs]), spread([r["f1_psnr_high"][i25] for r in runs]),
                     " / ".join(f"{v:.3f}" for v in f3.mean(0)), ", ".join(f"{p:g}" for p in peak)])
    text = table(["latent channels d", "F1 PSNR D(z_low) @0.25", "F1 PSNR D(z_high) @0.25",
                  f"F3 latent HF energy, mean over seeds, r0 = {' / '.join(f'{r:g}' for r in r0s)}",
                  "F3 argmax r0 per seed"], rows)
    return {"runs": {str(k): v for k, v in res.items()}}, text


def f3_prominence(energy):
    """How far F3's interior peak stands above the curve's ends: max / max(first, last) - 1, or None when the
    maximum is at an end of the r0 sweep (no interior peak)."""
    i = int(np.argmax(energy))
    return energy[i] / max(energy[0], energy[-1]) - 1 if 0 < i < len(energy) - 1 else None


def part_b_conv(run, s, out, heldout):
    """Diagnosis vs latent channels of the conv autoencoder (--arch dcae): F1, the F3 curve, its interior peak,
    on the held-out images (at the autoencoders' resolution)."""
    assert s["dcae_size"] == s["image_size"], "the held-out images are at image_size"
    res, runs = {}, []
    for dim in s["dcae_dims"]:
        for seed in range(s["dcae_seeds"]):
            d = os.path.join(out, f"dcae-d{dim}-s{seed}")
            ck, folder, diag = (os.path.join(d, "last.pt"), os.path.join(d, "diffusers"),
                                os.path.join(d, "diagnosis", "diagnosis.json"))
            run("train_vae.py", *s["dcae"], "--latent-dim", dim, "--seed", seed, "--out", d, output=ck)
            run("evaluate.py", "diagnose", "--vae", "diffusers:" + folder, "--image-size", s["dcae_size"],
                *heldout, "--seed", 1, "--out", os.path.dirname(diag),
                output=diag, inputs=[ck, folder, heldout[1]], clear=[os.path.dirname(diag)])
            r = json.load(open(diag))
            res.setdefault(dim, []).append(r)
            runs.append(dict(dim=dim, seed=seed, folder=folder, peak_r0=r["f3_peak_r0"],
                             prominence=f3_prominence(r["f3_latent_hf_energy"]),
                             stands=r.get("f3_subsets", {}).get("stands", False)))
    i25, r0s = res[s["dcae_dims"][0]][0]["radii"].index(0.25), list(R0_SWEEP)
    rows = []
    for dim, rs in res.items():
        f3 = np.array([r["f3_latent_hf_energy"] for r in rs])                           # (seeds, len(r0s))
        mine = [r for r in runs if r["dim"] == dim]
        rows.append([dim, spread([r["f1_psnr_low"][i25] for r in rs]), spread([r["f1_psnr_high"][i25] for r in rs]),
                     " / ".join(f"{v:.3f}" for v in f3.mean(0)),
                     ", ".join(f"{r['peak_r0']:g} (+{r['prominence']:.1%}, "
                               f"{'stands above' if r['stands'] else 'within'} its spread)" if r["peak_r0"] else "none"
                               for r in mine)])
    text = table(["latent channels c", "F1 PSNR D(z_low) @0.25", "F1 PSNR D(z_high) @0.25",
                  f"F3 latent HF energy, mean over seeds, r0 = {' / '.join(f'{r:g}' for r in r0s)}",
                  "F3 interior peak r0 per seed (height above the higher end)"], rows)
    peaked = [r for r in runs if r["peak_r0"] is not None and r["stands"]]      # above its spread over 4 subsets
    clearest = max(peaked, key=lambda r: r["prominence"]) if peaked else None
    if clearest:
        text += (f"\n\n{len(peaked)} of {len(runs)} conv autoencoders show an interior F3 peak that stands above "
                 f"its spread over image subsets; the clearest: "
                 f"c = {clearest['dim']}, seed {clearest['seed']}, at r0 = {clearest['peak_r0']:g} "
                 f"({clearest['prominence']:+.1%} above the higher end of the curve).")
    else:
        text += ("\n\nNo conv autoencoder shows an interior F3 peak that stands above its spread over image subsets "
                 "at this setting (curves above): part D is not run.")
    return {"runs": {str(k): v for k, v in res.items()}, "peaks": runs, "clearest": clearest}, text


def part_d(run, s, out, clearest):
    """SiT on the conv autoencoder with the clearest F3 peak: baseline and FreqWarm at each r0 of d_r0s (auto:
    the run's own choice at the F3 peak), each trained once to d_kept[-1] steps, keeping its EMA weights at the
    steps d_kept; `evaluate.py curve` then samples every kept checkpoint and scores it with the offline metric."""
    steps, keep = s["d_kept"][-1], s["d_kept"][0]
    vae, warm = "diffusers:" + clearest["folder"], steps // 2                        # warm-up: half the steps
    configs = [("baseline", [])] + [(f"FreqWarm r0={r}", ["--freqwarm", "--r0", r, "--warmup-steps", warm])
                                    for r in s["d_r0s"]]
    trained, refused = [], {}
    for name, extra in configs:
        for seed in range(s["d_seeds"]):
            d = os.path.join(out, "sitd-" + name.replace(" ", "").replace("=", "") + f"-s{seed}")
            err = run("train_diffusion.py", *s["d_sit"], *extra, "--vae", vae, "--image-size", s["dcae_size"],
                      "--steps", steps, "--keep-every", keep, "--seed", seed, "--out", d,
                      output=os.path.join(d, "last.pt"), tolerate=R0_AUTO_REFUSED)
            if err:
                refused.setdefault(name, []).append(f"seed {seed}: {err}")
            else:
                trained.append((name, d))
    res = {}
    if trained:
        cdir = os.path.join(out, "partD-curve")
        run("evaluate.py", "curve", *[d for _, d in trained], "--num-samples", s["n_samples"], "--batch", 100,
            "--sample-steps", s["sample_steps"], "--cfg-scale", 2.0, *s["dl"], "--out", cdir,
            output=os.path.join(cdir, "curve.json"), inputs=[os.path.join(d, "last.pt") for _, d in trained],
            clear=[cdir])
        points = {r["dir"]: r["points"] for r in json.load(open(os.path.join(cdir, "curve.json")))["runs"]}
        for name, d in trained:
            val = [r for r in read_jsonl(os.path.join(d, "metrics.jsonl")) if "val_loss" in r]
            ck = torch.load(os.path.join(d, "last.pt"), map_location="cpu", weights_only=True)
            curve = [{"step": p["step"], "fd_dl": p["fd_dl"], "class_acc_dl": p.get("class_acc_dl")}
                     for p in points[d]]
            res.setdefault(name, []).append({"val_loss": val[-1]["val_loss"], "step": val[-1]["step"],
                                             "r0": ck["freqwarm"]["r0"] if ck["freqwarm"]["enabled"] else None,
                                             "r0_auto": ck["freqwarm"].get("auto"), "curve": curve})
    rows = []
    for name, runs in res.items():
        r0 = ", ".join(sorted({f"{r['r0']:g}" for r in runs})) if runs[0]["r0"] is not None else "-"
        acc = [r["curve"][-1]["class_acc_dl"] for r in runs]
        rows.append([name, r0, runs[0]["step"], spread([r["val_loss"] for r in runs]),
                     *[spread([r["curve"][i]["fd_dl"] for r in runs]) for i in range(len(runs[0]["curve"]))],
                     spread(acc) if None not in acc else "-"])
    kept = list(range(keep, steps + 1, keep))
    text = table(["SiT run", "r0 used", "step", "val loss (EMA, held-out)",
                  *[f"fd_dl @ {k}" for k in kept], "class_acc_dl"], rows)
    text += (f"\n\nAutoencoder: conv c = {clearest['dim']}, seed {clearest['seed']} (F3 peak at r0 = "
             f"{clearest['peak_r0']:g} on the held-out images); FreqWarm warm-up {warm} of {steps} steps; fd_dl is "
             f"the offline dead-leaves metric (lower is better) of the EMA weights kept every {keep} steps "
             f"(`evaluate.py curve`, {s['n_samples']} samples each).")
    for name, lines in refused.items():
        text += f"\n\n{name} refused (no run): " + "; ".join(lines)
    if res:
        plot_curves(res, os.path.join(out, "partD_fd_dl_vs_step.png"))
        text += f"\n\nCurve: {os.path.join(out, 'partD_fd_dl_vs_step.png')} (mean over seeds)."
    return {"runs": res, "refused": refused, "autoencoder": clearest}, text


PAPER_CHANNELS = [(32, 5.75, 5.74), (128, 13.84, 9.42), (512, 54.84, 42.66)]    # FreqWarm's DC-AE f32 channel
# ablation: latent channels, gFID of the baseline, gFID with FreqWarm (r0 = 0.2; the summary's table)


def val_curve(run_dir, key):
    """[(step, value)] of a run's validation lines (metrics.jsonl) that hold `key`."""
    path = os.path.join(run_dir, "metrics.jsonl")
    return [(r["step"], r[key]) for r in read_jsonl(path) if key in r] if os.path.isfile(path) else []


def train_until_flat(run, s, d, extra):
    """A conv autoencoder of part E, trained in rounds of e_ae_round steps (resumed; the learning rate is
    constant) until its held-out PSNR (val_psnr_l0, EMA) rose by less than 0.1 dB over the last round, or
    e_ae_max steps. Returns (steps, PSNR, its rise over the last round, whether it flattened)."""
    ck, steps = os.path.join(d, "last.pt"), s["e_ae_round"]
    while True:
        done = max([st for st, _ in val_curve(d, "val_psnr_l0")], default=-1)
        if done < steps:                                        # a rerun skips the rounds it already trained
            run("train_vae.py", *s["e_dcae"], *extra, "--steps", steps, "--out", d, output=ck)
        psnr = dict(val_curve(d, "val_psnr_l0"))
        rise = psnr[steps] - psnr.get(steps - s["e_ae_round"], -math.inf)       # Stage 1 validates from its
        if rise < 0.1 or steps >= s["e_ae_max"]:                                 # first --val-every on
            return steps, psnr[steps], rise, rise < 0.1
        steps += s["e_ae_round"]


def paired(runs_a, runs_b, key, i=-1):
    """(mean, std, n) over seeds of b - a at kept point i; runs are paired by seed (same initial weights and
    data order). None when no seed has the value."""
    a = {r["seed"]: r["points"][i][key] for r in runs_a if key in r["points"][i]}
    b = {r["seed"]: r["points"][i][key] for r in runs_b if key in r["points"][i]}
    diff = [b[k] - a[k] for k in sorted(set(a) & set(b))]
    return (float(np.mean(diff)), float(np.std(diff, ddof=1)) if len(diff) > 1 else 0.0, len(diff)) if diff else None


def fmt_pair(p):
    return "-" if p is None else f"{p[0]:+.3f} ± {p[1]:.3f}" + ("" if p[2] > 1 else " (1 seed)")


def part_e(run, s, out, heldout):
    """FreqWarm where the paper finds its gain: latent channels c = e_dims of one conv layout (tiny-f4w256: f4,
    8 x 8 latents at 32 px), each trained until its PSNR flattens; per c the F3 curve with its spread over 4
    image subsets; SiT as baseline, FreqWarm r0 = 0.2 and FreqWarm at the autoencoder's own peak (--r0 auto:
    refused where the peak does not stand above its spread), e_seeds seeds each; scored at every kept step by
    fd_dl (e_samples samples; `evaluate.py metric-check` first shows what it resolves), the latent spectrum of
    the samples against real latents (latent_hf_log_ratio) and the validation loss. Then, at the c where
    FreqWarm helps most, the linear and cosine schedules and a soft (Gaussian) cut at r0 = 0.2."""
    assert s["e_size"] == s["image_size"], "the held-out images are at image_size"
    check = os.path.join(out, "partE-metric-check")
    dl = s["dl"] or []
    run("evaluate.py", "metric-check", "--image-size", s["e_size"], *s["e_check"], *dl, "--out", check,
        output=os.path.join(check, "metric_check.json"), clear=[check])
    mc = json.load(open(os.path.join(check, "metric_check.json")))
    steps, keep = s["e_kept"][-1], s["e_kept"][0]
    warm = steps // 2                                               # the warm-up: half the steps, a kept step
    assert list(s["e_kept"]) == list(range(keep, steps + 1, keep)) and warm in s["e_kept"], s["e_kept"]
    fw = ["--freqwarm", "--warmup-steps", warm, "--r0"]
    arms = [("baseline", []), ("FreqWarm r0=0.2", [*fw, 0.2]), ("FreqWarm r0=auto", [*fw, "auto"])]
    stages = ["--freqwarm-stages", s["e_stages"]]
    extra_arms = [("linear schedule", [*fw, 0.2, "--freqwarm-schedule", "linear", *stages]),
                  ("cosine schedule", [*fw, 0.2, "--freqwarm-schedule", "cosine", *stages]),
                  ("gaussian cut", [*fw, 0.2, "--lowpass-kind", "gaussian"])]
    ae, res, refused = {}, {}, {}

    def train_arms(c, folder, configs):
        trained = []
        for name, flags in configs:
            for seed in range(s["e_seeds"]):
                d = os.path.join(out, f"site-c{c}-" + name.replace(" ", "").replace("=", "") + f"-s{seed}")
                err = run("train_diffusion.py", *s["e_sit"], *flags, "--vae", "diffusers:" + folder, "--image-size",
                          s["e_size"], "--steps", steps, "--keep-every", keep, "--seed", seed, "--out", d,
                          output=os.path.join(d, "last.pt"), inputs=[folder], tolerate=R0_AUTO_REFUSED)
                if err:
                    refused.setdefault((c, name), []).append(f"seed {seed}: {err}")
                else:
                    trained.append((name, d))
        return trained

    def score(c, trained, tag=""):
        """evaluate.py curve over these runs into its own folder (OUT/partE-curve-cC[-TAG])."""
        cdir = os.path.join(out, f"partE-curve-c{c}{tag}")
        run("evaluate.py", "curve", *[d for _, d in trained], "--num-samples", s["e_samples"], "--batch", 100,
            "--sample-steps", s["sample_steps"], "--cfg-scale", 2.0, "--spectrum-samples", s["e_spectrum"], *dl,
            "--out", cdir, output=os.path.join(cdir, "curve.json"),
            inputs=[os.path.join(d, "last.pt") for _, d in trained])
        points = {r["dir"]: r for r in json.load(open(os.path.join(cdir, "curve.json")))["runs"]}
        for name, d in trained:
            ck = torch.load(os.path.join(d, "last.pt"), map_location="cpu", weights_only=True)
            runs = res.setdefault(c, {}).setdefault(name, {})
            runs[d] = {"seed": points[d]["seed"], "points": points[d]["points"], "dir": d,
                       "r0": ck["freqwarm"]["r0"] if ck["freqwarm"]["enabled"] else None}

    for c in s["e_dims"][:1] + s["e_dims"][:0:-1]:      # smallest c, then from the largest down: a stopped
        d = os.path.join(out, f"dcae-e-c{c}")              # study resumes, and has the widest contrast first
        ae_steps, psnr, rise, flat = train_until_flat(run, s, d, ["--latent-dim", c, "--seed", 0])
        diag = os.path.join(d, "diagnosis", "diagnosis.json")
        run("evaluate.py", "diagnose", "--vae", "diffusers:" + os.path.join(d, "diffusers"), "--image-size",
            s["e_size"], *heldout, "--seed", 1, "--out", os.path.dirname(diag), output=diag,
            inputs=[os.path.join(d, "last.pt"), heldout[1]], clear=[os.path.dirname(diag)])
        ae[c] = {"steps": ae_steps, "psnr": psnr, "rise": rise, "flat": flat, "diagnosis": json.load(open(diag)),
                 "folder": os.path.join(d, "diffusers")}
        score(c, train_arms(c, ae[c]["folder"], arms))
    runs = lambda c, name: list(res[c].get(name, {}).values())                          # by seed
    gains = {c: paired(runs(c, "baseline"), runs(c, "FreqWarm r0=0.2"), "fd_dl") for c in res}
    helps = {c: g for c, g in gains.items() if g and g[0] < 0 and -g[0] > g[1]}       # lower fd_dl, beyond spread
    best = min(helps, key=lambda c: helps[c][0]) if helps else max(s["e_dims"])
    score(best, train_arms(best, ae[best]["folder"], extra_arms), "-schedules")    # compared with c's baseline
    res = {c: {name: runs(c, name) for name in res[c]} for c in res}
    return report_e(s, out, mc, ae, res, refused, best, helps, warm, steps)


def report_e(s, out, mc, ae, res, refused, best, helps, warm, steps):
    """Part E's tables and figures (results.json keeps every number)."""
    iw = list(s["e_kept"]).index(warm)
    text = (f"Sample metric check (`evaluate.py metric-check`, {mc['n']} held-out images per subset, {mc['subsets']} "
            f"subsets): fd_dl of undamaged images {mc['mean_std']['undamaged'][0]:.3f} ± "
            f"{mc['mean_std']['undamaged'][1]:.3f}; " + "; ".join(
                f"{f}: {'rises monotonically' if v['monotonic'] else 'NOT monotonic'}, every rise "
                f"{'above' if v['steps_above_spread'] else 'NOT above'} the spread" for f, v in mc["verdict"].items())
            + f". Samples per point below: {s['e_samples']}.\n\n")
    rows = []
    for c, a in sorted(ae.items()):
        f3 = a["diagnosis"].get("f3_subsets", {})
        peak = ("none" if f3.get("peak") is None else f"{f3['peak']:g}: {f3['height']:.3g} ± {f3['height_std']:.2g} "
                f"({'stands' if f3['stands'] else 'within spread'})")
        rows.append([c, f"{a['psnr']:.2f} dB at {a['steps']} ({'flat' if a['flat'] else 'still rising'}: "
                        f"{a['rise']:+.2f} dB over the last round)", peak])
    text += table(["latent channels c", "held-out PSNR (EMA, level 0)", "F3 interior peak r0: height above the "
                   "higher end, mean ± std over 4 image subsets"], rows)
    rows = []
    for c in sorted(res):
        base = res[c].get("baseline", [])
        for name in [n for n in res[c] if n != "baseline"]:
            r0 = ", ".join(sorted({f"{r['r0']:g}" for r in res[c][name]}))
            rows.append([c, name, r0,
                         *(fmt_pair(paired(base, res[c][name], k, iw)) for k in ("fd_dl", "latent_hf_log_ratio")),
                         *(fmt_pair(paired(base, res[c][name], k)) for k in ("fd_dl", "latent_hf_log_ratio",
                                                                             "val_loss"))])
    text += "\n\n" + table(
        ["c", "SiT run", "r0 used", f"Δ fd_dl @ {warm} (warm-up end)", f"Δ latent_hf_log_ratio @ {warm}",
         f"Δ fd_dl @ {steps}", f"Δ latent_hf_log_ratio @ {steps}", f"Δ val loss @ {steps}"], rows)
    text += ("\n\nΔ = run − baseline of the same seed (same initial weights and data order), mean ± std over "
             f"{s['e_seeds']} seeds; fd_dl lower is better; latent_hf_log_ratio 0 = the real latents' high "
             "frequencies, < 0 = missing. Paper (FreqWarm, DC-AE f32, gFID baseline -> FreqWarm): "
             + ", ".join(f"c{c} {b} -> {f}" for c, b, f in PAPER_CHANNELS) + ".")
    rows = []
    for c in sorted(res):
        for name, runs in res[c].items():
            late = [{k: r["points"][-1][k] - r["points"][-2][k] for k in ("val_loss", "fd_dl")
                     if k in r["points"][-1] and k in r["points"][-2]} for r in runs]
            rows.append([c, name, *(spread([x[k] for x in late if k in x]) if any(k in x for x in late) else "-"
                                    for k in ("val_loss", "fd_dl"))])
    text += ("\n\nDo the curves flatten? Change over the last kept interval, "
             f"{s['e_kept'][-2]} -> {steps}, mean ± std over seeds:\n\n"
             + table(["c", "SiT run", "Δ val loss", "Δ fd_dl"], rows))
    text += (f"\n\nSchedules and the soft cut ran at c = {best} "
             + ("(where FreqWarm r0 = 0.2 lowered fd_dl the most beyond its spread)." if best in helps else
                "(FreqWarm r0 = 0.2 lowered fd_dl beyond its spread at no c: the largest c)."))
    for (c, name), lines in refused.items():
        text += f"\n\nc = {c}, {name} refused (no run): " + "; ".join(lines)
    plot_e(res, best, iw, os.path.join(out, "partE_gain_vs_channels.png"), os.path.join(out, "partE_spectra.png"))
    text += f"\n\nFigures: {out}/partE_gain_vs_channels.png, {out}/partE_spectra.png."
    return {"metric_check": mc, "autoencoders": {str(c): {k: v for k, v in a.items() if k != "diagnosis"}
                                                 for c, a in ae.items()},
            "runs": {str(c): v for c, v in res.items()}, "best_c": best,
            "refused": {f"c{c} {n}": v for (c, n), v in refused.items()}}, text


def plot_e(res, best, iw, gain_path, spectra_path):
    """Gain vs channels (Δ fd_dl and Δ latent_hf_log_ratio of FreqWarm r0 = 0.2 at the last kept step, mean ±
    std over seeds) and the generated-vs-real latent spectra at c = best (baseline and FreqWarm, mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cs = sorted(c for c in res if "baseline" in res[c] and "FreqWarm r0=0.2" in res[c])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=110)
    for ax, key in zip(axes, ("fd_dl", "latent_hf_log_ratio")):
        g = [paired(res[c]["baseline"], res[c]["FreqWarm r0=0.2"], key) or (np.nan, 0, 0) for c in cs]
        ax.errorbar(cs, [x[0] for x in g], yerr=[x[1] for x in g], marker="o", capsize=3, color="k")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(xscale="log", xlabel="latent channels c", ylabel=f"Δ {key}, mean ± std over seeds",
               title="FreqWarm r0 = 0.2 − baseline")
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.grid(alpha=0.3)
    save_png(fig, gain_path)
    which = [iw, -1]                 # top: power per band (the DC bin, ~0 once each channel's mean is removed, left
    fig, axes = plt.subplots(2, len(which), figsize=(4.2 * len(which), 5.6), dpi=110, squeeze=False)   # out);
    for j, i in enumerate(which):                                       # bottom: ln(P_gen / P_real) per band
        reals, radii = [], None
        for name, style in (("baseline", "-"), ("FreqWarm r0=0.2", "--")):
            spec = [r["points"][i]["spectrum"] for r in res[best].get(name, []) if "spectrum" in r["points"][i]]
            if spec:
                reals += [p["power_real"] for p in spec]                     # each seed's own held-out latents
                radii = np.asarray(spec[0]["radii"])
                gen = np.asarray([p["power_gen"] for p in spec])                 # (seeds, bands)
                ratio = np.log(gen[:, 1:] / np.asarray([p["power_real"] for p in spec])[:, 1:])
                axes[0, j].semilogy(radii[1:], gen.mean(0)[1:], style, marker="o", ms=2.5, label=f"{name}, generated")
                axes[1, j].errorbar(radii[1:], ratio.mean(0), yerr=ratio.std(0, ddof=1) if len(ratio) > 1 else None,
                                    ls=style, marker="o", ms=2.5, capsize=2, label=name)
        if reals:
            axes[0, j].semilogy(radii[1:], np.mean(reals, 0)[1:], ":", color="k", label="real latents")
        step = res[best]["baseline"][0]["points"][i]["step"] if res[best].get("baseline") else "?"
        axes[0, j].set(ylabel="power per band", title=f"c = {best}, step {step} (mean over seeds)")
        axes[1, j].axhline(0, color="gray", lw=0.8)
        axes[1, j].set(xlabel="radius (cycles/latent pixel)", ylabel="ln(P_gen / P_real) ± std over seeds")
        for ax in axes[:, j]:
            ax.legend(fontsize=7), ax.grid(alpha=0.3)
    save_png(fig, spectra_path)


def save_png(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def plot_curves(res, path):
    """fd_dl against training step, mean over seeds, one line per run configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    for name, runs in res.items():
        steps = [c["step"] for c in runs[0]["curve"]]
        ax.plot(steps, np.mean([[c["fd_dl"] for c in r["curve"]] for r in runs], axis=0), marker="o", ms=3,
                label=name)
    ax.set(xlabel="training step", ylabel="fd_dl (offline, lower is better)", title="Part D: metric vs step")
    ax.legend(fontsize=7), ax.grid(alpha=0.3)
    save_png(fig, path)


def part_c(run, s, out, vae):
    """SiT: denoise levels, FDA, FreqWarm r0, at equal steps; validation loss and the offline metric."""
    configs = [(f"level {l}", ["--denoise-level", l]) for l in s["levels"]]
    configs += [(f"level {l} + FDA", ["--denoise-level", l, "--fda"]) for l in s["fda_levels"]]
    configs += [(f"FreqWarm r0={r}", ["--freqwarm", "--r0", r]) for r in s["r0s"]]
    res, rows = {}, []
    for name, extra in configs:
        for seed in range(s["seeds"]):
            d = os.path.join(out, "sit-" + name.replace(" ", "").replace("+", "-").replace("=", "") + f"-s{seed}")
            ck, npz, gm = (os.path.join(d, f) for f in ("last.pt", "samples.npz", "generation_metrics.json"))
            run("train_diffusion.py", *s["sit"], *extra, "--vae", vae, "--seed", seed, "--out", d, output=ck,
                inputs=[vae])
            run("evaluate.py", "sample", "--ckpt", ck, "--num-samples", s["n_samples"],
                "--batch", 100, "--sample-steps", s["sample_steps"], "--cfg-scale", 2.0, "--seed", seed,
                "--out", os.path.join(d, "samples"), output=npz, inputs=[ck], clear=[os.path.join(d, "samples"), npz])
            run("evaluate.py", "fid", "--features", "deadleaves", "--samples", npz,
                "--record", d, *s["dl"], output=gm, inputs=[ck, npz], clear=[gm])
            val = [r for r in read_jsonl(os.path.join(d, "metrics.jsonl")) if "val_loss" in r]
            gm = next(iter(json.load(open(os.path.join(d, "generation_metrics.json"))).values()))
            res.setdefault(name, []).append({"val_loss": val[-1]["val_loss"], "step": val[-1]["step"],
                                             "fd_dl": gm["fd_dl"], "class_acc_dl": gm["class_acc_dl"]})
        runs = res[name]
        rows.append([name, runs[0]["step"], spread([r["val_loss"] for r in runs]), spread([r["fd_dl"] for r in runs]),
                     spread([r["class_acc_dl"] for r in runs])])
    text = table(["SiT run", "step", "val loss (EMA, held-out)", "fd_dl (lower is better)", "class_acc_dl"], rows)
    text += ("\n\nValidation losses compare runs of the same denoise level (their targets are S_l(z) at that "
             "level); fd_dl and class_acc_dl compare all runs (decoded samples).")
    return {"runs": res}, text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", default="cpu", choices=sorted(SETTINGS))
    p.add_argument("--out", default="runs/study", help="the study's folder (one setting per folder)")
    p.add_argument("--parts", default="ABCD", help="which parts to run, e.g. AC; E (FreqWarm vs latent channels) "
                                                   "runs only when named: about 5 hours alone on 2 CPU cores "
                                                   "(docs/results.md)")
    a = p.parse_args(argv)
    unknown = sorted(set(a.parts) - set("ABCDE"))
    if unknown or not a.parts:
        raise UserError(f"--parts {a.parts!r}: the parts are A, B, C, D and E (e.g. --parts AC)")
    s, out = SETTINGS[a.setting], os.path.abspath(a.out)
    check_out_dir(out)
    tag = os.path.join(out, "study.json")                       # which setting this folder holds
    if os.path.isfile(tag):
        with open(tag) as f:
            held = json.load(f)["setting"]
        if held != a.setting:
            raise UserError(f"--out {a.out} holds a study of --setting {held}, not {a.setting}: "
                            f"use another --out (each setting has its own folder)")
    else:
        write_json(tag, {"setting": a.setting})
    run = Runner(out)
    heldout = heldout_data(run, s, out) if set(a.parts) & set("ABDE") else None
    results, sections = {"setting": a.setting, "seeds": list(range(s["seeds"]))}, []
    t0 = time.time()
    if "A" in a.parts:
        results["A"], text = part_a(run, s, out, heldout)
        sections.append(f"## A. MLSR vs plain VAE ({a.setting}, seeds {results['seeds']})\n\n{text}")
    if "B" in a.parts:
        results["B"], text = part_b(run, s, out, heldout)
        sections.append(f"## B. Diagnosis vs latent channels ({a.setting}, seeds {results['seeds']})\n\n{text}")
    if "B" in a.parts or "D" in a.parts:                   # D trains on the conv autoencoders of part B
        results["B_conv"], text = part_b_conv(run, s, out, heldout)
        sections.append(f"## B (conv). DC-AE-style autoencoder: diagnosis vs latent channels ({a.setting}, "
                        f"seeds {list(range(s['dcae_seeds']))})\n\n{text}")
    if "C" in a.parts:
        vae = os.path.join(out, "vae-MLSR-s0", "last.pt")
        run("train_vae.py", *s["vae"], "--seed", 0, "--out", os.path.dirname(vae), output=vae)
        results["C"], text = part_c(run, s, out, vae)
        sections.append(f"## C. SiT: denoise levels, FDA, FreqWarm ({a.setting}, seeds {results['seeds']}, "
                        f"VAE vae-MLSR-s0)\n\n{text}")
    if "D" in a.parts:
        clearest = results["B_conv"]["clearest"]
        if clearest is None:
            sections.append(f"## D. FreqWarm where F3 peaks ({a.setting})\n\nNot run: no conv autoencoder of part B "
                            f"shows an interior F3 peak above its spread at this setting.")
        else:
            results["D"], text = part_d(run, s, out, clearest)
            sections.append(f"## D. FreqWarm where F3 peaks ({a.setting}, seeds {list(range(s['d_seeds']))})\n\n{text}")
    if "E" in a.parts:
        results["E"], text = part_e(run, s, out, heldout)
        sections.append(f"## E. FreqWarm vs latent channels ({a.setting}, seeds {list(range(s['e_seeds']))})\n\n{text}")
    report = "\n\n".join(sections) + f"\n\n({time.time() - t0:.0f} s; commands in {out}/commands.txt)\n"
    write_json(os.path.join(out, "results.json"), results)
    with atomic_write(os.path.join(out, "study.md"), text=True) as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    run_main(main)
