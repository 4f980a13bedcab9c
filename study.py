"""The reproduction study: do the papers' mechanisms show up at our scale? Runs the real commands, several seeds.

    python study.py --setting smoke  --out runs/study-smoke    # CPU, a few minutes (what CI runs)
    python study.py --setting cpu    --out runs/study          # CPU, about an hour on 2 cores
    python study.py --setting gpu    --out runs/study-gpu      # one GPU: 64 px, f8, larger models and VAEs
    python study.py --setting cpu --parts D --out runs/study   # the conv autoencoders of B, then D only
    (single process on purpose: each command below is a plain `python SCRIPT.py ...`; for torchrun, run them
     by hand from the printed command lines)

Three parts, each over --seeds seeds, tabulated as mean ± sample std over seeds in OUT/study.md:
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
     validation loss, and the offline metric at the end of each training segment (a metric-vs-step curve;
     the runs resume segment by segment). Not run when no conv autoencoder shows an interior F3 peak.
Every command is printed and kept in OUT/commands.txt; results in OUT/results.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from common import atomic_write, write_json
from vae import R0_SWEEP

HERE = os.path.dirname(os.path.abspath(__file__))

SETTINGS = {
    "smoke": dict(vae=["--preset", "smoke"], sit=["--preset", "smoke", "--steps", "4"], seeds=2, dims=(4, 8),
                  levels=(0, 1), fda_levels=(0,), r0s=(0.2,), n_samples=20, sample_steps=3, n_eval=16,
                  dl=["--dl-train-images", "200", "--dl-steps", "30"],
                  dcae=["--preset", "dcae-smoke"], dcae_size=16, dcae_dims=(4,), dcae_seeds=1,
                  d_sit=["--preset", "smoke", "--val-every", "2"], d_segments=(2, 4), d_seeds=1, d_r0s=("auto",)),
    "cpu": dict(vae=["--preset", "cpu-demo", "--steps", "300", "--stats-images", "1000", "--val-every", "100"],
                sit=["--preset", "cpu-demo", "--steps", "300", "--val-every", "100", "--sample-every", "100000"],
                seeds=3, dims=(4, 16, 64), levels=(0, 1, 2, 3), fda_levels=(0, 1), r0s=(0.05, 0.2, 0.4),
                n_samples=200, sample_steps=25, n_eval=256, dl=[],
                dcae=["--preset", "dcae-cpu", "--steps", "300", "--stats-images", "1000", "--val-every", "100"],
                dcae_size=32, dcae_dims=(4, 16, 64, 128), dcae_seeds=3,
                d_sit=["--preset", "cpu-demo", "--val-every", "250", "--sample-every", "100000"],
                d_segments=(500, 1000, 1500, 2000), d_seeds=3, d_r0s=(0.2, "auto", 0.05)),
    "gpu": dict(vae=["--size", "tiny", "--image-size", "64", "--n-images", "20000", "--steps", "20000",
                     "--global-batch", "128", "--lr", "5e-4", "--perceptual-weight", "0", "--gan-weight", "0",
                     "--val-every", "2000", "--workers", "8"],
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
                d_segments=(5000, 10000, 15000, 20000), d_seeds=3, d_r0s=(0.2, "auto", 0.05)),
}
PLAIN = ["--mlsr-fractions", "0", "0", "0", "0", "--mlsr-sigmas", "0", "0", "0", "0"]


class Runner:
    """Runs each command once (a finished run is skipped on rerun), logging it to OUT/commands.txt."""

    def __init__(self, out):
        self.out = out
        os.makedirs(out, exist_ok=True)
        self.log = open(os.path.join(out, "commands.txt"), "a")

    def __call__(self, script, *args, done=None, tolerate=None):
        """Run once; a failure stops the study, unless its error line contains `tolerate`: then that line is
        returned (an outcome to report, e.g. --r0 auto refusing a curve without a peak)."""
        cmd = [sys.executable, os.path.join(HERE, script), *map(str, args)]
        if done and os.path.exists(done):
            return
        line = " ".join(["python", script, *map(str, args)])
        print(f"$ {line}", flush=True)
        self.log.write(line + "\n"), self.log.flush()
        t0 = time.time()
        p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
        last = (p.stderr.strip().splitlines() or [""])[-1]
        if p.returncode != 0 and tolerate and tolerate in last:
            print(f"  refused: {last}", flush=True)
            return last
        if p.returncode != 0:
            sys.exit(f"error: the study stopped: `{line}` failed:\n{p.stderr[-2000:]}")
        print(f"  ({time.time() - t0:.0f} s)", flush=True)


def spread(values):
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] +
                     ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def part_a(run, s, out):
    """MLSR vs plain VAE: PSNR per level and latent HF ratio (recon on held-out dead-leaves images), both
    evaluated with the paper's S_l (p_l = 0, .25, .5, .75), whatever they were trained with."""
    res = {}
    for name, extra in (("MLSR", []), ("plain", PLAIN)):
        for seed in range(s["seeds"]):
            d = os.path.join(out, f"vae-{name}-s{seed}")
            run("train_vae.py", *s["vae"], *extra, "--seed", seed, "--out", d, done=os.path.join(d, "last.pt"))
            run("evaluate.py", "recon", "--vae", os.path.join(d, "last.pt"), "--n", s["n_eval"], "--seed", 1,
                "--mlsr-fractions", 0, 0.25, 0.5, 0.75, "--out", d, done=os.path.join(d, "recon.json"))
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


