"""Every random stream is a function of what it is drawn for, never of how the work is split: sample labels
(--labels random), each image's initial noise and SDE Brownian increments, and the training draws (t, noise,
label dropout) do not depend on the batch size, the number of ranks or where a run was resumed."""
import os
import types

import numpy as np
import pytest
import scipy.stats
import torch

import evaluate as ev
import train_diffusion as td
from common import Run, derive_seed, load_checkpoint, save_checkpoint
from data import to_uint8
from helpers import run

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- --labels random

@pytest.mark.parametrize("K,n", [(10, 100_000), (1000, 300_000)])
def test_random_labels_draw_every_class_uniformly(K, n):
    """One seeded draw of n labels over K classes: every class, the last included, with its expected share
    (chi-square against the uniform law, and every count within 6 binomial standard deviations of n / K)."""
    y = ev.sample_labels(n, K, "random", seed=3)
    assert y.shape == (n,) and y.dtype == torch.long and int(y.min()) == 0 and int(y.max()) == K - 1
    counts = np.bincount(y.numpy(), minlength=K)
    assert len(counts) == K
    p = scipy.stats.chisquare(counts).pvalue
    print(f"--labels random over {K} classes, {n} draws: chi-square p = {p:.3f}, counts {counts.min()}..{counts.max()}")
    assert p > 1e-3
    sd = (n / K * (1 - 1 / K)) ** 0.5
    assert np.abs(counts - n / K).max() < 6 * sd
    assert not torch.equal(y[:1000], ev.sample_labels(n, K, "random", seed=4)[:1000])     # the seed matters


def test_random_labels_of_a_longer_set_begin_with_those_of_a_shorter_one():
    """A sample folder extended with a larger --num-samples keeps the labels its images were drawn with."""
    for n1, n2 in ((6, 10), (100, 5000), (4999, 50000)):
        assert torch.equal(ev.sample_labels(n1, 1000, "random", 0), ev.sample_labels(n2, 1000, "random", 0)[:n1])
    assert ev.sample_labels(23, 10, "balanced", 0).tolist() == [i % 10 for i in range(23)]


# ----------------------------------------------------------------------------- sample sets: noise and SDE increments

@torch.no_grad()
def hand_sde_images(ckpt, idx, labels, steps, seed):
    """Images idx drawn one at a time by Euler-Maruyama written out here (SiT's SDE in our t: w(t) = t,
    score = -(x + (1 - t) v) / t, steps - 1 noisy steps from t = 1 to 0.04, then the drift alone to 0): image
    i's stream, seeded by (seed, "image", i), gives its initial noise and then each of its increments."""
    ema, ae, space, _ = ev.load_sit(ckpt, CPU)
    C, h = ema.in_channels, ema.config["input_size"]
    ts = torch.linspace(1.0, 0.04, steps).tolist() + [0.0]
    out = []
    for i in idx:
        g = torch.Generator().manual_seed(derive_seed(seed, "image", i))
        x = torch.randn(1, C, h, h, generator=g)
        y = labels[i:i + 1]
        for k, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            dt = t_next - t
            v = ema(x, torch.full((1,), t), y)
            score = -(x + (1 - t) * v) / t
            x = x + (v - t * score) * dt
            if k < len(ts) - 2:
                x = x + (2 * t * -dt) ** 0.5 * torch.randn(1, C, h, h, generator=g)
        out.append(ae.decode(space.to_autoencoder(x)))
    return to_uint8(torch.cat(out))


