"""Plumbing shared by train_vae.py, train_diffusion.py and evaluate.py.

    (library module: no entry point. The scripts that use it run as
     python SCRIPT.py ... | torchrun --nproc_per_node=8 SCRIPT.py ... |
     torchrun --nnodes=4 --node_rank=$R --master_addr=$HOST --master_port=29500 --nproc_per_node=8 SCRIPT.py ...)

- settings: argparse + named presets that flags override; the config is a plain dict
- distributed: one setup for plain python (rank 0 of 1) and torchrun (nccl on GPU, gloo on CPU)
- randomness: every random draw of a training step comes from a generator seeded by
  (seed, step, stream) over the *global* batch, then sliced to this rank's samples, so a
  resumed run and a run on any number of ranks draw exactly the same numbers
- checkpoints: atomic writes, `weights_only=True` loads, a `kind` tag that is checked
- logging: rank-0 printing, JSONL metrics averaged across ranks, PNG grids
"""
import argparse
import contextlib
import hashlib
import errno
import io
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm


VAE_OUT = "runs/vae"        # Stage 1's default output folder; Stage 2's --vae defaults to VAE_OUT/last.pt


class UserError(RuntimeError):
    """Bad input or a stopped run: printed as one line, exit status 2."""


class SignalStop(Exception):
    """A run stopped by SIGTERM / SIGINT after saving its checkpoint: exit status 128 + signal number."""

    def __init__(self, signum, ckpt_path, step):
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(self.signum).name} at step {step}: saved {ckpt_path}; "
                         f"run the same command again to resume")


def run_main(main):
    """Call main(); one clear line and a non-zero exit status for everything that is not a finished run.

    2: bad input or a stopped run (UserError, data errors); 128 + N: stopped by signal N after saving
    (143 for SIGTERM, 130 for SIGINT); 130 also for Ctrl-C outside the training loop.
    """
    from data import DataError
    try:
        main()
    except (UserError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        cleanup_distributed()
        sys.exit(2)
    except SignalStop as e:
        print(str(e), file=sys.stderr, flush=True)
        cleanup_distributed()
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT)", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    cleanup_distributed()


# ----------------------------------------------------------------------------- settings

def check_out_dir(path, flag="--out"):
    """Create the output folder if needed; one line if it is a file or cannot be written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written to ({e.strerror or e})") from None


def check_range(args, name, low=None, high=None, optional=False):
    """One line unless args.<name> is a number in [low, high] (NaN fails; None passes if optional)."""
    v = getattr(args, name)
    if v is None and optional:
        return
    flag = "--" + name.replace("_", "-")
    ok = v is not None and not (isinstance(v, float) and math.isnan(v))
    ok = ok and (low is None or v >= low) and (high is None or v <= high)
    if not ok:
        want = (f"in [{low}, {high}]" if low is not None and high is not None else
                f">= {low}" if low is not None else f"<= {high}")
        raise UserError(f"{flag} must be {want}; got {v}")


def validate_common(args):
    """Check the settings of add_common_args (each script calls this once, right after parsing)."""
    check_range(args, "steps", 0)
    for name in ("global_batch", "ckpt_every", "log_every", "sample_every", "n_images"):
        check_range(args, name, 1)
    check_range(args, "micro_batch", 1, optional=True)
    check_range(args, "workers", 0)
    check_range(args, "lr", 0.0, math.inf)
    check_range(args, "weight_decay", 0.0, math.inf)
    check_range(args, "ema_decay", 0.0, 1.0)
    check_device(args.device)
    check_out_dir(args.out)


def check_device(name):
    """One line unless `--device` names a device this machine has (cpu, cuda, cuda:N); returns it."""
    if name is None:
        return None
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type != "cpu":
        raise UserError(f"--device {name}: only cpu and cuda devices are supported")
    return dev


def parse_with_presets(parser, presets, argv=None):
    """Parse argv; `--preset NAME` sets defaults from presets[NAME]; explicit flags still win."""
    parser.add_argument("--preset", choices=sorted(presets), default=None,
                        help="named configuration; any flag given explicitly overrides it")
    first, _ = parser.parse_known_args(argv)
    if first.preset:
        dests = {a.dest for a in parser._actions}
        unknown = set(presets[first.preset]) - dests
        assert not unknown, f"preset {first.preset} sets unknown options {unknown}"
        parser.set_defaults(**presets[first.preset])
    args = parser.parse_args(argv)
    args.explicit = sorted(explicit_dests(parser, argv))
    return args


def explicit_dests(parser, argv=None):
    """The settings given on the command line itself (not by a default or a preset)."""
    saved = {a: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for a, v in saved.items():
            a.default = v
    return set(vars(given)) - {"preset"}


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def setup_distributed(device=None):
    """Rank, world size and device from torchrun's environment (rank 0 of 1 under plain python)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = check_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Dist(rank, local, world, device)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values, device):
    """Average a dict of floats over ranks (identity on one process)."""
    if not dist.is_initialized():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def any_rank(flag, device):
    """True on every rank if `flag` is true on any rank."""
    return bool(max_over_ranks(1 if flag else 0, device))


