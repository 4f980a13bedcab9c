"""What a setting means: settings that act only with others (the NEEDS tables), the MLSR fractions (checked where
they enter, part of an autoencoder's identity, fixed on resume, recorded with what they affect), a DC-AE's measured
scaling_factor, and runs grouped by what was asked for (compare / curve)."""
import json

import diffusers
import numpy as np
import pytest
import torch

import evaluate as ev
import fft_ops
import train_diffusion as td
import train_vae
from common import COMMON_NEEDS, UserError, check_needs, load_checkpoint, save_checkpoint
from data import build_dataset, random_subset, train_val_split
from helpers import assert_one_line_error
from test_pretrained_ae import in_process
from vae import MLSR_FILE, load_autoencoder, scalar_stats

# ----------------------------------------------------------------------------- settings that act only with others

SAMPLE = {"latent_scale": "0.5", "warmup_steps": "4", "disc_lr": "0.001", "perceptual_weights": "vgg16.pth",
          "ref": "ref.npz", "inception_path": "inception.pt", "push_to_hub": "user/name"}   # flags without default
OTHER = {"r0": "0.3", "cfg_scale": "2.0", "gan_weight": "0.3", "perceptual_weight": "0.5", "data": "a/folder",
         "resume": "auto", "val_images": "8",
         "features": {"inception": "deadleaves", "deadleaves": "inception"}}   # a value where a condition fails


def trainer_case(module):
    return module, None, ["--preset", "smoke"], {a.dest: a for a in module.parser()._actions}


EV_BASE = {"sample": ["sample", "--ckpt", "x.pt", "--out"], "fid": ["fid", "--samples", "s.npz", "--record"],
           "curve": ["curve", "r1", "--out"], "export": ["export", "--ckpt", "x.pt", "--out"],
           "recon": ["recon", "--vae", "v.pt", "--out"],
           "diagnose": ["diagnose", "--vae", "v.pt", "--out"],
           "spectrum": ["spectrum", "--ckpt", "x.pt", "--out"]}                 # each followed by a folder
TABLES = [trainer_case(train_vae), trainer_case(td)] + [(ev, cmd, EV_BASE[cmd], None) for cmd in ev.NEEDS]


def table_of(module, cmd):
    return {**COMMON_NEEDS, **module.NEEDS} if cmd is None else module.NEEDS[cmd]


def flag(dest):
    return "--" + dest.replace("_", "-")


def given(dest, default):
    """argv that sets `dest` on the command line (its default, if it has one: giving it explicitly still counts)."""
    if default is False:
        return [flag(dest)]
    if dest in SAMPLE:
        return [flag(dest), SAMPLE[dest]]
    return [flag(dest), *map(str, default if isinstance(default, (list, tuple)) else [default])]


def meet(c):
    if c.values == (None,):
        return [flag(c.dest), SAMPLE[c.dest]] if c.unless else []
    if c.unless:
        return [flag(c.dest), OTHER[c.dest]]
    return [flag(c.dest)] if c.values == (True,) else [flag(c.dest), str(c.values[0])]


def fail(c, actions):
    if c.values == (None,):
        return [] if c.unless else [flag(c.dest), SAMPLE[c.dest]]
    if c.unless:
        return [flag(c.dest), str(c.values[0])]
    if c.values == (True,):
        return []                                              # a switch left off
    other = OTHER.get(c.dest)
    if isinstance(other, dict):
        return [flag(c.dest), other[c.values[0]]]
    if other is None:
        other = next(str(v) for v in actions[c.dest].choices if v not in c.values)
    return [flag(c.dest), other]


CASES = [(m, cmd, base, actions, dest, i) for m, cmd, base, actions in TABLES
         for dest, conds in table_of(m, cmd).items() for i in range(len(conds))]


def parse(module, cmd, argv, out):
    """The script's own parsing and checks (trainers: get_args; evaluate.py: get_args, then validate)."""
    if cmd is None:
        return module.get_args(argv + ["--out", str(out)])
    a = ev.get_args(argv[:len(EV_BASE[cmd])] + [str(out)] + argv[len(EV_BASE[cmd]):])
    ev.validate(a)
    return a


@pytest.mark.parametrize("module,cmd,base,actions,dest,i", CASES,
                         ids=[f"{m.__name__}{' ' + cmd if cmd else ''}:{dest}:{i}" for m, cmd, _, _, dest, i in CASES])