def part_b(run, s, out):
    """Diagnosis vs latent channels at the same compression."""
    res = {}
    for dim in s["dims"]:
        for seed in range(s["seeds"]):
            d = os.path.join(out, f"vae-d{dim}-s{seed}")
            run("train_vae.py", *s["vae"], "--latent-dim", dim, "--seed", seed, "--out", d,
                done=os.path.join(d, "last.pt"))
            run("evaluate.py", "diagnose", "--vae", os.path.join(d, "last.pt"), "--n", s["n_eval"], "--seed", 1,
                "--out", os.path.join(d, "diagnosis"), done=os.path.join(d, "diagnosis", "diagnosis.json"))
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


def part_b_conv(run, s, out):
    """Diagnosis vs latent channels of the conv autoencoder (--arch dcae): F1, the F3 curve, its interior peak."""
    res, runs = {}, []
    for dim in s["dcae_dims"]:
        for seed in range(s["dcae_seeds"]):
            d = os.path.join(out, f"dcae-d{dim}-s{seed}")
            run("train_vae.py", *s["dcae"], "--latent-dim", dim, "--seed", seed, "--out", d,
                done=os.path.join(d, "last.pt"))
            run("evaluate.py", "diagnose", "--vae", "diffusers:" + os.path.join(d, "diffusers"), "--image-size",
                s["dcae_size"], "--n", s["n_eval"], "--seed", 1, "--out", os.path.join(d, "diagnosis"),
                done=os.path.join(d, "diagnosis", "diagnosis.json"))
            r = json.load(open(os.path.join(d, "diagnosis", "diagnosis.json")))
            res.setdefault(dim, []).append(r)
            runs.append(dict(dim=dim, seed=seed, folder=os.path.join(d, "diffusers"), peak_r0=r["f3_peak_r0"],
                             prominence=f3_prominence(r["f3_latent_hf_energy"])))
    i25, r0s = res[s["dcae_dims"][0]][0]["radii"].index(0.25), list(R0_SWEEP)
    rows = []
    for dim, rs in res.items():
        f3 = np.array([r["f3_latent_hf_energy"] for r in rs])                           # (seeds, len(r0s))
        mine = [r for r in runs if r["dim"] == dim]
        rows.append([dim, spread([r["f1_psnr_low"][i25] for r in rs]), spread([r["f1_psnr_high"][i25] for r in rs]),
                     " / ".join(f"{v:.3f}" for v in f3.mean(0)),
                     ", ".join(f"{r['peak_r0']:g} (+{r['prominence']:.1%})" if r["peak_r0"] else "none" for r in mine)])
    text = table(["latent channels c", "F1 PSNR D(z_low) @0.25", "F1 PSNR D(z_high) @0.25",
                  f"F3 latent HF energy, mean over seeds, r0 = {' / '.join(f'{r:g}' for r in r0s)}",
                  "F3 interior peak r0 per seed (height above the higher end)"], rows)
    peaked = [r for r in runs if r["peak_r0"] is not None]
    clearest = max(peaked, key=lambda r: r["prominence"]) if peaked else None
    if clearest:
        text += (f"\n\n{len(peaked)} of {len(runs)} conv autoencoders show an interior F3 peak; the clearest: "
                 f"c = {clearest['dim']}, seed {clearest['seed']}, at r0 = {clearest['peak_r0']:g} "
                 f"({clearest['prominence']:+.1%} above the higher end of the curve).")
    else:
        text += "\n\nNo conv autoencoder shows an interior F3 peak at this setting (curves above): part D is not run."
    return {"runs": {str(k): v for k, v in res.items()}, "peaks": runs, "clearest": clearest}, text


