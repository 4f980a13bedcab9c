"""Helpers for running the scripts as a user would."""
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, timeout=300, env=None, torchrun=0):
    """Run a script (`python X.py ...` or `torchrun --nproc_per_node=N X.py ...`) from the repo root."""
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                              if torchrun else []) + list(args)
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) >= 1 and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


def sigterm_after_first_log(args, metrics_path, timeout=120, sig=signal.SIGTERM):
    """Start a run, send SIGTERM (or `sig`) once its metrics file has a line, return the finished process."""
    e = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable] + list(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=e)
    t0 = time.time()
    while not (os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0):
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.2)
    p.send_signal(sig)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err
