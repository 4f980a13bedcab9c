"""Step overhead: no host read inside a step, and the non-finite guard still keeps every written file clean."""
import types

import pytest
import torch

import train_diffusion as td
import train_vae
from common import Run, UserError, load_checkpoint
from helpers import read_metrics


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    train_vae.main(["--preset", "smoke", "--out", str(out), "--gan-weight", "0"])
    return str(out / "last.pt")


def test_nan_between_log_points_stops_without_writing_from_the_nonfinite_state(vae_ckpt, tmp_path, monkeypatch):
    """A NaN loss at step 5 (between the metrics lines and checkpoints of steps 4 and 8) trains on unseen
    until step 8, where the run stops before logging or saving, naming step 5 and the step-4 checkpoint."""
    calls, real = {"n": 0}, td.velocity_loss

    def loss_then_nan(v, x0, eps):                                  # one call per step (no micro-batches)
        calls["n"] += 1
        return real(v, x0, eps) * (float("nan") if calls["n"] == 6 else 1.0)

    monkeypatch.setattr(td, "velocity_loss", loss_then_nan)
    out = tmp_path / "sit"
    argv = ["--preset", "smoke", "--vae", vae_ckpt, "--out", str(out), "--steps", "12", "--log-every", "4",
            "--ckpt-every", "4", "--sample-every", "100", "--val-every", "0"]
    with pytest.raises(UserError, match=rf"loss is nan at step 5: stopped; last good checkpoint: {out / 'last.pt'}"):
        td.main(argv)
    assert calls["n"] == 8                                         # steps 6, 7 ran on the poisoned weights
    ck = load_checkpoint(str(out / "last.pt"), "sit")
    assert ck["step"] == 4
    assert all(torch.isfinite(v).all() for part in ("model", "ema", "opt") for v in _tensors(ck[part]))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [4]
    assert not any(p.name.startswith("samples_") for p in out.iterdir())


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj.float()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_metrics_are_interval_means_read_only_at_metrics_lines(tmp_path, monkeypatch):
    """Run reads no tensor on the host between metrics lines (it would wait for the GPU there), and the
    logged values are the means over the steps since the previous line."""
    args = types.SimpleNamespace(steps=6, out=str(tmp_path), log_every=3, ckpt_every=100, sample_every=100,
                                 global_batch=2, on_nonfinite="stop", grad_clip=1e9)
    d = types.SimpleNamespace(main=True, device=torch.device("cpu"), rank=0, world_size=1)
    loop = Run(args, d, "test").start(0)
    w = torch.nn.Parameter(torch.zeros(3))
    reads = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            reads["n"] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    per_step = []
    for step in range(6):
        w.grad = torch.full((3,), float(step + 1))
        before = reads["n"]
        totals = {}
        loop.accumulate(totals, {"loss": torch.tensor(float(step)), "diff": torch.tensor(2.0 * step)})
        metrics = loop.clip(totals, [w], step)
        loop.end_step(step + 1, dict(phase="full", **metrics))
        per_step.append(reads["n"] - before)
        if (step + 1) % 3:
            assert reads["n"] == before
    loop.close()
    monkeypatch.undo()
    assert per_step[0] == per_step[1] == per_step[3] == per_step[4] == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 6]
    assert [r["loss"] for r in rows] == pytest.approx([1.0, 4.0]) and [r["diff"] for r in rows] == pytest.approx([2.0, 8.0])
    norms = [(3 * (s + 1) ** 2) ** 0.5 for s in range(6)]
    assert [r["grad_norm"] for r in rows] == pytest.approx([sum(norms[:3]) / 3, sum(norms[3:]) / 3], rel=1e-6)
    assert all(r["phase"] == "full" and r["skipped"] == 0 for r in rows)