def max_over_ranks(value, device):
    """The largest of an integer over all ranks (the value itself on one process)."""
    if not dist.is_initialized():
        return int(value)
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def batch_split(global_batch, world_size, micro_batch=None):
    """Fixed global batch -> (per-rank batch, gradient-accumulation steps, micro-batch)."""
    if global_batch < 1 or (micro_batch is not None and micro_batch < 1):
        raise UserError(f"--global-batch ({global_batch}) and --micro-batch ({micro_batch}) must be at least 1")
    if global_batch % world_size:
        raise UserError(f"global batch {global_batch} is not divisible by the world size {world_size}")
    per_rank = global_batch // world_size
    micro = min(micro_batch or per_rank, per_rank)
    if per_rank % micro:
        raise UserError(f"per-rank batch {per_rank} is not divisible by --micro-batch {micro}")
    return per_rank, per_rank // micro, micro


def micro_rows(d, per_rank, micro, j):
    """Rows of micro-batch j of this rank inside the global batch (for the per-step random draws)."""
    start = d.rank * per_rank + j * micro
    return slice(start, start + micro)


def sync_grads_on(model, j, accum):
    """DDP all-reduces gradients only on the last micro-batch of a step; no_sync() before it."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and j < accum - 1:
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def autocast(device, enabled=True):
    """bf16 autocast on CUDA; a no-op on CPU (float32 there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- randomness

def step_generator(seed, step, stream, device):
    """A generator for one (seed, step, stream) triple; streams name independent draws."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + stream) % (2 ** 63))
    return g


def global_randn(shape, seed, step, stream, rows, device):
    """randn over the global batch (shape[0] = global batch), sliced to `rows` (a slice)."""
    return torch.randn(shape, generator=step_generator(seed, step, stream, device), device=device)[rows]


def global_rand(shape, seed, step, stream, rows, device):
    """Uniform [0, 1) over the global batch, sliced to `rows`."""
    return torch.rand(shape, generator=step_generator(seed, step, stream, device), device=device)[rows]


# ----------------------------------------------------------------------------- EMA

@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, over parameters; buffers are copied."""
    ep, mp = list(ema.parameters()), list(unwrap(model).parameters())
    torch._foreach_lerp_(ep, mp, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), unwrap(model).buffers()):
        eb.copy_(mb)


# ----------------------------------------------------------------------------- files

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_UMASK = os.umask(0)
os.umask(_UMASK)