def test_each_setting_that_needs_another_is_refused_without_it(module, cmd, base, actions, dest, i, tmp_path):
    """Generated from the NEEDS tables: each setting given on the command line while one of its conditions fails is
    refused in one line naming it and that condition (before the output folder is made); with every condition met
    it is accepted."""
    conds = table_of(module, cmd)[dest]
    default = actions[dest].default if actions else getattr(ev.get_args(base + ["out"]), dest)
    if actions and conds[i].values == (True,) and not conds[i].unless:
        assert actions[conds[i].dest].default is False                # leaving the switch off fails the condition
    others = [a for j, c in enumerate(conds) if j != i for a in meet(c)]
    argv = base + given(dest, default) + others + fail(conds[i], actions or {})
    with pytest.raises(UserError) as e:
        parse(module, cmd, argv, tmp_path / "out")
    msg = str(e.value)
    # named: this setting, or a condition flag given with it that fails the same condition (--r0 auto without
    # --freqwarm, given with --r0-auto-images)
    assert f"acts only {conds[i]}" in msg, msg
    assert msg.startswith(" ".join(given(dest, default))) or any(msg.startswith(f"{a} ") for a in others), msg
    assert not (tmp_path / "out").exists()
    ok = base + given(dest, default) + [a for c in conds for a in meet(c)]
    if cmd is None:
        if "--arch" in ok and ok[ok.index("--arch") + 1] == "dcae":
            ok[ok.index("smoke")] = "dcae-smoke"                  # a DC-AE takes a DC-AE preset (one line otherwise)
        args = module.get_args(ok + ["--out", str(tmp_path / "ok")])
    else:                                                          # the rest of validate needs real files
        args = check_needs(ev.get_args(base + [str(tmp_path / "ok")] + ok[len(base):]), ev.NEEDS[cmd])
    assert dest in args.explicit and dest not in args.inert


def test_preset_values_are_not_explicit_and_idle_ones_are_named_not_refused(tmp_path, capsys):
    """A preset's values are not 'given on the command line': the smoke preset's --fda-depth without --fda is
    recorded as inert, not refused; a flag given explicitly that idles a preset's settings (--gan-weight 0 under
    the smoke preset) names them in one note and runs."""
    a = td.get_args(["--preset", "smoke", "--out", str(tmp_path / "a"), "--lr", "0.01"])
    assert a.explicit == ["lr", "out"] and "fda_depth" in a.preset_set
    assert {"fda_depth", "r0", "warmup_frac", "lowpass_kind"} <= set(a.inert) and "lr" not in a.inert
    capsys.readouterr()
    v = train_vae.get_args(["--preset", "smoke", "--gan-weight", "0", "--out", str(tmp_path / "v")])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("note: ") and all(
        s in out[0] for s in ("--gan-start 3", "--disc-channels 16", "--disc-layers 2", "--preset smoke"))
    assert {"gan_start", "disc_channels", "disc_layers", "gan_real"} <= set(v.inert)
    assert "gan_start" not in train_vae.get_args(["--preset", "smoke", "--out", str(tmp_path / "w")]).inert


def test_a_baseline_given_a_freqwarm_setting_stops_before_any_work(tmp_path, capsys):
    """train_diffusion.py --r0 0.5 (or --warmup-steps 4) without --freqwarm: one line, exit 2, nothing written."""
    for extra in (["--r0", "0.5"], ["--warmup-steps", "4"], ["--fda-weight", "0.5"]):
        out = tmp_path / "sit"
        p = in_process(lambda: td.main(["--preset", "smoke", "--vae", "none.pt", "--out", str(out), *extra]), capsys)
        assert_one_line_error(p, " ".join(extra), "acts only with --")
        assert not out.exists()


@pytest.mark.parametrize("argv,extra", [(["compare", "r"], "--seed 1"), (["compare", "r"], "--workers 2"),
                                        (["fid", "--samples", "s.npz"], "--seed 1"),
                                        (["recon", "--vae", "v.pt"], "--no-bf16"),
                                        (["sample", "--ckpt", "x.pt"], "--workers 2"),
                                        (["export", "--ckpt", "x.pt", "--out", "o"], "--device cpu")])
def test_evaluate_commands_take_only_the_common_flags_they_act_on(argv, extra, capsys):
    """--seed, --device, --no-bf16, --workers: a command that never draws, runs a network in bf16 or decodes images
    does not take them (compare computes nothing; fid draws nothing; recon / diagnose run in float32)."""
    with pytest.raises(SystemExit) as e:
        ev.get_args(argv + extra.split())
    assert e.value.code == 2 and f"unrecognized arguments: {extra}" in capsys.readouterr().err