def test_sde_sample_set_is_the_same_whatever_the_batch_ranks_or_resume_point(smoke_models, tmp_path):
    """`sample --sampler sde --labels random`: image i is the hand-written SDE from image i's own stream with
    label i of one seeded draw; the .npz (images and labels) is the same drawn in one batch, in batches of 2,
    by 2 processes (gloo), or as a partial set (3 images) completed by a rerun with a missing image redrawn."""
    ckpt = tmp_path / "sit.pt"                      # the EMA moved off its near-zero start: outputs depend on x, t, y
    ck = load_checkpoint(str(smoke_models / "sit" / "last.pt"), "sit")
    torch.manual_seed(2)
    ck["ema"] = {k: v + 0.2 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ck["ema"].items()}
    save_checkpoint(str(ckpt), ck)
    n, seed = 5, 7
    flags = ["--ckpt", str(ckpt), "--sampler", "sde", "--sample-steps", "3", "--labels", "random",
             "--seed", str(seed)]

    def draw(name, *extra, num=n):
        ev.main(["sample", *flags, "--num-samples", str(num), "--out", str(tmp_path / name), *extra])
        z = np.load(tmp_path / f"{name}.npz")
        return z["arr_0"], z["arr_1"]
    one, labels = draw("one", "--batch", "5")
    assert labels.tolist() == ev.sample_labels(n, ck["model_config"]["num_classes"], "random", seed).tolist()
    ref = hand_sde_images(str(ckpt), range(n), torch.from_numpy(labels), 3, seed)
    assert np.abs(one.astype(int) - ref.astype(int)).max() <= 1            # float rounding to uint8 only
    other_seed = hand_sde_images(str(ckpt), range(n), torch.from_numpy(labels), 3, seed + 1)
    assert np.abs(one.astype(int) - other_seed.astype(int)).max() > 20     # the streams matter at this size
    for name, extra in (("batch2", ["--batch", "2"]), ("batch3", ["--batch", "3"])):
        imgs, lab = draw(name, *extra)
        assert np.array_equal(imgs, one) and np.array_equal(lab, labels), name
    draw("resumed", "--batch", "2", num=3)                                 # a partial set ...
    os.remove(tmp_path / "resumed" / "000001.png")
    imgs, lab = draw("resumed", "--batch", "2")                            # ... completed by a rerun
    assert np.array_equal(imgs, one) and np.array_equal(lab, labels)
    two = run(["evaluate.py", "sample", *flags, "--num-samples", str(n), "--batch", "2",
               "--out", str(tmp_path / "two")], torchrun=2, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    z = np.load(tmp_path / "two.npz")
    assert np.array_equal(z["arr_0"], one) and np.array_equal(z["arr_1"], labels)


# ----------------------------------------------------------------------------- training draws

def test_training_draws_are_one_global_draw_sliced_by_rank_and_micro_batch():
    """Run.rand / Run.randn (t, noise, label dropout, the VAE's posterior sample): the rows of every rank's
    micro-batches, in rank-major order, are exactly one draw over the global batch (seed, step, stream),
    whatever the world size and --micro-batch; streams and steps draw differently."""
    G, shape = 12, (2, 3, 3)

    def draws(world, micro, step, stream):
        rows_u, rows_n = [], []
        for rank in range(world):
            args = types.SimpleNamespace(out="unused", global_batch=G, micro_batch=micro, seed=5)
            r = Run(args, types.SimpleNamespace(rank=rank, world_size=world, device=CPU, main=rank == 0), "sit")
            for j in range(r.accum):
                rows_u.append(r.rand(step, stream, j))
                rows_n.append(r.randn(shape, step, stream, j))
        return torch.cat(rows_u), torch.cat(rows_n)

    whole_u, whole_n = draws(1, None, 3, 11)
    g = torch.Generator().manual_seed(derive_seed(5, "step", 3, 11))
    assert torch.equal(whole_u, torch.rand((G,), generator=g))
    g = torch.Generator().manual_seed(derive_seed(5, "step", 3, 11))
    assert torch.equal(whole_n, torch.randn((G, *shape), generator=g))
    for world, micro in ((1, 4), (2, None), (2, 3), (3, 2), (4, 1), (6, None)):
        u, nrm = draws(world, micro, 3, 11)
        assert torch.equal(u, whole_u) and torch.equal(nrm, whole_n), (world, micro)
    assert not torch.equal(draws(1, None, 3, 12)[0], whole_u)                # another stream
    assert not torch.equal(draws(1, None, 4, 11)[0], whole_u)                # another step


def test_validation_noise_is_one_draw_per_t_whatever_the_validation_batch():
    """Stage 2's validation loss at grid point i uses the noise of stream (seed, "val", i) drawn over all
    held-out latents at once: the same numbers in batches of 3 as in one batch, equal to the loss written out."""
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(7, 2, 3, 3, generator=g), torch.arange(7) % 3

    class Model(torch.nn.Module):
        def forward(self, x, t, y):
            return 0.5 * x + t.view(-1, 1, 1, 1) * (y.view(-1, 1, 1, 1) + 1.0)

    results = []
    for batch in (64, 3):
        val = td.Validation.__new__(td.Validation)
        val.z, val.y, val.seed, val.batch = z, y, 4, batch
        results.append(val(Model()))
    assert results[0] == pytest.approx(results[1], rel=1e-6)
    for i, t in enumerate(td.VAL_TS):
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(derive_seed(4, "val", i)))
        tt = torch.full((7,), t)
        v = Model()((1 - t) * z + t * eps, tt, y)
        assert results[1][f"val_loss_t{t:.4f}"] == pytest.approx(((v - (eps - z)) ** 2).mean().item(), rel=1e-5)
