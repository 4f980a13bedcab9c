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
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm


VAE_OUT = "runs/vae"        # Stage 1's default output folder; Stage 2's --vae defaults to VAE_OUT/last.pt


class UserError(RuntimeError):
    """Bad input or a stopped run: printed as one line, exit status 2."""


def run_main(main):
    """Call main(); turn UserError (and data errors) into one clear line and exit code 2."""
    from data import DataError
    try:
        main()
    except (UserError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        cleanup_distributed()
        sys.exit(2)
    cleanup_distributed()


# ----------------------------------------------------------------------------- settings

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
    device = torch.device(device)
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
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def batch_split(global_batch, world_size, micro_batch=None):
    """Fixed global batch -> (per-rank batch, gradient-accumulation steps, micro-batch)."""
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


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, state):
    """Write atomically: to PATH.tmp, then rename (a crash never leaves a half-written file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def write_json_atomic(path, obj):
    """Write JSON to PATH.tmp, fsync, rename: readers see the old file or the whole new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        self.flag = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.flag = True

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def check_finite(loss_value, step, ckpt_path):
    """Stop on a NaN / inf loss, naming the last good checkpoint (which is left untouched)."""
    if not math.isfinite(loss_value):
        last = ckpt_path if os.path.isfile(ckpt_path) else "none written yet"
        raise UserError(f"loss is {loss_value} at step {step}: stopped; last good checkpoint: {last}")


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
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


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
    """Save float images (N, 3, H, W) in [-1, 1] as one PNG grid."""
    import torchvision
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torchvision.utils.save_image(images.float().clamp(-1, 1) * 0.5 + 0.5, path, nrow=nrow, padding=1)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def add_common_args(p):
    """Settings every training script shares."""
    p.add_argument("--data", default="deadleaves", help="'deadleaves' (built-in) or an ImageNet-style folder")
    p.add_argument("--n-images", type=int, default=10000, help="size of the dead-leaves set")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips (part of the sample key; the latent cache stores both flips)")
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
    """An exclusive lock on a run folder (OUT/.lock, held by rank 0 for the run): two runs never share one."""

    def __init__(self, out, d):
        self.f = None
        if d.main:
            import fcntl
            os.makedirs(out, exist_ok=True)
            self.f = open(os.path.join(out, ".lock"), "w")
            try:
                fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.f.close()
                raise UserError(f"another run is using {out} (it holds {out}/.lock); wait for it or use another --out")

    def release(self):
        if self.f is not None:
            self.f.close()
            self.f = None


class StepLoop:
    """Per-step bookkeeping shared by the trainers: progress bar with images/s and ETA,
    JSONL metrics every --log-every steps, and the SIGTERM / SIGINT flag agreed by all ranks."""

    def __init__(self, args, d, step, desc):
        self.args, self.d = args, d
        self.bar = progress(args.steps, step, d, desc)
        self.log = MetricsLog(os.path.join(args.out, "metrics.jsonl"), d.main, step)
        self.stop, self.speed = StopSignal(), Throughput()

    def due(self, step, every):
        return step % every == 0 or step == self.args.steps

    @staticmethod
    def accumulate(totals, parts, accum):
        """Add one micro-batch's loss parts (tensors) to the step's running averages."""
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v.item() / accum

    def reduce_and_clip(self, totals, params, step, ckpt_path, clip):
        """Average the step's losses over ranks, stop on NaN, clip gradients; returns the metrics."""
        totals = all_reduce_mean(totals, self.d.device)
        check_finite(totals["loss"], step, ckpt_path)
        totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, clip).item()
        return totals

    def end_step(self, step, metrics):
        """Record a finished step; returns True when the run must save and stop."""
        self.speed.add(self.args.global_batch)
        self.bar.update(1)
        if step % self.args.log_every == 0 or step == self.args.steps:
            rate = self.speed.rate()
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{rate:.0f}")
            self.log.write(step=step, img_per_s=rate, **metrics)
        return any_rank(self.stop.flag, self.d.device)

    def close(self):
        self.bar.close()
        self.stop.restore()
