"""bench.py --quick runs on CPU and prints its table (a smoke run of the benchmark, not a timing check)."""
import re

from helpers import run


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