def part_d(run, s, out, clearest):
    """SiT on the conv autoencoder with the clearest F3 peak: baseline and FreqWarm at each r0 of d_r0s (auto:
    the run's own choice at the F3 peak), trained in segments with the offline metric after each."""
    vae, warm = "diffusers:" + clearest["folder"], s["d_segments"][-1] // 2          # warm-up: half the steps
    configs = [("baseline", [])] + [(f"FreqWarm r0={r}", ["--freqwarm", "--r0", r, "--warmup-steps", warm])
                                    for r in s["d_r0s"]]
    res, refused = {}, {}
    for name, extra in configs:
        for seed in range(s["d_seeds"]):
            d = os.path.join(out, "sitd-" + name.replace(" ", "").replace("=", "") + f"-s{seed}")
            curve = []
            for k in s["d_segments"]:
                e = os.path.join(d, f"eval-{k:07d}")
                done = os.path.join(e, "generation_metrics.json")
                err = run("train_diffusion.py", *s["d_sit"], *extra, "--vae", vae, "--image-size", s["dcae_size"],
                          "--steps", k, "--seed", seed, "--out", d, done=done, tolerate="has no interior peak")
                if err:
                    refused.setdefault(name, []).append(f"seed {seed}: {err}")
                    break
                run("evaluate.py", "sample", "--ckpt", os.path.join(d, "last.pt"), "--num-samples", s["n_samples"],
                    "--batch", 100, "--sample-steps", s["sample_steps"], "--cfg-scale", 2.0, "--seed", seed,
                    "--out", os.path.join(e, "samples"), done=done)
                run("evaluate.py", "fid", "--features", "deadleaves", "--samples", os.path.join(e, "samples.npz"),
                    "--record", e, *s["dl"], done=done)
                gm = next(iter(json.load(open(done)).values()))
                curve.append({"step": k, "fd_dl": gm["fd_dl"], "class_acc_dl": gm["class_acc_dl"]})
            if len(curve) < len(s["d_segments"]):
                continue
            val = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl")) if '"val_loss"' in line]
            ck = torch.load(os.path.join(d, "last.pt"), map_location="cpu", weights_only=True)
            res.setdefault(name, []).append({"val_loss": val[-1]["val_loss"], "step": val[-1]["step"],
                                             "r0": ck["freqwarm"]["r0"] if ck["freqwarm"]["enabled"] else None,
                                             "r0_auto": ck["freqwarm"].get("auto"), "curve": curve})
    rows = []
    for name, runs in res.items():
        r0 = ", ".join(sorted({f"{r['r0']:g}" for r in runs})) if runs[0]["r0"] is not None else "-"
        rows.append([name, r0, runs[0]["step"], spread([r["val_loss"] for r in runs]),
                     *[spread([r["curve"][i]["fd_dl"] for r in runs]) for i in range(len(s["d_segments"]))],
                     spread([r["curve"][-1]["class_acc_dl"] for r in runs])])
    text = table(["SiT run", "r0 used", "step", "val loss (EMA, held-out)",
                  *[f"fd_dl @ {k}" for k in s["d_segments"]], "class_acc_dl"], rows)
    text += (f"\n\nAutoencoder: conv c = {clearest['dim']}, seed {clearest['seed']} (F3 peak at r0 = "
             f"{clearest['peak_r0']:g} on the diagnosis images); FreqWarm warm-up {warm} of {s['d_segments'][-1]} "
             f"steps; fd_dl is the offline dead-leaves metric (lower is better), after each segment.")
    for name, lines in refused.items():
        text += f"\n\n{name} refused (no run): " + "; ".join(lines)
    if res:
        plot_curves(res, os.path.join(out, "partD_fd_dl_vs_step.png"))
        text += f"\n\nCurve: {os.path.join(out, 'partD_fd_dl_vs_step.png')} (mean over seeds)."
    return {"runs": res, "refused": refused, "autoencoder": clearest}, text


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
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def part_c(run, s, out, vae):
    """SiT: denoise levels, FDA, FreqWarm r0, at equal steps; validation loss and the offline metric."""
    configs = [(f"level {l}", ["--denoise-level", l]) for l in s["levels"]]
    configs += [(f"level {l} + FDA", ["--denoise-level", l, "--fda"]) for l in s["fda_levels"]]
    configs += [(f"FreqWarm r0={r}", ["--freqwarm", "--r0", r]) for r in s["r0s"]]
    res, rows = {}, []
    for name, extra in configs:
        for seed in range(s["seeds"]):
            d = os.path.join(out, "sit-" + name.replace(" ", "").replace("+", "-").replace("=", "") + f"-s{seed}")
            run("train_diffusion.py", *s["sit"], *extra, "--vae", vae, "--seed", seed, "--out", d,
                done=os.path.join(d, "last.pt"))
            run("evaluate.py", "sample", "--ckpt", os.path.join(d, "last.pt"), "--num-samples", s["n_samples"],
                "--batch", 100, "--sample-steps", s["sample_steps"], "--cfg-scale", 2.0, "--seed", seed,
                "--out", os.path.join(d, "samples"), done=os.path.join(d, "samples.npz"))
            run("evaluate.py", "fid", "--features", "deadleaves", "--samples", os.path.join(d, "samples.npz"),
                "--record", d, *s["dl"], done=os.path.join(d, "generation_metrics.json"))
            val = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl")) if '"val_loss"' in line]
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
    p.add_argument("--out", default="runs/study")
    p.add_argument("--parts", default="ABCD", help="which parts to run, e.g. AC")
    a = p.parse_args(argv)
    s, out = SETTINGS[a.setting], os.path.abspath(a.out)
    run = Runner(out)
    results, sections = {"setting": a.setting, "seeds": list(range(s["seeds"]))}, []
    t0 = time.time()
    if "A" in a.parts:
        results["A"], text = part_a(run, s, out)
        sections.append(f"## A. MLSR vs plain VAE ({a.setting}, seeds {results['seeds']})\n\n{text}")
    if "B" in a.parts:
        results["B"], text = part_b(run, s, out)
        sections.append(f"## B. Diagnosis vs latent channels ({a.setting}, seeds {results['seeds']})\n\n{text}")
    if "B" in a.parts or "D" in a.parts:                   # D trains on the conv autoencoders of part B
        results["B_conv"], text = part_b_conv(run, s, out)
        sections.append(f"## B (conv). DC-AE-style autoencoder: diagnosis vs latent channels ({a.setting}, "
                        f"seeds {list(range(s['dcae_seeds']))})\n\n{text}")
    if "C" in a.parts:
        vae = os.path.join(out, "vae-MLSR-s0", "last.pt")
        run("train_vae.py", *s["vae"], "--seed", 0, "--out", os.path.dirname(vae), done=vae)
        results["C"], text = part_c(run, s, out, vae)
        sections.append(f"## C. SiT: denoise levels, FDA, FreqWarm ({a.setting}, seeds {results['seeds']}, "
                        f"VAE vae-MLSR-s0)\n\n{text}")
    if "D" in a.parts:
        clearest = results["B_conv"]["clearest"]
        if clearest is None:
            sections.append(f"## D. FreqWarm where F3 peaks ({a.setting})\n\nNot run: no conv autoencoder of part B "
                            f"shows an interior F3 peak at this setting.")
        else:
            results["D"], text = part_d(run, s, out, clearest)
            sections.append(f"## D. FreqWarm where F3 peaks ({a.setting}, seeds {list(range(s['d_seeds']))})\n\n{text}")
    report = "\n\n".join(sections) + f"\n\n({time.time() - t0:.0f} s; commands in {out}/commands.txt)\n"
    write_json(os.path.join(out, "results.json"), results)
    with atomic_write(os.path.join(out, "study.md"), text=True) as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