def test_a_resumed_run_does_not_compare_a_setting_that_acts_on_nothing(tmp_path):
    """A baseline whose checkpoint stores --r0 0.5 (an earlier version accepted it without --freqwarm) resumes
    without it: r0 acted on nothing. With --freqwarm, another r0 is refused as before."""
    import types
    from common import SEED_SCHEME, Run
    cpu = types.SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1, main=True)
    path = str(tmp_path / "ck.pt")
    for on, refused in (([], False), (["--freqwarm"], True)):
        args = td.get_args(["--preset", "smoke", "--out", str(tmp_path / "run"), "--resume", path, *on])
        save_checkpoint(path, {"kind": "sit", "config": {**vars(args), "r0": 0.5}, "step": 0,
                               "model_config": {"m": 1}, "data_fingerprint": "fp", "seeds": SEED_SCHEME})
        if refused:
            with pytest.raises(UserError, match="was trained with --r0 0.5, not 0.2: it may not change on resume"):
                Run(args, cpu, "sit", td.FIXED_ON_RESUME).resume("fp", {"m": 1})
        else:
            assert Run(args, cpu, "sit", td.FIXED_ON_RESUME).resume("fp", {"m": 1})["step"] == 0


def fake_run(folder, seed, config, step=4, val_loss=1.0, freqwarm=None):
    """A Stage-2 run folder as the trainers leave it: last.pt (config, step, FreqWarm record), metrics.jsonl."""
    folder.mkdir()
    ck = {"kind": "sit", "config": {"seed": seed, "out": str(folder), "steps": 4, **config}, "step": step,
          "freqwarm": freqwarm or {"enabled": False}}
    save_checkpoint(str(folder / "last.pt"), ck)
    (folder / "metrics.jsonl").write_text(json.dumps({"step": step, "val_loss": val_loss}) + "\n")
    return str(folder)


def test_compare_groups_by_what_acted_and_by_the_r0_that_was_asked(tmp_path):
    """Two baselines whose inert --r0 / --fda-depth differ (set by presets or defaults) are one setting, labelled
    without them; --r0 auto runs whose seeds chose different r0 are one setting, 'auto', shown with each chosen
    r0; a setting that acted in one run only (--fda-depth with --fda) does not lengthen the labels."""
    inert = ["fda_depth", "r0", "warmup_frac"]
    base = [fake_run(tmp_path / f"base{s}", s, {"freqwarm": False, "fda": False, "r0": r0, "fda_depth": depth,
                                               "inert": inert}, val_loss=v)
            for s, r0, depth, v in ((0, 0.5, 1, 1.0), (1, 0.2, 2, 2.0))]
    auto = [fake_run(tmp_path / f"auto{s}", s, {"freqwarm": True, "fda": False, "r0": r0, "fda_depth": 1,
                                               "inert": ["fda_depth"]},
                     val_loss=v, freqwarm={"enabled": True, "r0": r0, "auto": {"chosen": r0}})
            for s, r0, v in ((0, 0.2, 3.0), (1, 0.3, 5.0))]
    fda = fake_run(tmp_path / "fda", 0, {"freqwarm": False, "fda": True, "r0": 0.2, "fda_depth": 2,
                                         "inert": ["r0", "warmup_frac"]}, val_loss=7.0)
    ev.main(["compare", *base, *auto, fda, "--out", str(tmp_path / "cmp")])
    rows = (tmp_path / "cmp" / "compare.md").read_text().splitlines()[2:]
    assert rows == [f"| fda=False, freqwarm=False | 0,1 | 4 | 1.5000 ± {np.std([1.0, 2.0], ddof=1):.4f} |",
                    f"| fda=False, freqwarm=True, r0=auto (r0 chosen: 0.2, 0.3) | 0,1 | 4 | 4.0000 ± "
                    f"{np.std([3.0, 5.0], ddof=1):.4f} |",
                    "| fda=True, freqwarm=False | 0 | 4 | 7.0000 |"]


