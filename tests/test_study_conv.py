"""study.py parts B (conv) and D at the smoke setting: the real commands, a DC-AE-style autoencoder, its F3 peak,
SiTs trained on it (baseline and FreqWarm with --r0 auto) with the offline metric of their kept EMA weights."""
import json

import torch

from common import file_hash
from helpers import read_metrics, run
from vae import f3_peak


def test_study_part_d_runs_at_the_smoke_setting(tmp_path):
    out = tmp_path / "study"
    p = run(["study.py", "--setting", "smoke", "--parts", "D", "--out", str(out)], timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    conv = res["B_conv"]["peaks"]
    assert [(r["dim"], r["seed"]) for r in conv] == [(4, 0)]
    diag = json.loads((out / "dcae-d4-s0" / "diagnosis" / "diagnosis.json").read_text())
    assert diag["autoencoder"].startswith("AutoencoderDC") and conv[0]["peak_r0"] == diag["f3_peak_r0"]
    report = (out / "study.md").read_text()
    if res["B_conv"]["clearest"] is None:                  # the study's stated outcome: no peak, no part D
        assert "Not run: no conv autoencoder of part B shows an interior F3 peak" in report
        return
    d = res["D"]["runs"]
    assert sorted(d) == ["FreqWarm r0=auto", "baseline"] and res["D"]["autoencoder"] == res["B_conv"]["clearest"]
    for name, runs in d.items():
        assert [c["step"] for c in runs[0]["curve"]] == [2, 4] and runs[0]["step"] == 4
        folder = out / ("sitd-" + name.replace(" ", "").replace("=", "") + "-s0")
        ck = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
        assert ck["step"] == 4 and ck["config"]["vae"] == "diffusers:" + res["B_conv"]["clearest"]["folder"]
        assert [r["step"] for r in read_metrics(folder / "metrics.jsonl")] == [1, 2, 3, 4]
        assert sorted(p.name for p in (folder / "keep").iterdir()) == ["ema_0000002.pt", "ema_0000004.pt"]
        curve = json.loads((out / "partD-curve" / "curve.json").read_text())
        points = next(r["points"] for r in curve["runs"] if r["dir"] == str(folder))
        assert [c["fd_dl"] for c in runs[0]["curve"]] == [p["fd_dl"] for p in points]
        assert [p["checkpoint_hash"] for p in points] == [file_hash(str(folder / "keep" / f"ema_{k:07d}.pt"))
                                                          for k in (2, 4)]
    auto = d["FreqWarm r0=auto"][0]
    assert auto["r0"] == auto["r0_auto"]["chosen"] == f3_peak(auto["r0_auto"]["r0_sweep"], auto["r0_auto"]["latent_hf_energy"])
    assert d["baseline"][0]["r0"] is None
    assert "## D. FreqWarm where F3 peaks" in report and f"| FreqWarm r0=auto | {auto['r0']:g} | 4 |" in report
    assert (out / "partD_fd_dl_vs_step.png").stat().st_size > 0
    again = run(["study.py", "--setting", "smoke", "--parts", "D", "--out", str(out)])   # everything done: no command
    assert again.returncode == 0 and "$ python" not in again.stdout, again.stdout[-2000:]
