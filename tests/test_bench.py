"""bench.py --quick runs on CPU and prints its table (a smoke run of the benchmark, not a timing check); bench.py
--gpu-check at smoke size on CPU: its phases, budgets, checks and report."""
import os
import re

import pytest

from helpers import assert_one_line_error, run


def test_bench_quick_prints_its_table():
    p = run(["bench.py", "--quick", "--device", "cpu"], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert out.startswith("device: cpu") and "command: python bench.py --quick --device cpu" in out
    header = "| row | configuration | img/s | step ms (median) | spread ms | peak mem MiB | GFLOP/img | TFLOP/s | MFU |"
    assert header in out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 9 and cells[0] not in ("row", "---"):
            rows[cells[0]] = cells
    expected = {"vae-step", "sit-step", "u-vit-step", "sit-step+fda", "sit-official", "sample", "sample-cfg",
                "jpeg-decode-w0", "jpeg-decode-w2", "cache-encode-w0", "cache-encode-w2",
                "fid-features-w0", "fid-features-w2"}
    assert set(rows) == expected, sorted(rows)
    for name, cells in rows.items():
        assert float(cells[2]) > 0 and float(cells[3]) > 0, name                     # img/s, step ms
        lo, hi = map(float, cells[4].split("-"))
        assert lo <= float(cells[3]) <= hi, name                                       # the median is inside the spread
        assert re.fullmatch(r"\d+ \(RSS(, process)?\)", cells[5]), name               # CPU: peak resident set
        assert cells[8] == "-", name                                                   # no MFU on CPU
    for name in ("vae-step", "sit-step", "sit-official"):
        assert float(rows[name][6]) > 0, name                                          # FLOPs counted
    # the same FLOPs for our SiT and the official re-implementation (its extra C output channels aside)
    assert abs(float(rows["sit-step"][6]) - float(rows["sit-official"][6])) <= 0.05 * float(rows["sit-step"][6])
    assert re.search(r"time ratio ours / official: median \d+\.\d+, range", out)
    assert "STAND-IN network, not Inception" in rows["fid-features-w0"][1] or "Inception-v3" in rows["fid-features-w0"][1]


def test_gpu_check_smoke_size_on_cpu_passes_and_reruns_in_the_same_folder(tmp_path):
    """`bench.py --gpu-check --smoke` on CPU: every phase runs within its budget and every check passes; the
    figures it reports are re-checked here from its work files; a rerun in the same folder with a tiny budget
    stops its phase at the budget, says so (INCOMPLETE, one line, exit 2) and keeps nothing of the first run."""
    import json

    import numpy as np
    import torch

    import bench
    from common import load_checkpoint

    out = tmp_path / "check"
    p = run(["bench.py", "--gpu-check", "--smoke", "--device", "cpu", "--out", str(out)], timeout=600)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    rep = json.loads((out / "gpu-check.json").read_text())
    assert rep["verdict"] == "PASS" and p.stdout.startswith("FreqLDM GPU check: PASS")
    assert (out / "gpu-check.txt").read_text() == "\n".join(rep["text"]) + "\n" == p.stdout
    assert list(rep["phases"]) == list(bench.CHECK_PHASES)
    assert sum(r["budget_s"] for r in rep["phases"].values()) == rep["budget_bound_s"] <= 480
    for name, r in rep["phases"].items():
        assert r["status"] == "done" and r["seconds"] <= r["budget_s"], (name, r["status"], r["notes"])
        assert all(c["ok"] for c in r["checks"]), (name, r["checks"])
    checks = {c["name"] for r in rep["phases"].values() for c in r["checks"]}
    for model in ("SiT-smoke/1", "U-ViT-smoke/1"):
        for variant in ("bf16 autocast", "compiled (aot_eager, float32)"):
            assert f"{model} on 8x8x4, batch 4: {variant} vs float32 eager" in checks
    assert {"gloo process group, 1 process", "resume is bit-exact (run of 2 + 2 steps == run of 4 steps)",
            "evaluate.py sample wrote a valid npz"} <= checks
    eq = rep["phases"]["equivalence"]["items"]
    assert all(i["loss_rel_err"] <= i["tol_loss"] and i["grad_rel_err"] <= i["tol_grad"] for i in eq)
    assert any(i["grad_rel_err"] > 0 for i in eq if "bf16" in i["variant"])          # bf16 really ran
    assert any("aot_eager" in n for n in rep["phases"]["equivalence"]["notes"])         # the CPU compile, said so
    # resume: the script's claim, checked again from its checkpoints
    work = out / "work"
    a, b = (load_checkpoint(str(work / r / "last.pt"), "sit") for r in ("run-a", "run-b"))
    assert a["step"] == b["step"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    with np.load(work / "samples.npz") as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (8, 16, 16, 3)
    # throughput: ours and the official SiT for both models, every figure named, no MFU on a CPU
    items = rep["phases"]["throughput"]["items"]
    assert {(i["model"], i["who"], i["mode"]) for i in items} == {
        (f"SiT-smoke/{p}", who, "eager") for p in (1, 2) for who in ("ours", "official")}
    for i in items:
        assert i["img_s"] > 0 and i["tokens"] == 64 and i["batch"] == 4 and i["dtype"] == "float32"
        assert i["mfu"] is None and i["gflop_img"] > 0
        assert abs(i["img_s"] - 1e3 * i["batch"] / i["step_ms"]) < 1e-6 * i["img_s"]
    assert [(r["model"], r["mode"]) for r in rep["ratios_ours_over_official"]] == [("SiT-smoke/1", "eager"),
                                                                                 ("SiT-smoke/2", "eager")]
    assert rep["machine"]["peak_flops"] is None and "MFU: none" in p.stdout
    assert rep["target"]["measured"] is None and "not measured" in p.stdout
    assert rep["phases"]["cache-encode"]["items"][0]["latents_per_s"] > 0
    assert "STAND-IN" in rep["phases"]["cache-encode"]["items"][0]["what"]
    assert [i["model"] for i in rep["phases"]["study"]["items"]] == ["VAE", "SiT"]
    # memory: the largest smoke denoiser, plain and checkpointed, its measured peak beside the plan's total
    mem = rep["phases"]["memory"]["items"]
    assert [(i["model"], i["setting"]) for i in mem] == [("uvit-smoke/1", "plain"), ("uvit-smoke/1", "checkpointed")]
    plans = bench.memory_plan("uvit-smoke/1", 8, (1, 4), 4, 1)
    assert [i["plan"] for i in mem] == [plans[0]["total"], plans[2]["total"]] and mem[1]["plan"] < mem[0]["plan"]
    assert all(i["peak"] > 0 and i["peak_kind"].startswith("RSS") for i in mem)
    assert "measured peak" in p.stdout and "not comparable with the plan" in p.stdout
    # the same folder again, one phase with a budget too small for it
    p = run(["bench.py", "--gpu-check", "--smoke", "--device", "cpu", "--out", str(out), "--phases", "study",
             "--budget-scale", "0.02"], timeout=300)
    assert_one_line_error(p, "gpu-check INCOMPLETE", "study")      # stopped at its budget, or its commands skipped
    assert "study stopped at its budget of 2 s" in p.stderr or "study: skipped the study's VAE command" in p.stderr
    rep = json.loads((out / "gpu-check.json").read_text())
    assert rep["verdict"] == "INCOMPLETE" and list(rep["phases"]) == ["study"]
    r = rep["phases"]["study"]                        # 2 s budget, then 5 + 5 s to end it (its own clock, which
    assert r["budget_s"] == pytest.approx(1.8) and r["seconds"] <= r["budget_s"] + 12   # the start-up leaves out)
    with pytest.raises(ProcessLookupError):                         # nothing of the stopped phase still runs
        os.killpg(rep["phases"]["study"]["pid"], 0)
    assert not (out / "work" / "run-a").exists() and not (out / "phases" / "equivalence.json").exists()


def test_gpu_check_needs_a_gpu_unless_smoke_and_its_own_folder(tmp_path):
    p = run(["bench.py", "--gpu-check", "--device", "cpu"], timeout=120)
    assert_one_line_error(p, "--gpu-check needs a CUDA GPU")
    import bench
    from common import UserError
    (tmp_path / "notes.txt").write_text("a user's file")
    with pytest.raises(UserError, match=r"holds files that are not a GPU check's \(notes.txt\)"):
        bench.main(["--gpu-check", "--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_gpu_check_compiled_throughput_row_reuses_the_eager_flops(tmp_path):
    """The compiled throughput row (run on a GPU only by --gpu-check) at smoke size on CPU with aot_eager: it
    times the compiled step and takes the FLOP count of the eager row, which the official SiT matches."""
    import types

    import torch

    import bench
    a = types.SimpleNamespace(smoke=True, budget_scale=1.0, out=str(tmp_path))
    os.makedirs(tmp_path / "phases")
    ph = bench.Phase(a, "throughput", torch.device("cpu"))
    flops = {}
    eager, _, prof = bench.throughput_row(ph, "smoke/1", 8, 4, 4, "eager", "ours", flops)
    assert prof["clock"] == "CPU op" and 0 < sum(t["share"] for t in prof["top"]) <= 1 + 1e-9
    official = bench.throughput_row(ph, "smoke/1", 8, 4, 4, "eager", "official", flops)[0]
    assert abs(official["gflop_img"] - eager["gflop_img"]) <= 0.05 * eager["gflop_img"]
    compiled, config, _ = bench.throughput_row(ph, "smoke/1", 8, 4, 4, "compiled", "ours", flops)
    assert compiled["img_s"] > 0 and compiled["gflop_img"] == eager["gflop_img"] and "SiT-smoke/1" in config
    assert compiled["tflop_s"] == pytest.approx(compiled["gflop_img"] * compiled["img_s"] / 1e3)


def test_gpu_check_report_of_a_gpu_run():
    """The report's GPU lines from a phase record shaped as a GPU run writes it: the ratio to the official SiT
    per model and mode, MFU in %, the peak it assumes, the 800 img/s target met or missed."""
    import types

    import bench
    a = types.SimpleNamespace(smoke=False, budget_scale=1.0)
    m = dict(device="cuda", name="NVIDIA H100 80GB HBM3", capability="sm_90", memory_gib=79.2, cuda="13.0",
             cudnn=91000, torch="2.14.1", python="3.11", cpus=16, dist_backend="nccl", compile_backend="inductor",
             peak_flops=bench.GPU_PEAK["H100"])

    def row(who, mode, img_s):
        return dict(model="SiT-XL/1", who=who, mode=mode, dtype="bf16 autocast", batch=32, tokens=256,
                    latents="16x16x32", img_s=img_s, step_ms=32e3 / img_s, gflop_img=711.0,
                    tflop_s=0.711 * img_s, mfu=0.711 * img_s / 989, mem_mib=30000.0, mem_kind="CUDA alloc",
                    profile=None)
    for best, verdict in ((700.0, "missed (700 img/s, compiled)"), (820.0, "met (820 img/s, compiled)")):
        items = [row("ours", "eager", 400.0), row("official", "eager", 320.0), row("ours", "compiled", best),
                 row("official", "compiled", 500.0)]
        rec = dict(items=items, checks=[], notes=[], status="done", seconds=200.0, budget_s=220.0)
        rep = bench.assemble(a, ["--gpu-check"], m, {"throughput": rec}, 230.0)
        text = "\n".join(rep["text"])
        assert rep["verdict"] == "PASS" and rep["budget_bound_s"] == bench.CHECK_PHASES["throughput"][0]
        assert [round(r["ours_over_official"], 6) for r in rep["ratios_ours_over_official"]] == [
            round(400 / 320, 6), round(best / 500, 6)]
        assert "dense bf16 peak of 989 TFLOP/s assumed for NVIDIA H100 80GB HBM3" in text
        assert f"| {100 * 0.711 * best / 989:.1f} % |" in text
        assert f"target 800 img/s for SiT-XL/1 at 256 tokens in bf16 on one GPU: {verdict}" in text
        assert rep["target"]["met"] == (best >= 800)