def test_curve_refuses_a_run_twice_or_a_copy_before_sampling(tmp_path, capsys):
    """`curve RUN RUN` or a run and its copy would show a spread of 0 over 'seeds 0,0': refused as compare refuses
    it, before anything is sampled."""
    runs = []
    for name in ("a", "copy"):
        keep = tmp_path / name / "keep"
        keep.mkdir(parents=True)
        save_checkpoint(str(keep / "ema_0000002.pt"), {"kind": "sit", "config": {"seed": 0, "lr": 1e-3}, "step": 2,
                                                      "ema_only": True, "freqwarm": {"enabled": False}})
        runs.append(str(tmp_path / name))
    for argv, needle in (([runs[0], runs[0]], "is given twice"), ([runs[0], runs[0] + "/"], "is given twice"),
                         (runs, "have the same settings and the same seed 0")):
        p = in_process(lambda: ev.main(["curve", *map(str, argv), "--out", str(tmp_path / "curve")]), capsys)
        assert_one_line_error(p, "curve: ", needle)
        assert not (tmp_path / "curve" / "samples").exists()


# ----------------------------------------------------------------------------- MLSR fractions

@pytest.mark.parametrize("bad,why", [("0 0.25 0.5 1.5", "in [0, 1)"), ("0 -0.1 0.5 0.6", "in [0, 1)"),
                                     ("0 0.5 0.25 0.6", "must not decrease"), ("0.1 0.2 0.3 0.4", "p_0 must be 0"),
                                     ("0 nan 0.5 0.6", "finite"), ("0 0.25 0.5 inf", "finite")])
def test_mlsr_fractions_are_checked_where_they_enter(bad, why, tmp_path, capsys):
    """--mlsr-fractions of train_vae.py and of recon / diagnose: one line naming the flag, before any work."""
    bad = bad.split()
    p = in_process(lambda: train_vae.main(["--preset", "smoke", "--out", str(tmp_path / "v"), "--mlsr-fractions",
                                           *bad]), capsys)
    assert_one_line_error(p, "--mlsr-fractions", why)
    assert not (tmp_path / "v" / "last.pt").exists()
    for cmd in ("recon", "diagnose"):
        p = in_process(lambda: ev.main([cmd, "--vae", "none.pt", "--mlsr-fractions", *bad]), capsys)
        assert_one_line_error(p, "--mlsr-fractions", why)


def test_fractions_of_a_checkpoint_are_checked_and_recorded_with_recon_and_diagnose(smoke_models, tmp_path, capsys):
    """A Stage-1 checkpoint whose fractions are invalid is refused naming the file; recon.json and diagnosis.json
    record the p_l their numbers were computed with and where they came from; a Stage-2 checkpoint records its
    inert settings."""
    vae = str(smoke_models / "vae" / "last.pt")
    ck = load_checkpoint(vae, "vae")
    ck["config"]["mlsr_fractions"] = [0.0, 0.25, 0.5, 1.5]
    save_checkpoint(str(tmp_path / "bad.pt"), ck)
    with pytest.raises(ValueError, match=r"bad.pt \(its --mlsr-fractions\): invalid MLSR fractions 0 0.25 0.5 1.5"):
        load_autoencoder(str(tmp_path / "bad.pt"))
    fr = [0.0, 0.2, 0.4, 0.6]
    common = ["--vae", vae, "--n", "4", "--n-images", "64", "--inception-path", str(tmp_path / "none.pt")]
    ev.main(["recon", *common, "--out", str(tmp_path / "r0")])
    ev.main(["recon", *common, "--mlsr-fractions", *map(str, fr), "--out", str(tmp_path / "r1")])
    r0, r1 = (json.loads((tmp_path / r / "recon.json").read_text()) for r in ("r0", "r1"))
    assert r0["mlsr_fractions"] == list(fft_ops.MLSR_FRACTIONS) and r0["mlsr_fractions_source"].startswith("those of")
    assert r1["mlsr_fractions"] == fr and r1["mlsr_fractions_source"] == "--mlsr-fractions"
    ev.main(["diagnose", "--vae", vae, "--n", "4", "--n-images", "64", "--mlsr-fractions", *map(str, fr),
             "--out", str(tmp_path / "d")])
    assert json.loads((tmp_path / "d" / "diagnosis.json").read_text())["mlsr_fractions"] == fr
    sit = load_checkpoint(str(smoke_models / "sit" / "last.pt"), "sit")
    assert {"fda_depth", "r0", "warmup_frac"} <= set(sit["config"]["inert"])


# ----------------------------------------------------------------------------- a DC-AE's folder: fractions, scale

