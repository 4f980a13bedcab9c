"""The code's shape that the README promises: resume policy follows from where a flag is defined, and the
project's imports form a tree (no cycles, no project imports hidden inside functions)."""
import ast
import os
import types

import pytest
import torch

import train_diffusion as td
import train_vae
from common import SEED_SCHEME, Run, UserError, derive_seed, fixed_on_resume, save_checkpoint
from helpers import ROOT

CPU = types.SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1, main=True)
MODULES = ("fft_ops", "common", "data", "vae", "dit", "train_vae", "train_diffusion", "evaluate", "bench", "study")


@pytest.mark.parametrize("trainer,kind,method", [
    (train_vae, "vae", {"arch", "mlsr_fractions", "mlsr_sigmas", "gan_real", "latent_dim", "seed", "data"}),
    (td, "sit", {"freqwarm", "r0", "fda", "fda_depth", "denoise_level", "latent_norm", "model", "seed", "data"})])
def test_every_flag_of_the_fixed_group_and_no_other_is_refused_on_resume(trainer, kind, method, tmp_path):
    """Run.resume refuses a change of each flag defined in the parser's fixed group, naming it, and accepts
    (and logs) a change of every other flag: the group is the whole resume policy. A fixed flag idle in the run
    (common.check_needs: --r0 without --freqwarm) acts on nothing, so its stored value is not compared."""
    fixed = fixed_on_resume(trainer.parser())
    assert set(fixed) == set(trainer.FIXED_ON_RESUME) and method <= set(fixed)
    on = ["--freqwarm", "--fda"] if trainer is td else []          # the method's settings act in this run
    args = trainer.get_args(["--preset", "smoke", "--out", str(tmp_path / "run"), *on])
    assert not method & set(args.inert)
    path = str(tmp_path / "ck.pt")
    others = [k for k in vars(args) if k not in fixed and k not in ("explicit", "resume", "overwrite", "preset")]
    assert {"lr", "steps", "log_every", "workers"} <= set(others)
    for key in list(fixed) + others:
        stored = dict(vars(args))
        stored[key] = "changed"
        save_checkpoint(path, {"kind": kind, "config": stored, "step": 0, "model_config": {"m": 1},
                               "data_fingerprint": "fp", "seeds": SEED_SCHEME})
        args.resume = path
        run = Run(args, CPU, kind, fixed)
        if key in fixed and key not in args.inert:
            with pytest.raises(UserError, match=f"--{key.replace('_', '-')} changed, not .*may not change on resume"):
                run.resume("fp", {"m": 1})
        else:
            assert run.resume("fp", {"m": 1})["step"] == 0, key
    stored = dict(vars(args))
    save_checkpoint(path, {"kind": kind, "config": stored, "step": 0, "model_config": {"m": 1}, "data_fingerprint": "x",
                           "seeds": SEED_SCHEME})
    with pytest.raises(UserError, match="other data"):
        Run(args, CPU, kind, fixed).resume("fp", {"m": 1})
    with pytest.raises(UserError, match=f"holds a {kind} model .* but the settings build"):
        Run(args, CPU, kind, fixed).resume("x", {"m": 2})
    save_checkpoint(path, {"kind": kind, "config": stored, "step": 0, "model_config": {"m": 1},
                           "data_fingerprint": "x"})
    with pytest.raises(UserError, match="seeded differently: resuming it here would change them mid-run"):
        Run(args, CPU, kind, fixed).resume("x", {"m": 1})          # a checkpoint of the earlier seed formulas


def test_named_random_streams_do_not_collide_and_ignore_the_integer_type():
    """derive_seed: the old sums (seed * 1_000_003 + epoch, seed * 1_000_003 + 7_777 + i) collided, e.g. epoch
    7_777 + i of a run with validation stream i; named streams never do, and 5 / np.int64(5) / tensor(5) agree."""
    import numpy as np
    seeds = {derive_seed(s, name, i) for s in range(3) for name in ("epoch", "val", "image") for i in range(8000)}
    assert len(seeds) == 3 * 3 * 8000
    assert derive_seed(0, "epoch", 7_777) != derive_seed(0, "val", 0)
    assert derive_seed(1, "step", 5, 11) == derive_seed(np.int64(1), "step", torch.tensor(5), np.int32(11))
    assert 0 <= derive_seed(2**40, "labels") < 2**63


def project_imports(tree, top_level_only):
    """Names of project modules imported by a module (at its top level, or anywhere inside functions)."""
    nodes = tree.body if top_level_only else [n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
                                                                                         ast.AsyncFunctionDef))
                                              for n in ast.walk(f)]
    found = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            found |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            found.add(n.module.split(".")[0])
    return found & set(MODULES)


def test_imports_form_a_tree_without_imports_inside_functions():
    graph = {}
    for m in MODULES:
        tree = ast.parse(open(os.path.join(ROOT, f"{m}.py")).read())
        assert not project_imports(tree, top_level_only=False), f"{m}.py imports a project module inside a function"
        graph[m] = project_imports(tree, top_level_only=True)
    order, state = [], {}

    def visit(m, path):
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        if state.get(m) == "done":
            return
        state[m] = "open"
        for dep in sorted(graph[m]):
            visit(dep, path + [m])
        state[m] = "done"
        order.append(m)
    for m in MODULES:
        visit(m, [])
    assert graph["fft_ops"] == set() and graph["common"] == set()         # the roots
    for stage in ("train_vae", "train_diffusion", "evaluate"):              # stages import models, not each other
        assert not graph[stage] & {"train_vae", "train_diffusion", "evaluate"}, stage