def disk_full(exc):
    """The ENOSPC / EDQUOT OSError behind an exception (libraries often re-raise it wrapped), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_error(path, err, kept=None):
    """The one-line UserError for a write that ran out of space."""
    kept = kept if kept is not None else os.path.exists(path)
    what = f"the previous {path} is kept unchanged" if kept else f"{path} was not written"
    return UserError(f"disk full ({err.strerror or os.strerror(err.errno)}) while writing {path}: {what}; "
                     f"free some space and rerun")


class _FdWriter(io.RawIOBase):
    """Raw file over an os-level descriptor: every byte goes through os.write (and so can fail there)."""

    def __init__(self, fd):
        self.fd = fd

    def writable(self):
        return True

    def write(self, b):
        return os.write(self.fd, b)

    def fileno(self):
        return self.fd

    def close(self):
        if not self.closed:
            try:
                os.close(self.fd)
            finally:
                super().close()


@contextlib.contextmanager
def atomic_write(path, text=False):
    """Open a file for writing that appears at `path` only when complete.

    Writes go to a temporary file in the same folder, which is flushed, fsync'ed and renamed over
    `path` at the end. On any error (or Ctrl-C) the temporary file is removed and `path` is left as
    it was; a full disk becomes one UserError line naming the file and what was kept.

        with atomic_write("out/x.npz") as f:
            np.savez(f, arr_0=arr)
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full_error(path, e) from None
        raise UserError(f"cannot write {path} ({e.strerror or e})") from None
    f = io.BufferedWriter(_FdWriter(fd), 1 << 20)
    try:
        yield io.TextIOWrapper(f, encoding="utf-8", write_through=True) if text else f
        f.flush()
        os.fsync(fd)
        f.close()
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(Exception):
            f.close()
        with contextlib.suppress(Exception):
            f.raw.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        full = disk_full(e)
        if full is not None:
            raise disk_full_error(path, full) from None
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path} ({e.strerror or e}); nothing was written there") from None
        raise


def write_json(path, obj):
    with atomic_write(path, text=True) as f:
        json.dump(obj, f, indent=1)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, state):
    """Write atomically (temporary file, fsync, rename): a crash or a full disk never leaves a half-written file."""
    with atomic_write(path) as f:
        torch.save(state, f)


def file_hash(path, chunk=1 << 24):
    """sha256 of a file's bytes (first 16 hex digits): the identity of a checkpoint, whatever its path."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_checkpoint(path, kind):
    """Load with weights_only=True and check that it is a `kind` ("vae" / "sit") checkpoint."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable FreqLDM checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(ck, dict) or "kind" not in ck:
        raise UserError(f"{path} is not a FreqLDM checkpoint (no 'kind' entry)")
    if ck["kind"] != kind:
        raise UserError(f"{path} is a '{ck['kind']}' checkpoint, but a '{kind}' checkpoint is needed here")
    return ck


def rng_state(device):
    """Global RNG states (torch CPU and CUDA) as tensors, for the checkpoint."""
    s = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- stopping