DCAE = ["--preset", "dcae-smoke", "--gan-weight", "0", "--sample-every", "100", "--val-every", "0"]


def test_a_dcae_folder_carries_a_measured_scale_and_its_fractions_in_its_identity(tmp_path, capsys):
    """Stage 1 writes 1 / std of the latents over its statistics images (measured here independently with
    diffusers' own model) as the folder's scaling_factor and says so; a folder Stage 1 has not measured yet keeps
    no scale for --latent-norm scalar. Other fractions in freqldm.json give another content hash, and a Stage-2
    run refuses to resume on them; invalid ones are refused naming the file."""
    fr = [0.0, 0.1, 0.3, 0.6]
    out = tmp_path / "ae"
    train_vae.main(DCAE + ["--steps", "2", "--mlsr-fractions", *map(str, fr), "--out", str(out)])
    folder = out / "diffusers"
    cfg = json.loads((folder / "config.json").read_text())
    rec = json.loads((folder / MLSR_FILE).read_text())
    args = train_vae.get_args(DCAE + ["--out", str(tmp_path / "x")])
    ds = build_dataset("deadleaves", 16, n=args.n_images, seed=0)
    train_idx, _ = train_val_split(len(ds), args.val_images, 0)
    x = torch.stack([ds[train_idx[i]][0] for i in random_subset(len(train_idx), args.stats_images, 0)])
    model = diffusers.AutoencoderDC.from_pretrained(folder)
    with torch.no_grad():
        z = model.encode(x).latent
    assert cfg["scaling_factor"] == pytest.approx(1 / z.std(unbiased=False).item(), rel=1e-4)
    assert abs(cfg["scaling_factor"] - 1.0) > 0.01 and rec["scaling_factor"]["value"] == cfg["scaling_factor"]
    ae = load_autoencoder(f"diffusers:{folder}")
    stats = scalar_stats(ae)
    assert stats["scale"] == cfg["scaling_factor"] and "measured by train_vae.py" in stats["source"]
    assert f"{args.stats_images} random training images" in stats["source"]

    sit = ["--preset", "smoke", "--vae", f"diffusers:{folder}", "--image-size", "16", "--denoise-level", "2",
           "--sample-every", "100", "--out", str(tmp_path / "sit")]
    td.main(sit + ["--steps", "1"])
    (folder / MLSR_FILE).write_text(json.dumps({**rec, "mlsr_fractions": [0.0, 0.1, 0.3, 0.5]}))
    other = load_autoencoder(f"diffusers:{folder}")
    assert other.mlsr_fractions == (0.0, 0.1, 0.3, 0.5) and other.content_hash != ae.content_hash
    p = in_process(lambda: td.main(sit + ["--steps", "2"]), capsys)
    assert_one_line_error(p, "MLSR fractions [0.0, 0.1, 0.3, 0.6]", "[0.0, 0.1, 0.3, 0.5]", "may not change on resume")
    (folder / MLSR_FILE).write_text(json.dumps({**rec, "mlsr_fractions": [0.0, 0.1, 0.3, 1.5]}))
    with pytest.raises(ValueError, match=f"{MLSR_FILE} \\(mlsr_fractions\\): invalid MLSR fractions"):
        load_autoencoder(f"diffusers:{folder}")

    train_vae.save_diffusers_folder(model_of(out), str(tmp_path / "mid"), fr)     # a save before the last step
    mid = tmp_path / "mid" / "diffusers"
    assert json.loads((mid / "config.json").read_text())["scaling_factor"] == 1.0          # diffusers' default
    edited = {"mlsr_fractions": fr, "scaling_factor": {"value": 0.7, "source": "..."}}    # config.json not it
    for record in (None, {"mlsr_fractions": fr}, edited):  # as saved, a folder of an earlier version, an edited one
        if record:
            (mid / MLSR_FILE).write_text(json.dumps(record))
        ae = load_autoencoder(f"diffusers:{mid}")
        assert ae.scaling_factor is None and ae.mlsr_fractions == tuple(fr)
        with pytest.raises(UserError, match="scaling_factor 1.0 is not (a measurement|the 0.7 measured by)"):
            scalar_stats(ae)


def model_of(out):
    """The EMA DC-AE of a Stage-1 run folder."""
    from vae import DCAE as Model
    ck = load_checkpoint(str(out / "last.pt"), "vae")
    m = Model(ck["model_config"]["preset"], ck["model_config"]["image_size"])
    m.load_state_dict(ck["ema"])
    return m
