"""The paper's denoisers at scale: activation checkpointing (--grad-checkpoint), sharded optimizer state
(--shard-optimizer) and the memory plan (bench.py --memory)."""
import shutil

import pytest
import torch

import train_diffusion as td
import train_vae
from common import load_checkpoint
from dit import SiT, UViT
from vae import ViTVAE
from helpers import read_metrics, run


def perturbed(model):
    """Zero-initialised layers randomised, so that every block carries gradient."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def saved_count(fn):
    """How many tensors autograd saves for backward while fn() runs (what checkpointing avoids keeping)."""
    n = [0]

    def pack(t):
        n[0] += 1
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return n[0], out


def grads_with_and_without_checkpoint(model, loss_fn):
    """(gradients, tensors saved) of loss_fn(model) without and with model.grad_checkpoint."""
    out = []
    for on in (False, True):
        model.grad_checkpoint = on
        model.zero_grad()
        n, loss = saved_count(lambda: loss_fn(model))
        loss.backward()
        out.append(([p.grad.clone() for p in model.parameters()], n))
    model.grad_checkpoint = False
    return out


@pytest.mark.parametrize("kind", ["sit", "uvit", "vae"])
def test_grad_checkpoint_gives_the_same_gradients_and_saves_fewer_tensors(kind):
    """Per-block non-reentrant checkpointing: every gradient equals the plain backward's (torch autograd without
    it), while autograd keeps far fewer tensors (only what lies outside the blocks)."""
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 2, 4])
    if kind == "sit":
        model = perturbed(SiT(input_size=8, in_channels=4, patch=2, width=32, depth=3, heads=2, num_classes=5))
        loss_fn = lambda m: m(x, t, y).pow(2).mean()
    elif kind == "uvit":
        model = perturbed(UViT(input_size=8, in_channels=4, patch=2, width=32, depth=5, heads=2, num_classes=5))
        loss_fn = lambda m: m(x, t, y).pow(2).mean()
    else:
        model = perturbed(ViTVAE(image_size=16, patch=4, width=32, depth=2, heads=2, latent_dim=4))
        img, noise = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 4, 4)
        loss_fn = lambda m: (m.decode(m.encode(img).sample(noise)) - img).pow(2).mean()
    (plain, n_plain), (ckpt, n_ckpt) = grads_with_and_without_checkpoint(model, loss_fn)
    assert n_ckpt < n_plain / 3, (n_ckpt, n_plain)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert all(g.abs().sum() > 0 for g in plain[:4])


def fda_batch(tmp_path, vae_ckpt, *flags):
    args = td.get_args(["--preset", "smoke", "--vae", vae_ckpt, "--out", str(tmp_path), "--model", "uvit-smoke/1",
                        "--fda", "--fda-depth", "2", "--denoise-level", "1", *flags])
    d = type("D", (), dict(device=torch.device("cpu")))()
    torch.manual_seed(0)
    ae, ds, student, ema, opt = td.build(args, d)
    perturbed(student)
    ema.load_state_dict(student.sit.state_dict())
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z, eps = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4)
    return args, student, ema, (z, torch.tensor([0, 1, 2, 3]), torch.tensor([0.1, 0.4, 0.7, 0.95]), eps)


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    train_vae.main(["--preset", "smoke", "--out", str(out), "--gan-weight", "0", "--steps", "2"])
    return str(out / "last.pt")


def test_grad_checkpoint_with_the_fda_teacher_and_torch_compile(vae_ckpt, tmp_path):
    """The FDA loss (Eq. 6-8: the student's block-k hidden state through the projector against the EMA teacher's)
    with --grad-checkpoint: the same loss parts and student gradients as without, eager and under torch.compile
    (aot_eager on CPU: TorchDynamo and AOTAutograd trace the checkpointed blocks); the teacher gets no gradient."""
    args, student, ema, (z, y, t, eps) = fda_batch(tmp_path, vae_ckpt, "--grad-checkpoint")
    assert student.sit.grad_checkpoint and args.grad_checkpoint          # set where the model is built
    results = []
    for on, compiled in ((False, False), (True, False), (True, True)):
        student.sit.grad_checkpoint = on
        student.zero_grad()
        model = torch.compile(student, backend="aot_eager") if compiled else student
        loss, parts = td.diffusion_loss(model, ema, z, y, t, eps, args, 0)
        loss.backward()
        results.append((parts, [p.grad.clone() for p in student.parameters()]))
        torch._dynamo.reset()
    assert results[0][0]["align"] > 0 and all(p.grad is None for p in ema.parameters())
    for parts, grads in results[1:]:
        for k in ("diff", "align"):
            torch.testing.assert_close(parts[k], results[0][0][k], atol=1e-6, rtol=1e-6)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_grad_checkpoint_run_resumes_without_it_and_equals_a_plain_run(vae_ckpt, tmp_path, monkeypatch):
    """train_diffusion --grad-checkpoint (U-ViT with FDA: the teacher is the EMA): the losses, weights, EMA and
    optimizer state of 2 checkpointed steps resumed for 2 plain ones equal an uninterrupted plain run's, bit for
    bit: the flag changes no number, so it may change on resume. train_vae --grad-checkpoint likewise."""
    import vae
    calls = {"n": 0}
    real = torch.utils.checkpoint.checkpoint

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(vae.torch.utils.checkpoint, "checkpoint", counting)
    common = ["--preset", "smoke", "--vae", vae_ckpt, "--model", "uvit-smoke/1", "--fda", "--fda-depth", "2",
              "--sample-every", "100", "--val-every", "0"]
    td.main([*common, "--out", str(tmp_path / "a"), "--steps", "4"])
    assert calls["n"] == 0
    td.main([*common, "--out", str(tmp_path / "b"), "--steps", "2", "--grad-checkpoint"])
    assert calls["n"] == 2 * 3                                 # 2 steps x 3 blocks, the teacher's forwards not
    td.main([*common, "--out", str(tmp_path / "b"), "--steps", "4"])
    ma, mb = (read_metrics(tmp_path / r / "metrics.jsonl") for r in "ab")
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]
    a, b = (load_checkpoint(str(tmp_path / r / "last.pt"), "sit") for r in "ab")
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for i, st in a["opt"]["state"].items():
        assert all(torch.equal(v, b["opt"]["state"][i][k]) for k, v in st.items())
    vae_common = ["--preset", "smoke", "--gan-weight", "0", "--steps", "2", "--val-every", "0"]
    train_vae.main([*vae_common, "--out", str(tmp_path / "va")])
    n = calls["n"]
    train_vae.main([*vae_common, "--out", str(tmp_path / "vb"), "--grad-checkpoint"])
    assert calls["n"] > n
    a, b = (load_checkpoint(str(tmp_path / r / "last.pt"), "vae") for r in ("va", "vb"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    from common import UserError
    with pytest.raises(UserError, match="--grad-checkpoint acts only with --arch vit"):
        train_vae.get_args(["--preset", "dcae-smoke", "--grad-checkpoint"])     # diffusers' AutoencoderDC has none


def opt_tensors(ck):
    return {(i, k): v for i, st in ck["opt"]["state"].items() for k, v in st.items()}


def test_shard_optimizer_equals_unsharded_and_resumes_on_other_rank_counts(vae_ckpt, tmp_path):
    """--shard-optimizer on 2 ranks (gloo, ZeroRedundancyOptimizer), FreqWarm + FDA, stopped at step 2: resumed
    sharded on 2 ranks, and resumed on 1 process (plain AdamW loads the gathered state), it equals one unsharded
    process's uninterrupted run within 1e-4: losses, weights, EMA (the FDA teacher) and the whole AdamW state in
    the checkpoint (step, both moments of every parameter). 1e-4 because the all-reduce sums the two halves of
    the batch in another order; the update itself is AdamW's element for element. The checkpoint is the plain
    AdamW layout: it exports and samples like any other."""
    import evaluate
    flags = ["--preset", "smoke", "--vae", vae_ckpt, "--fda", "--freqwarm", "--warmup-steps", "2",
             "--ckpt-every", "2", "--sample-every", "100", "--val-every", "0"]
    out = {r: tmp_path / r for r in ("one", "two", "c")}
    td.main([*flags, "--out", str(out["one"]), "--steps", "4"])
    for steps in (2, 4):                                                       # stopped at 2, resumed to 4
        p = run(["train_diffusion.py", *flags, "--out", str(out["two"]), "--steps", str(steps), "--shard-optimizer"],
                torchrun=2)
        assert p.returncode == 0 and "optimizer state sharded over 2 ranks" in p.stdout, p.stderr[-3000:]
        if steps == 2:
            assert load_checkpoint(str(out["two"] / "last.pt"), "sit")["opt"]["state"][0]["step"] == 2
            shutil.copytree(out["two"], out["c"])
    td.main([*flags, "--out", str(out["c"]), "--steps", "4"])                  # 2 ranks -> 1 process, unsharded
    m = {r: [x["loss"] for x in read_metrics(out[r] / "metrics.jsonl")] for r in out}
    ck = {r: load_checkpoint(str(out[r] / "last.pt"), "sit") for r in out}
    for r in ("two", "c"):
        assert m[r] == pytest.approx(m["one"], rel=1e-4), r
        for part in ("model", "ema"):
            for k, v in ck["one"][part].items():
                torch.testing.assert_close(ck[r][part][k], v, atol=1e-4, rtol=1e-4)
        assert ck[r]["opt"]["param_groups"] == ck["one"]["opt"]["param_groups"]
        ours, ref = opt_tensors(ck[r]), opt_tensors(ck["one"])
        assert ours.keys() == ref.keys() and len(ref) == 3 * len(ck["one"]["model"])   # step, exp_avg, exp_avg_sq
        for k, v in ref.items():
            torch.testing.assert_close(ours[k], v, atol=1e-4, rtol=1e-3)
    evaluate.main(["export", "--ckpt", str(out["two"] / "last.pt"), "--out", str(tmp_path / "export")])
    assert (tmp_path / "export" / "model.safetensors").is_file()
    evaluate.main(["sample", "--ckpt", str(out["two"] / "last.pt"), "--num-samples", "2", "--batch", "2",
                   "--sample-steps", "2", "--sampler", "euler", "--out", str(tmp_path / "samples")])
    assert (tmp_path / "samples.npz").is_file()


@pytest.mark.parametrize("name", ["S/2", "uvit-S/2"])
def test_memory_plan_counts_what_torch_allocates(name):
    """The plan's activation term: the bytes of tensors saved for backward, counted with saved-tensor hooks, equal
    what torch's CPU allocator still holds after the forward (torch.profiler's memory records, less the output
    and, checkpointed, the CPU RNG state torch.utils.checkpoint keeps per block), to 1 %; the meta-device count the plan uses equals the count on real CPU tensors
    exactly, and is in proportion to the batch."""
    from torch.profiler import ProfilerActivity, profile

    import bench
    from dit import build_denoiser
    torch.manual_seed(0)
    model = build_denoiser(name, 16, 4, 10)                    # 64 tokens: flash attention's saved set matters
    with torch.device("meta"):
        meta = build_denoiser(name, 16, 4, 10)
    x, t, y = torch.randn(4, 4, 16, 16), torch.rand(4), torch.randint(0, 10, (4,))
    for on in (False, True):
        model.grad_checkpoint = on
        counter = bench.SavedForBackward(model)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = counter.run(lambda: model(x, t, y))
        held = sum(e.self_cpu_memory_usage for e in prof.key_averages()) - out.nbytes
        rng = on * len(model.blocks) * torch.get_rng_state().nbytes      # checkpoint keeps each block's RNG state
        assert abs(held - rng - counter.total) <= 0.01 * counter.total, (on, held, counter.total)
        del out
    model.grad_checkpoint = False
    cpu, on_meta = bench.count_activations(model, 2), bench.count_activations(meta, 2)
    assert cpu == on_meta and on_meta["checkpointed"] < on_meta["plain"] / 3
    assert bench.count_activations(meta, 4) == {k: 2 * v for k, v in on_meta.items()}


def test_memory_plan_table(capsys):
    """bench.py --memory: every term from its definition (weights 4 P, .grad 4 P plus DDP's buckets on 2+ GPUs,
    AdamW 8 P or 8 x the largest ZeRO share, EMA 4 P, bf16 casts 2 P, activations per image x the micro-batch)."""
    import bench
    from common import UserError
    from dit import build_denoiser
    assert bench.zero_shard([5, 4, 3, 3, 1], 2) == 8 and bench.zero_shard([5, 4, 3, 3, 1], 1) == 16
    bench.main(["--memory", "--models", "smoke/1,uvit-smoke/1", "--image-size", "32", "--ae", "f4c4",
                "--global-batch", "16", "--gpus", "1,2"])
    out = capsys.readouterr().out
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in out.splitlines() if l.startswith("| ")][1:]
    assert len(rows) == 2 * 2 * 4
    gib = lambda b: f"{b / 2 ** 30:.1f}"
    for name in ("smoke/1", "uvit-smoke/1"):
        sizes = [p.numel() for p in build_denoiser(name, 8, 4, 1000).parameters()]
        P = sum(sizes)
        for r in bench.memory_plan(name, 32, (4, 4), 16, 2):
            assert (r["weights"], r["grads"], r["ema"], r["casts"]) == (4 * P, 8 * P, 4 * P, 2 * P)
            assert r["optim"] == 8 * (bench.zero_shard(sizes, 2) if r["sharded"] else P)
            assert r["acts"] == 8 * r["act_per_image"] and r["total"] == sum(
                r[k] for k in ("weights", "grads", "optim", "ema", "casts", "acts"))
            line = next(x for x in rows if x[0] == r["label"] and x[3] == "2" and x[5] == r["setting"])
            assert line[6:13] == [gib(r[k]) for k in ("weights", "grads", "optim", "ema", "casts", "acts", "total")]
        one = bench.memory_plan(name, 32, (4, 4), 16, 1)
        assert all(r["grads"] == 4 * P and r["optim"] == 8 * P and r["acts"] == 16 * r["act_per_image"] for r in one)
    assert "smoke/1 on 2 x 40 GB: `(none)`" in out
    with pytest.raises(UserError, match="--ae f32: use fFcC"):
        bench.main(["--memory", "--ae", "f32"])


def test_memory_plan_picks_the_cheapest_flags_that_fit(monkeypatch):
    """plan_flags: the first setting that fits in the order sharding, checkpointing, both, then both with the
    micro-batch halved; a card that nothing fits is said so."""
    import bench
    args = ("uvit-smoke/1", 32, (4, 4), 64, 2)
    rows = {r["setting"]: r for r in bench.memory_plan(*args)}
    assert rows["both"]["total"] < rows["checkpointed"]["total"] < rows["sharded"]["total"] < rows["plain"]["total"]
    card = lambda total: total * 1.001 / bench.FIT_SHARE / bench.GIB           # a card this total just fits
    cases = [(card(rows["plain"]["total"]), "(none)"), (card(rows["sharded"]["total"]), "--shard-optimizer"),
             (card(rows["checkpointed"]["total"]), "--grad-checkpoint"),
             (card(rows["both"]["total"]), "--grad-checkpoint --shard-optimizer")]
    half = bench.memory_plan(*args, micro_batch=16)[-1]["total"]                # 32 per GPU, micro-batch 16
    cases += [(card(half), "--grad-checkpoint --shard-optimizer --micro-batch 16"), (card(half) / 100, None)]
    for size, want in cases:
        monkeypatch.setattr(bench, "CARDS_GIB", (size,))
        assert bench.plan_flags(*args, size)[0] == want, (size, want)