class StopSignal:
    """SIGTERM / SIGINT set a flag; the training loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.flag, self.signum = False, 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.flag, self.signum = True, max(self.signum, int(signum))

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def nonfinite_reason(totals):
    """'loss is nan' / 'gradient norm is inf' / 'd_gan is nan' for the first non-finite value, else None."""
    names = ["loss", "grad_norm"] + sorted(k for k in totals if k not in ("loss", "grad_norm"))
    for k in names:
        v = totals.get(k)
        if isinstance(v, float) and not math.isfinite(v):
            return f"{'gradient norm' if k == 'grad_norm' else k} is {v}"
    return None


def stop_nonfinite(reason, step, ckpt_path):
    """Stop on a non-finite loss or gradient norm, naming the last good checkpoint (left untouched)."""
    last = ckpt_path if os.path.isfile(ckpt_path) else "none written yet"
    raise UserError(f"{reason} at step {step}: stopped; last good checkpoint: {last} "
                    f"(--on-nonfinite skip skips such steps instead)")


# ----------------------------------------------------------------------------- logging

def log0(msg, d=None):
    """Print from rank 0 only (through tqdm so progress bars stay intact)."""
    if d is None or d.main:
        tqdm.write(str(msg), file=sys.stdout)
        sys.stdout.flush()


class MetricsLog:
    """JSONL metrics file written by rank 0: lines after `step` (those of a killed run that were never
    checkpointed) are dropped when a run starts or resumes at `step`, so no step is logged twice."""

    def __init__(self, path, enabled=True, step=0):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if os.path.isfile(path):
                with open(path) as f:
                    keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
                with open(path + ".tmp", "w") as f:
                    f.writelines(keep)
                os.replace(path + ".tmp", path)

    def write(self, **record):
        if self.enabled:
            line = (json.dumps(record) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
            except OSError as e:
                os.ftruncate(fd, size)                   # never leave half a line
                if e.errno in DISK_FULL:
                    raise disk_full_error(self.path, e, kept=True) from None
                raise
            finally:
                os.close(fd)


def progress(total, initial, d, desc):
    return tqdm(total=total, initial=initial, disable=not d.main, desc=desc, unit="step",
                dynamic_ncols=True, mininterval=1.0, file=sys.stdout)


class Throughput:
    """Images per second over the last reporting window."""

    def __init__(self):
        self.t, self.n = time.perf_counter(), 0

    def add(self, n):
        self.n += n

    def rate(self):
        now = time.perf_counter()
        r = self.n / max(now - self.t, 1e-9)
        self.t, self.n = now, 0
        return r


def save_grid(images, path, nrow):
    """Save float images (N, 3, H, W) in [-1, 1] as one PNG grid (written atomically)."""
    import torchvision
    with atomic_write(path) as f:
        torchvision.utils.save_image(images.float().clamp(-1, 1) * 0.5 + 0.5, f, nrow=nrow, padding=1, format="png")


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def add_common_args(p):
    """Settings every training script shares."""
    p.add_argument("--data", default="deadleaves", help="'deadleaves' (built-in) or an ImageNet-style folder")
    p.add_argument("--n-images", type=int, default=10000, help="size of the dead-leaves set")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips (part of the sample key; the latent cache stores both flips)")
    p.add_argument("--val-images", type=int, default=256,
                   help="images held out of training for the validation metrics (a seeded random subset)")
    p.add_argument("--val-every", type=int, default=5000, help="steps between validation metrics (0: never)")
    p.add_argument("--steps", type=int, default=400000, help="optimizer steps in total")
    p.add_argument("--global-batch", type=int, default=256, help="images per optimizer step over all ranks")
    p.add_argument("--micro-batch", type=int, default=None, help="per-rank forward batch (gradient accumulation)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100, help="steps between metric lines")
    p.add_argument("--ckpt-every", type=int, default=5000, help="steps between checkpoints")
    p.add_argument("--sample-every", type=int, default=10000, help="steps between PNG grids")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--device", default=None, help="force a device (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", default="auto",
                   help="'auto' (OUT/last.pt if present), 'none', or a checkpoint path")
    p.add_argument("--overwrite", action="store_true",
                   help="with --resume none: start afresh in a folder that holds another run")
    p.add_argument("--on-nonfinite", default="stop", choices=("stop", "skip"),
                   help="a step whose loss or gradient norm is NaN / inf: stop the run (keeping the last good "
                        "checkpoint) or skip that step's update")
    return p


def resume_path(args):
    """The checkpoint a run continues from: OUT/last.pt with --resume auto (if present), a path, or None.

    A run folder belongs to one run: starting fresh (--resume none) in a folder that holds a checkpoint is
    refused unless --overwrite is given.
    """
    own = os.path.join(args.out, "last.pt")
    if args.resume == "none":
        if os.path.isfile(own) and not getattr(args, "overwrite", False):
            raise UserError(f"{args.out} already holds a run ({own}); pass --overwrite to start afresh there, "
                            f"or use another --out")
        return None
    if args.resume == "auto":
        return own if os.path.isfile(own) else None
    return args.resume


def check_resume_settings(stored, args, fixed, path, d=None):
    """Resume policy: settings in `fixed` may not change (one line naming the first that did); the others may
    (learning rate, steps, logging, workers, devices ...): each change is logged and takes effect."""
    for k in fixed:
        if k in stored and stored[k] != getattr(args, k):
            raise UserError(f"{path} was trained with --{k.replace('_', '-')} {stored[k]}, not {getattr(args, k)}: "
                            f"it may not change on resume; start a fresh run with another --out")
    skip = set(fixed) | {"explicit", "resume", "overwrite", "preset"}
    for k, v in sorted(vars(args).items()):
        if k not in skip and k in stored and stored[k] != v:
            log0(f"resume: --{k.replace('_', '-')} changes from {stored[k]} to {v}", d)


def set_lr(opt, lr):
    """A resumed optimizer takes the learning rate given now (its state dict carries the old one)."""
    for g in opt.param_groups:
        g["lr"] = lr


class RunLock:
    """An exclusive lock on a run folder (OUT/.lock, held by rank 0 while the run lasts): two runs never share
    one. `with RunLock(out, d): ...`; the lock goes with the process, so a killed run leaves none behind."""

    def __init__(self, out, d):
        self.out, self.main, self.f = out, d.main, None

    def __enter__(self):
        if self.main:
            import fcntl
            os.makedirs(self.out, exist_ok=True)
            self.f = open(os.path.join(self.out, ".lock"), "w")
            try:
                fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.f.close()
                raise UserError(f"another run is using {self.out} (it holds {self.out}/.lock); "
                                f"wait for it or use another --out") from None
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()


class StepLoop:
    """Per-step bookkeeping shared by the trainers: progress bar with images/s and ETA,
    JSONL metrics every --log-every steps, and the SIGTERM / SIGINT flag agreed by all ranks."""

    def __init__(self, args, d, step, desc):
        self.args, self.d = args, d
        self.bar = progress(args.steps, step, d, desc)
        self.log = MetricsLog(os.path.join(args.out, "metrics.jsonl"), d.main, step)
        self.stop, self.speed = StopSignal(), Throughput()
        self.skipped = 0

    def due(self, step, every):
        return step % every == 0 or step == self.args.steps

    @staticmethod
    def accumulate(totals, parts, accum):
        """Add one micro-batch's loss parts (tensors) to the step's running averages."""
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v.item() / accum

    def reduce_and_clip(self, totals, params, step, ckpt_path, clip, other_params=()):
        """Average the step's losses over ranks and clip the gradients; returns the metrics.

        A NaN / inf loss (or loss part) or gradient norm stops the run (--on-nonfinite stop) before the
        optimizer or a checkpoint sees it, or (skip) drops this step's gradients of `params` and
        `other_params`, so the optimizers leave the weights as they were; `skipped` is then 1.
        Losses and gradients are already averaged over ranks, so every rank takes the same decision.
        """
        params, other_params = list(params), list(other_params)
        totals = all_reduce_mean(totals, self.d.device)
        totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, clip).item()
        reason = nonfinite_reason(totals)
        if reason is not None:
            if self.args.on_nonfinite == "stop":
                stop_nonfinite(reason, step, ckpt_path)
            for p in params + other_params:
                p.grad = None
            self.skipped += 1
            log0(f"step {step}: {reason}: update skipped ({self.skipped} so far)", self.d)
        totals["skipped"] = int(reason is not None)
        return totals

    def end_step(self, step, metrics):
        """Record a finished step; returns True when the run must save and stop."""
        self.speed.add(self.args.global_batch)
        self.bar.update(1)
        if step % self.args.log_every == 0 or step == self.args.steps:
            rate = self.speed.rate()
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{rate:.0f}")
            self.log.write(step=step, img_per_s=rate, **metrics)
        return max_over_ranks(self.stop.signum, self.d.device)

    def close(self):
        self.bar.close()
        self.stop.restore()


def finish_message(step, first_step, args, ckpt_path, done):
    """The last line of a training run: `done` only when this run trained and wrote its final checkpoint."""
    if step == args.steps and step > first_step:
        return done
    return (f"nothing to train: at step {step} of --steps {args.steps}; "
            f"{'no checkpoint written' if step == 0 else 'no new checkpoint written'}")
