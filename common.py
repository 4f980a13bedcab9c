"""Plumbing shared by train_vae.py, train_diffusion.py and evaluate.py.

    (library module: no entry point. The scripts that use it run as
     python SCRIPT.py ... | torchrun --nproc_per_node=8 SCRIPT.py ... |
     torchrun --nnodes=4 --node_rank=$R --master_addr=$HOST --master_port=29500 --nproc_per_node=8 SCRIPT.py ...)

- settings: argparse + named presets that flags override; the config is a plain dict; settings that act only
  with others are listed in each script's NEEDS table and refused without them (check_needs)
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
import fcntl
import gc
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from tqdm import tqdm


VAE_OUT = "runs/vae"        # Stage 1's default output folder; Stage 2's --vae defaults to VAE_OUT/last.pt


class UserError(RuntimeError):
    """Bad input or a stopped run: printed as one line, exit status 2."""


class DataError(RuntimeError):
    """A problem with the input data, reported as one line.

    Raised in a DataLoader worker, it comes back to the main process re-built from the text
    "Caught DataError in DataLoader worker process N. Original Traceback ... common.DataError: MSG";
    only MSG is kept, so the user sees the one line once.
    """

    def __init__(self, msg=""):
        msg = str(msg)
        if "\nOriginal Traceback" in msg:
            last = msg.rstrip().splitlines()[-1]
            msg = last.split("DataError: ", 1)[-1]
        super().__init__(msg)


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
    status = 0
    try:
        main()
    except (UserError, DataError, ValueError) as e:
        # an error raised before the process group exists comes from checking the command line, the same on
        # every rank: rank 0 prints it (once); later errors may be one rank's own, so each rank prints its own
        if dist.is_initialized() or int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        status = 2
    except SignalStop as e:
        print(str(e), file=sys.stderr, flush=True)
        status = 128 + e.signum
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT)", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    # The DDP model (its reducer holds the process group) must be gone before the group is torn down, or it is
    # freed during interpreter exit, where gloo can abort the rank (SIGABRT). Past the except blocks the
    # exception's traceback no longer holds main()'s frames; gc.collect() frees them where a reference cycle
    # still does (torch imports modules lazily when the first optimizer is built; those frames keep the trainer's).
    gc.collect()
    if status:
        cleanup_distributed()
        sys.exit(status)
    cleanup_distributed(together=True)


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


def check_finite(args, name):
    """One line unless args.<name> is a finite number (NaN and inf fail)."""
    v = getattr(args, name)
    if not math.isfinite(v):
        raise UserError(f"--{name.replace('_', '-')} must be a finite number; got {v}")


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
    check_range(args, "val_images", 0)
    check_range(args, "val_every", 0)
    check_range(args, "dist_timeout", 1, optional=True)
    check_device(args.device)
    batch_split(args.global_batch, int(os.environ.get("WORLD_SIZE", "1")), args.micro_batch)  # before any work
    check_out_dir(args.out)
    if args.log_to == "tensorboard":
        check_tensorboard()


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
    args.preset_set = sorted(presets[first.preset]) if first.preset else []
    return args


def parse_training_args(parser, presets, argv=None, needs=None):
    """A trainer's settings: parse_with_presets, then the checks of add_common_args' settings and of `needs`
    (settings that act only with others: check_needs)."""
    args = parse_with_presets(parser, presets, argv)
    check_needs(args, {**COMMON_NEEDS, **(needs or {})})
    validate_common(args)
    return args


def explicit_dests(parser, argv=None):
    """The settings given on the command line itself (not by a default or a preset), subcommands' included."""
    parsers, seen = [parser], []
    while parsers:                                       # the parser and its subcommands' parsers
        q = parsers.pop()
        seen.append(q)
        parsers += [s for a in q._actions if isinstance(a, argparse._SubParsersAction) for s in a.choices.values()]
    saved = [(q, q._defaults, {a: a.default for a in q._actions}) for q in seen]
    try:
        for q in seen:
            q._defaults = {}                             # set_defaults (a preset) puts its values here too
            for a in q._actions:
                a.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for q, defaults, actions in saved:
            q._defaults = defaults
            for a, v in actions.items():
                a.default = v
    return set(vars(given)) - {"preset", "cmd"}


@dataclass(frozen=True)
class When:
    """A condition on another setting: `dest` holds one of `values` (with unless=True: none of them).

    A script's table {setting: (When, ...)} lists the settings that act only when all their conditions hold
    (check_needs refuses them otherwise), e.g. {"r0": (when("freqwarm", True),)}."""
    dest: str
    values: tuple
    unless: bool = False

    def holds(self, args):
        return (getattr(args, self.dest) in self.values) != self.unless

    def __str__(self):
        flag = "--" + self.dest.replace("_", "-")
        if self.values == (True,) and not self.unless:
            return f"with {flag}"
        if self.values == (None,):
            return f"{'with' if self.unless else 'without'} {flag}"
        shown = " or ".join(map(str, self.values)) if len(self.values) < 3 else \
            f"{', '.join(map(str, self.values[:-1]))} or {self.values[-1]}"
        return f"with {flag} {'other than ' if self.unless else ''}{shown}"


def when(dest, *values, unless=False):
    """When(dest, values, unless): e.g. when("freqwarm", True), when("latent_norm", "scalar"),
    when("cfg_scale", 1.0, unless=True), when("warmup_steps", None) (only while --warmup-steps is not given)."""
    return When(dest, tuple(values), unless)


def flag_text(args, dest):
    """'--r0 0.5', '--mlsr-fractions 0 0.25 0.5 0.75', or '--lowpass-clamp' (a switch) as given."""
    v = getattr(args, dest)
    flag = "--" + dest.replace("_", "-")
    if v is True:
        return flag
    return f"{flag} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"


def check_needs(args, needs):
    """Settings that act only with others (`needs`: {dest: (When, ...)}, all must hold): one given on the command
    line where they do not hold would do nothing, so it is refused in one line; one set by a preset (or a default)
    is left, named in a note when a flag given explicitly made it idle. args.inert lists every idle setting: runs
    store it, and `evaluate.py compare` / `curve` ignore those settings when they group runs."""
    explicit, preset_set = set(getattr(args, "explicit", ())), set(getattr(args, "preset_set", ()))
    args.inert, idle = [], []
    for dest, conditions in needs.items():
        unmet = [c for c in conditions if not c.holds(args)]
        if not unmet:
            continue
        args.inert.append(dest)
        if dest in explicit:
            raise UserError(f"{flag_text(args, dest)} acts only {unmet[0]}: leave it out, or run {unmet[0]}")
        if dest in preset_set and any(c.dest in explicit for c in unmet):
            idle.append(f"{flag_text(args, dest)} (acts only {unmet[0]})")
    if idle and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: the flags given leave these settings of --preset {args.preset} idle, so they are ignored: "
              f"{', '.join(idle)}", flush=True)
    args.inert.sort()
    return args


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


def setup_distributed(device=None, timeout_s=None):
    """Rank, world size and device from torchrun's environment (rank 0 of 1 under plain python).

    `timeout_s` (--dist-timeout): how long a collective waits for the slowest rank before the job fails
    (torch's default when None). Long per-rank phases (latent cache, sampling) wait on files, not in a
    collective, so they need no long timeout.
    """
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
        import datetime
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=None if timeout_s is None else datetime.timedelta(seconds=timeout_s))
    return Dist(rank, local, world, device)


def cleanup_distributed(together=False):
    """Tear the process group down; `together` (a finished run): first wait for every rank, so no rank closes
    its connections while another still uses them."""
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def wait_for_files(paths, what, poll_s=1.0):
    """Wait until every file in `paths` exists (written atomically by other ranks): the end of a long per-rank
    phase without a collective, so a rank hours behind the others trips no process-group timeout. A rank that
    fails ends the job (torchrun stops the others), so this never waits for a rank that is gone."""
    missing = [p for p in paths if not os.path.exists(p)]
    t0, said = time.time(), False
    while missing:
        if not said and time.time() - t0 > 30:
            log0(f"waiting for other ranks to finish {what} ({len(missing)} file(s) to go)")
            said = True
        time.sleep(poll_s)
        missing = [p for p in missing if not os.path.exists(p)]


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


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def adamw(params, device, shard=False, **kw):
    """AdamW, fused into one kernel launch per step where the device has it (CUDA); foreach otherwise.

    shard (--shard-optimizer, 2+ ranks): torch's ZeroRedundancyOptimizer (ZeRO stage 1) under the same DDP: each
    rank keeps the AdamW state (step and both moments, 8 bytes per parameter) of its share of the parameter
    tensors only, updates that share and broadcasts it; the gradients stay whole and DDP all-reduces them as
    before, so the update is AdamW's, element for element. Its state_dict() is the plain AdamW one (global
    parameter indices) once Run.save(gather=...) has collected the shares on rank 0, so a checkpoint loads on any
    number of ranks, sharded or not; load_state_dict() takes such a full state and keeps this rank's share."""
    fused = True if device.type == "cuda" else None
    if shard and dist.is_initialized() and dist.get_world_size() > 1:
        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, fused=fused, **kw)
    return torch.optim.AdamW(params, fused=fused, **kw)


def to_device(t, device):
    """A host tensor on `device` without waiting for the device: on CUDA a non-blocking copy from pinned
    memory (a plain .to() would wait for every queued kernel first)."""
    if device.type == "cuda":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


def autocast(device, enabled=True):
    """bf16 autocast on CUDA; a no-op on CPU (float32 there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- randomness

SEED_SCHEME = "derive_seed-1"     # checkpoints record how their random streams are seeded (Run.resume checks it)


def derive_seed(*parts):
    """A 63-bit seed for one named random stream, e.g. derive_seed(seed, "step", step, stream): a hash of all its
    parts, so streams named differently never share a seed (a sum like seed * P + step could)."""
    parts = tuple(p if isinstance(p, str) else int(p) for p in parts)        # 5, np.int64(5), tensor(5) alike
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def step_generator(seed, step, stream, device):
    """A generator for one (seed, step, stream) triple; streams name independent draws."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, "step", step, stream))


def step_uniform(seed, step, stream):
    """One uniform [0, 1) number for a whole step, the same on every rank (e.g. the step's MLSR level)."""
    return torch.rand((1,), generator=step_generator(seed, step, stream, "cpu")).item()


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
    """Load with weights_only=True and check that it is a `kind` ("vae" / "sit", or a tuple of them) checkpoint."""
    if os.path.isdir(path):
        raise UserError(f"{path} is {'an export' if is_export(path) else 'a'} folder, not a checkpoint file: "
                        f"pass a checkpoint (RUN/last.pt)")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable FreqLDM checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(ck, dict) or "kind" not in ck:
        raise UserError(f"{path} is not a FreqLDM checkpoint (no 'kind' entry)")
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if ck["kind"] not in kinds:
        raise UserError(f"{path} is a '{ck['kind']}' checkpoint, but a '{' or '.join(kinds)}' checkpoint "
                        f"is needed here")
    return ck


# ----------------------------------------------------------------------------- exported weights

EXPORT_FORMAT = "freqldm-export-1"      # config.json["format"] of an exported folder (evaluate.py export)


def checkpoint_path(path, flag="--ckpt"):
    """What --ckpt names: a checkpoint file, an export folder (returned as it is), or a run folder, read as its
    last.pt; one line for a folder that is neither."""
    if not os.path.isdir(path) or is_export(path):
        return path
    last = os.path.join(path, "last.pt")
    if not os.path.isfile(last):
        raise UserError(f"{flag} {path} is a folder without a run's last.pt (nor an export's model.safetensors "
                        f"and config.json): pass a checkpoint file or the folder of a run")
    return last


def is_export(path):
    """True if `path` is a folder written by `evaluate.py export` (model.safetensors + config.json)."""
    return all(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "model.safetensors"))


def to_json_tree(obj):
    """Tensors -> {"tensor": nested list, "dtype": ...} (exact: float32 -> float64 -> JSON repr round-trips)."""
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj.tolist(), "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, dict):
        return {str(k): to_json_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_tree(v) for v in obj]
    return obj


def from_json_tree(obj):
    if isinstance(obj, dict):
        if set(obj) == {"tensor", "dtype"}:
            return torch.tensor(obj["tensor"], dtype=getattr(torch, obj["dtype"]))
        return {k: from_json_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json_tree(v) for v in obj]
    return obj


def write_export(out, weights, config):
    """Write `weights` (a state dict) as OUT/model.safetensors and `config` as OUT/config.json, as one unit.

    config.json is also sealed into the safetensors header (metadata "freqldm_config"), so a config edited
    after export, or one from another export, is refused by read_export. Both files are written into a fresh
    folder beside OUT, which then replaces OUT: OUT is never half-written or mixed from two exports. OUT may
    be new, empty, or an earlier export; anything else is refused.
    """
    from safetensors.torch import save_file
    out = os.path.abspath(out)
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out) and not is_export(out)):
        raise UserError(f"--out {out} holds other files: export into a new or empty folder (an earlier "
                        f"export there is replaced)")
    config = json.loads(json.dumps(to_json_tree({"format": EXPORT_FORMAT, **config})))
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.export-")
    old = tmp + "-old"
    try:
        try:
            save_file(tensors, os.path.join(tmp, "model.safetensors"),
                      metadata={"freqldm_config": json.dumps(config, sort_keys=True)})
            with open(os.path.join(tmp, "model.safetensors"), "rb+") as f:
                os.fsync(f.fileno())
        except Exception as e:
            if disk_full(e) is None:
                raise
            raise disk_full_error(out, disk_full(e)) from None
        write_json(os.path.join(tmp, "config.json"), config)
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o666 & ~_UMASK)
        os.chmod(tmp, 0o777 & ~_UMASK)                       # mkdtemp makes it private
        if os.path.isdir(out):
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(old) and not os.path.exists(out):
            os.replace(old, out)                            # put the earlier export back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return config


def read_export(folder, kinds):
    """(config, state dict) of an exported folder of one of `kinds` ("sit" / "vae"), checked against its seal."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    cfg_path, st_path = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
    if not is_export(folder):
        raise UserError(f"{folder} is not an exported model folder (it needs model.safetensors and config.json, "
                        f"as `evaluate.py export` writes)")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
        with safe_open(st_path, "pt") as f:
            sealed = json.loads((f.metadata() or {}).get("freqldm_config", "null"))
        weights = load_file(st_path)
    except Exception as e:
        raise UserError(f"{folder} is not a readable export ({type(e).__name__}: {str(e)[:120]})") from None
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt != EXPORT_FORMAT or sealed is None:
        raise UserError(f"{folder} is not a FreqLDM export (config.json format {fmt!r}, expected "
                        f"{EXPORT_FORMAT!r}, with the config sealed into model.safetensors)")
    changed = tree_diff(sealed, config)
    if changed:
        raise UserError(f"{cfg_path} differs from the config sealed into {st_path} at export "
                        f"({', '.join(changed[:4])}): it was edited or comes from another export; "
                        f"export again from the checkpoint")
    if config.get("kind") not in kinds:
        raise UserError(f"{folder} is an export of a '{config.get('kind')}' model, but a "
                        f"'{' or '.join(kinds)}' model is needed here")
    return from_json_tree(config), weights


def tree_diff(a, b, prefix=""):
    """Dotted paths where two JSON trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(set(a) | set(b)) for p in tree_diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".") or "the whole file"]


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


def read_json(path, fix):
    """A JSON file the scripts wrote (atomically, so whole), or one line naming it and `fix` when it is not JSON
    (edited by hand, or another program's file under that name)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}{where}): {fix}") from None


def read_jsonl(path):
    """The records of a JSONL file (metrics.jsonl), or one line naming the file, the bad line and the fix."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}: line {i} is not valid JSON ({line.strip()[:40]!r}): a write was cut "
                                f"short; delete that line (every earlier line is intact) and rerun") from None
    return out


class MetricsLog:
    """JSONL metrics file written by rank 0: lines after `step` (those of a killed run that were never
    checkpointed) are dropped when a run resumes at `step`, so no step is logged twice; a run that starts at
    step 0 starts a fresh file (its step-0 validation line is its own). With `tensorboard`, every line also
    goes to OUT/tensorboard/ (TensorBoardLog), rebuilt from the lines kept here."""

    def __init__(self, path, enabled=True, step=0, tensorboard=False):
        self.path, self.enabled, self.tb = path, enabled, None
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            kept = []                                    # the records of steps up to `step`
            if os.path.isfile(path):
                kept = [r for r in read_jsonl(path) if step > 0 and r.get("step", 0) <= step]
                with open(path + ".tmp", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
                os.replace(path + ".tmp", path)
            out = os.path.dirname(os.path.abspath(path))
            if tensorboard:
                self.tb = TensorBoardLog(out, kept, step)
            elif os.path.isdir(os.path.join(out, TB_DIR)):      # a stale view of another run or of fewer steps
                shutil.rmtree(os.path.join(out, TB_DIR))
                log0(f"removed {os.path.join(out, TB_DIR)}/: this run logs to metrics.jsonl only "
                     f"(--log-to tensorboard rebuilds it from metrics.jsonl)")

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
            if self.tb is not None:
                self.tb.scalars(record)

    def grid(self, path, step):
        """A sample grid just written (PNG at `path`, named TAG_STEP.png) goes to TensorBoard too."""
        if self.enabled and self.tb is not None:
            self.tb.image(GRID_FILE.match(os.path.basename(path)).group(1), path, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None


TB_DIR = "tensorboard"                                      # OUT/tensorboard/, beside OUT/metrics.jsonl
GRID_FILE = re.compile(r"^(samples|recon)_(\d{7})\.png$")   # the trainers' periodic grids, TAG_STEP.png


def check_tensorboard():
    """One line unless TensorBoard's writer can be imported (--log-to tensorboard)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError("--log-to tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or leave the flag out: metrics.jsonl is always written)") from None


class TensorBoardLog:
    """--log-to tensorboard: the metrics lines as curves and the sample grids as images in OUT/tensorboard/.

    Tags: train/KEY for the training lines (losses, grad_norm, lr, img_per_s, skipped; the FreqWarm phase as
    train/freqwarm_warmup, 1 while the latents are low-passed, else 0), val/KEY for the validation lines,
    grids/TAG for the sample grids. Written by rank 0 (MetricsLog is enabled there only).

    metrics.jsonl is the record; this folder is a view of it, rebuilt whenever a run starts or resumes at
    `step`: the curves from the lines MetricsLog kept (steps <= `step`), the grids from the previous event
    files (steps <= `step` too). The rebuild is written into OUT/.tensorboard-new/ and swapped in, so a
    resumed run continues the same curves, a killed run's steps after its last checkpoint are gone, and no
    (tag, step) appears twice.
    """

    def __init__(self, out, lines, step):
        from torch.utils.tensorboard import SummaryWriter
        self.folder = os.path.join(out, TB_DIR)
        new, old = os.path.join(out, ".tensorboard-new"), os.path.join(out, ".tensorboard-old")
        grids = self.previous_grids((self.folder, old, new), step)    # old / new: left by a killed swap
        shutil.rmtree(new, ignore_errors=True)
        self.w = SummaryWriter(new)
        for record in lines:
            self.scalars(record, flush=False)
        for (tag, s), (wall, png) in sorted(grids.items(), key=lambda kv: kv[0][1]):
            self._add_png(tag, png, s, wall)
        self.w.close()
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(self.folder):
            os.replace(self.folder, old)
        os.replace(new, self.folder)
        shutil.rmtree(old, ignore_errors=True)
        self.w = SummaryWriter(self.folder, flush_secs=30)

    @staticmethod
    def previous_grids(folders, step):
        """{(tag, step): (wall time, PNG bytes)} of the grid images at steps <= `step` in earlier event files."""
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
        grids = {}
        for folder in folders:
            if not os.path.isdir(folder):
                continue
            for name in sorted(f for f in os.listdir(folder) if ".tfevents." in f):
                for ev in LegacyEventFileLoader(os.path.join(folder, name)).Load():
                    for v in ev.summary.value:
                        if v.tag.startswith("grids/") and v.HasField("image") and 0 < ev.step <= step:
                            grids[(v.tag, ev.step)] = (ev.wall_time, v.image.encoded_image_string)
        return grids

    @contextlib.contextmanager
    def _writing(self):
        """A failed event write (the writer's thread re-raises it here) is one line; metrics.jsonl has the line."""
        try:
            yield
        except OSError as e:
            full = disk_full(e)
            if full is not None:
                raise disk_full_error(self.folder, full, kept=True) from None
            raise UserError(f"cannot write TensorBoard events in {self.folder} ({e.strerror or e})") from None

    def scalars(self, record, flush=True):
        """One metrics line: every number as a point at record['step']."""
        step = record["step"]
        group = "val" if any(k.startswith("val_") for k in record) else "train"
        with self._writing():
            for k, v in record.items():
                if k == "phase":                              # FreqWarm phase, a word in metrics.jsonl
                    k, v = "freqwarm_warmup", float(v == "warmup")
                if k != "step" and isinstance(v, (int, float)):
                    self.w.add_scalar(f"{group}/{k}", v, step)
            if flush:
                self.w.flush()

    def image(self, tag, path, step):
        with open(path, "rb") as f, self._writing():
            self._add_png(f"grids/{tag}", f.read(), step)
            self.w.flush()

    def _add_png(self, tag, png, step, walltime=None):
        import numpy as np
        from PIL import Image
        self.w.add_image(tag, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), step, walltime=walltime,
                         dataformats="HWC")

    def close(self):
        with self._writing():
            self.w.close()


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
    if not torch.isfinite(images).all():
        raise UserError(f"{path}: the images are not finite (NaN / inf), so it is not written; a non-finite "
                        f"model or guidance scale (--cfg-scale) made them")
    with atomic_write(path) as f:
        torchvision.utils.save_image(images.float().clamp(-1, 1) * 0.5 + 0.5, f, nrow=nrow, padding=1, format="png")


FIXED_GROUP = "what is trained (fixed on resume)"


def fixed_group(p):
    """The parser's group of settings that define what is trained: a resumed run may not change them (Run.resume
    refuses one line), while every other flag may change on resume (and the change is logged). Where a flag is
    defined is its resume policy: nothing else lists it."""
    for g in p._action_groups:
        if g.title == FIXED_GROUP:
            return g
    return p.add_argument_group(FIXED_GROUP)


def fixed_on_resume(p):
    """The settings of the parser's fixed group (their dest names)."""
    return tuple(a.dest for a in fixed_group(p)._group_actions)


def add_common_args(p):
    """Settings every training script shares; returns the parser's fixed group (fixed_group), for the script's
    own settings that define what is trained."""
    fixed = fixed_group(p)
    fixed.add_argument("--data", default="deadleaves", help="'deadleaves' (built-in) or an ImageNet-style folder")
    fixed.add_argument("--n-images", type=int, default=10000, help="size of the dead-leaves set")
    fixed.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips (part of the sample key; the latent cache stores both flips)")
    fixed.add_argument("--val-images", type=int, default=256,
                   help="images held out of training for the validation metrics (a seeded random subset)")
    p.add_argument("--val-every", type=int, default=5000, help="steps between validation metrics (0: never)")
    p.add_argument("--steps", type=int, default=400000, help="optimizer steps in total")
    fixed.add_argument("--global-batch", type=int, default=256, help="images per optimizer step over all ranks")
    p.add_argument("--micro-batch", type=int, default=None, help="per-rank forward batch (gradient accumulation)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    fixed.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100, help="steps between metric lines")
    p.add_argument("--ckpt-every", type=int, default=5000, help="steps between checkpoints")
    p.add_argument("--sample-every", type=int, default=10000, help="steps between PNG grids")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--device", default=None, help="force a device (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing per transformer block: keep only each block's inputs and recompute "
                        "its activations in backward (less memory, one more forward; the same numbers)")
    p.add_argument("--resume", default="auto",
                   help="'auto' (OUT/last.pt if present), 'none', or a checkpoint path")
    p.add_argument("--overwrite", action="store_true",
                   help="with --resume none: start afresh in a folder that holds another run")
    p.add_argument("--log-to", default="jsonl", choices=("jsonl", "tensorboard"),
                   help="jsonl: OUT/metrics.jsonl only; tensorboard: also curves and sample grids in OUT/tensorboard/ "
                        "(needs `pip install tensorboard`; metrics.jsonl stays the record)")
    p.add_argument("--dist-timeout", type=int, default=None,
                   help="seconds a collective waits for the slowest rank before the job fails (torch's default "
                        "if unset); the latent cache and sampling wait on files instead, however long they take")
    p.add_argument("--on-nonfinite", default="stop", choices=("stop", "skip"),
                   help="a step whose loss or gradient norm is NaN / inf: stop the run (keeping the last good "
                        "checkpoint) or skip that step's update")
    return fixed


# add_common_args' settings that act only with others (each trainer's own are in its NEEDS; check_needs)
COMMON_NEEDS = {
    "n_images": (when("data", "deadleaves"),),            # the size of the built-in set; a folder has its own
    "val_every": (when("val_images", 0, unless=True),),    # no held-out images: no validation
    "overwrite": (when("resume", "none"),),
}


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
    return checkpoint_path(args.resume, "--resume")                 # a run folder: its last.pt


RUN_FILES = ("last.pt", "metrics.jsonl", "generation_metrics.json")
RUN_GRIDS = ("recon_", "samples_")                 # recon_0000100.png, recon_final.png, samples_0000100.png


def clear_run_folder(out, d):
    """A fresh start (step 0) in a used folder: remove what the previous run there wrote (checkpoint, metrics,
    recorded generation metrics, PNG grids), so nothing of it is mistaken for this run's. Latent caches
    (latents-KEY/) stay: they are keyed by content and belong to no run."""
    if not d.main or not os.path.isdir(out):
        return
    for f in sorted(os.listdir(out)):
        if f in RUN_FILES or (f.startswith(RUN_GRIDS) and f.endswith(".png")):
            os.remove(os.path.join(out, f))


def check_resume_settings(stored, args, fixed, path, d=None):
    """Resume policy: settings in `fixed` may not change (one line naming the first that did); the others may
    (learning rate, steps, logging, workers, devices ...): each change is logged and takes effect. A fixed setting
    idle in this run (args.inert: e.g. --r0 without --freqwarm) acts on nothing, so its stored value is not
    compared (the settings that make it idle are fixed themselves, and compared)."""
    idle = set(getattr(args, "inert", ()))
    for k in fixed:
        if k in stored and k not in idle and stored[k] != getattr(args, k):
            raise UserError(f"{path} was trained with --{k.replace('_', '-')} {stored[k]}, not {getattr(args, k)}: "
                            f"it may not change on resume; start a fresh run with another --out")
    skip = set(fixed) | {"explicit", "preset_set", "inert", "resume", "overwrite", "preset"}
    for k, v in sorted(vars(args).items()):
        if k not in skip and k in stored and stored[k] != v:
            log0(f"resume: --{k.replace('_', '-')} changes from {stored[k]} to {v}", d)


def check_same_data(ck, data_fp, data, path):
    """A run resumes only on the data it started on (data.fingerprint: every file's name, size and mtime):
    images added, removed or changed would move the held-out split mid-run and leave the latent statistics
    of the old data in use."""
    stored = ck.get("data_fingerprint") or (ck.get("latent_stats") or {}).get("data")
    if stored and stored != data_fp:
        raise UserError(f"{path} was trained on other data than --data {data} holds now (fingerprint {stored}, "
                        f"now {data_fp}: images were added, removed or changed): it may not change on resume; "
                        f"restore the data or start a fresh run with another --out")


def set_lr(opt, lr):
    """A resumed optimizer takes the learning rate given now (its state dict carries the old one)."""
    for g in opt.param_groups:
        g["lr"] = lr


class Run:
    """Everything that keeps a training run safe, behind one object that both trainers use, so that the
    trainers themselves read as the method. A trainer's `main` and `train` are:

        with Run(args, d, "sit", FIXED_ON_RESUME) as run:     # OUT/.lock: one run per folder
            ck = run.resume(data_fp, model_config)           # the checked checkpoint to continue, or None
            step = run.restore(ck, {"model": m, "ema": e, "opt": o}, lr={"opt": args.lr}) if ck else 0
            run.start(step)                                  # progress bar, metrics log, signal handler
            while step < args.steps:
                totals = {}
                for j in range(run.accum):                   # this rank's micro-batches
                    t = run.rand(step, STREAM_T, j)          # draws over the global batch, rows of micro-batch j
                    with run.no_sync(model, j):              # DDP all-reduces on the last micro-batch only
                        with run.autocast():
                            loss = ...                       # the method
                        (loss / run.accum).backward()
                    run.accumulate(totals, {"loss": loss})
                totals = run.clip(totals, m.parameters(), step)   # averaged over ranks, gradients clipped
                opt.step(); ...; step += 1
                run.end_step(step, metrics)                  # metrics line, signal agreed by all ranks
                if run.due(step, args.val_every): run.record(step, validation_fn)
                if run.due(step, args.ckpt_every) or run.stopping:
                    run.save(lambda: run.checkpoint(step, ...))   # rank 0 writes atomically; never non-finite
                                                     # (gather=[opt]: a sharded AdamW state, collected first)
                if run.stopping: break
            run.finish(step, "done: ...")                    # the last line, or the signal's exit

    What it guarantees:
    - resume: settings in `fixed` (the flags of the parser's "fixed on resume" group) may not change, nor the
      data (its fingerprint) or the model's config; other settings may, and each change is logged. A fresh
      start clears the folder of an earlier run's files.
    - randomness: every draw of a step comes from a generator seeded by (seed, step, stream) over the global
      batch and sliced to this rank's micro-batch (`rand`, `randn`), so a resumed run and any number of ranks
      draw the same numbers.
    - no host synchronisation inside a step (--on-nonfinite stop, the default): a step's loss parts and
      gradient norm stay on the device, are summed there, and are read once per --log-every steps as the mean
      over the steps since the last metrics line. Non-finite values are remembered on the device and looked
      at before every metrics line, sample grid, checkpoint and signal-stop save: the run stops there, naming
      the step that went non-finite and the last good checkpoint, so no file is ever written from a non-finite
      state. --on-nonfinite skip decides before each optimizer step (the only per-step host read).
    - SIGTERM / SIGINT: agreed by all ranks one step later; the trainer saves and `finish` exits 128 + N.
    """

    def __init__(self, args, d, kind, fixed=()):
        self.args, self.d, self.kind, self.fixed = args, d, kind, tuple(fixed)
        self.ckpt_path = os.path.join(args.out, "last.pt")
        self.per_rank, self.accum, self.micro = batch_split(args.global_batch, d.world_size,
                                                            getattr(args, "micro_batch", None))
        start = d.rank * self.per_rank                 # rows of this rank's micro-batches in the global batch
        self.rows = [slice(start + j * self.micro, start + (j + 1) * self.micro) for j in range(self.accum)]
        self.data_fp, self.stopping, self._lock, self._started = None, 0, None, False

    # -- the folder
    def __enter__(self):
        """Take OUT/.lock (rank 0, for as long as the run lasts): two runs never share a folder. The lock goes
        with the process, so a killed run leaves none behind."""
        if self.d.main:
            os.makedirs(self.args.out, exist_ok=True)
            self._lock = open(os.path.join(self.args.out, ".lock"), "w")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.close()
                raise UserError(f"another run is using {self.args.out} (it holds {self.args.out}/.lock); "
                                f"wait for it or use another --out") from None
        resume_path(self.args)                         # --resume none in a used folder: refused now, before any work
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self.close()
        except Exception:
            if exc_type is None:                       # after an error, that error is the one the user sees
                raise
        finally:
            if self._lock is not None:
                self._lock.close()

    # -- resume
    def resume(self, data_fp, model_config=None, check=None, check_after=None):
        """The checkpoint this run continues from (--resume; checked against this run), or None: a fresh start,
        for which the folder is cleared of an earlier run's files. `check(ck, path)` runs the trainer's own
        checks first (they may fill in settings the checkpoint decides, such as --r0 auto's choice);
        `check_after(ck, path)` those that assume the same settings and data."""
        self.data_fp = data_fp
        path = resume_path(self.args)
        if not path:
            clear_run_folder(self.args.out, self.d)
            return None
        ck = load_checkpoint(path, self.kind)
        if ck.get("seeds") != SEED_SCHEME:
            raise UserError(f"{path} was written by an earlier version whose random streams (data order, noise, "
                            f"levels) were seeded differently: resuming it here would change them mid-run; finish "
                            f"it with that version, or start a fresh run with another --out")
        if ck.get("ema_only"):
            raise UserError(f"{path} is a kept EMA-only checkpoint (for `evaluate.py curve`), not one to resume from")
        if check is not None:
            check(ck, path)
        check_resume_settings(ck["config"], self.args, self.fixed, path, self.d)
        check_same_data(ck, data_fp, self.args.data, path)
        if check_after is not None:
            check_after(ck, path)
        if ck["step"] > self.args.steps:
            raise UserError(f"{path} is already at step {ck['step']}, past --steps {self.args.steps}")
        if model_config is not None and ck["model_config"] != model_config:
            raise UserError(f"{path} holds a {self.kind} model {ck['model_config']}, but the settings build "
                            f"{model_config}")
        ck["path"] = path
        return ck

    def restore(self, ck, states, lr=None):
        """Load `states` ({checkpoint key: module or optimizer}) from `ck`, give optimizers the learning rate
        of this command (lr: {key: value}), restore the global RNG; returns the step to continue from."""
        for key, obj in states.items():
            obj.load_state_dict(ck[key])
        for key, value in (lr or {}).items():
            set_lr(states[key], value)
        set_rng_state(ck["rng"], self.d.device)
        return ck["step"]

    def checkpoint(self, step, **state):
        """A checkpoint: `state` plus what every run records (kind, settings, step, RNG, data fingerprint)."""
        return {"kind": self.kind, "config": vars(self.args), "step": step, "rng": rng_state(self.d.device),
                "data_fingerprint": self.data_fp, "seeds": SEED_SCHEME, **state}

    def save(self, state_fn, path=None, also=None, gather=()):
        """Rank 0 writes state_fn() to `path` (OUT/last.pt) atomically, then `also()` (e.g. a diffusers folder);
        all ranks wait. Never from a non-finite model. `gather`: optimizers whose state may be sharded over the
        ranks (--shard-optimizer): every rank first sends its share to rank 0 (a collective), so that state_fn's
        opt.state_dict() there is the whole AdamW state."""
        self.check_finite()
        for opt in gather:
            if isinstance(opt, ZeroRedundancyOptimizer):
                opt.consolidate_state_dict(to=0)
        if self.d.main:
            save_checkpoint(path or self.ckpt_path, state_fn())
            if also is not None:
                also()
        barrier()

    # -- the loop
    def start(self, step):
        """Progress bar (images/s, ETA), metrics log (OUT/metrics.jsonl), signal handler, from `step`."""
        a = self.args
        self.bar = progress(a.steps, step, self.d, self.kind)
        self.log = MetricsLog(os.path.join(a.out, "metrics.jsonl"), self.d.main, step,
                              tensorboard=getattr(a, "log_to", "jsonl") == "tensorboard")
        self.signal, self.speed = StopSignal(), Throughput()
        self.skipped, self.first_step = 0, step        # skipped steps in this run (--on-nonfinite skip)
        self._step = None                              # (keys, values on the device, skipped) of the last step
        self._sums = {}                                # keys -> [device sum, steps] since the last metrics line
        self._interval_skipped = 0
        self._bad_step = None                          # device int64: first non-finite step, -1 while none
        self._bad_vals = {}                            # keys -> device values of that step
        self._signal_group, self._pending_signal = None, None
        if dist.is_initialized():                      # the signal flag goes over gloo, off the device stream
            self._signal_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        self._started = True
        return self

    def due(self, step, every):
        """Periodic work (every > 0) at multiples of `every` and at the last step."""
        return every > 0 and (step % every == 0 or step == self.args.steps)

    def rand(self, step, stream, j):
        """Uniform [0, 1) draws (micro,) of micro-batch j: sliced from a draw over the global batch."""
        g = step_generator(self.args.seed, step, stream, self.d.device)
        return torch.rand((self.args.global_batch,), generator=g, device=self.d.device)[self.rows[j]]

    def randn(self, shape, step, stream, j):
        """Normal draws (micro, *shape) of micro-batch j: sliced from a draw over the global batch."""
        g = step_generator(self.args.seed, step, stream, self.d.device)
        return torch.randn((self.args.global_batch, *shape), generator=g, device=self.d.device)[self.rows[j]]

    def no_sync(self, model, j):
        """Around micro-batch j's forward and backward: DDP all-reduces the gradients only on the last
        micro-batch of the step (no_sync() before it)."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and j < self.accum - 1:
            return model.no_sync()
        return contextlib.nullcontext()

    def autocast(self):
        """bf16 autocast on CUDA unless --no-bf16; float32 on CPU."""
        return autocast(self.d.device, not self.args.no_bf16)

    def accumulate(self, totals, parts):
        """Add one micro-batch's loss parts (tensors) to the step's running averages, on the device."""
        for k, v in parts.items():
            v = v.detach().float() / self.accum
            totals[k] = totals[k] + v if k in totals else v

    def clip(self, totals, params, step, other_params=()):
        """Average the step's losses over ranks and clip the gradients (--grad-clip); returns the step's
        metrics (device tensors, and `skipped`).

        The losses are averaged with one all-reduce (queued on the device stream: no host wait) and the
        gradient norm comes from the DDP-averaged gradients, so every rank sees the same values and takes
        the same decision. A NaN / inf loss (or loss part) or gradient norm: with --on-nonfinite stop it is
        remembered on the device and stops the run at the next metrics line, sample grid or checkpoint (see
        the class), before anything is written; with skip this step's gradients of `params` and
        `other_params` are dropped, so the optimizers leave the weights as they were, and `skipped` is 1.
        """
        params, other_params = list(params), list(other_params)
        keys = sorted(totals)
        vec = torch.stack([totals[k] for k in keys])
        if dist.is_initialized():
            dist.all_reduce(vec)
            vec = vec / dist.get_world_size()
        norm = torch.nn.utils.clip_grad_norm_(params, self.args.grad_clip)
        keys = tuple(keys) + ("grad_norm",)
        vec = torch.cat([vec, norm.detach().float().reshape(1).to(vec.device)])
        bad = ~torch.isfinite(vec).all()
        skipped = 0
        if self.args.on_nonfinite == "skip":
            if bool(bad):                              # the per-step host read that skip needs
                for p in params + other_params:
                    p.grad = None
                self.skipped, skipped = self.skipped + 1, 1
                reason = nonfinite_reason(dict(zip(keys, vec.tolist())))
                log0(f"step {step}: {reason}: update skipped ({self.skipped} so far)", self.d)
        else:
            if self._bad_step is None:
                self._bad_step = torch.full((), -1, dtype=torch.int64, device=vec.device)
            new = bad & (self._bad_step < 0)
            self._bad_step.masked_fill_(new, step)
            old = self._bad_vals.get(keys)
            self._bad_vals[keys] = torch.where(new, vec, vec.new_zeros(()) if old is None else old)
        self._step = (keys, vec, skipped)
        return {**dict(zip(keys, vec.unbind())), "skipped": skipped}

    def check_finite(self):
        """Stop (UserError naming the first non-finite step and the last good checkpoint) if any step since
        the start of this run had a non-finite loss or gradient norm. One host read."""
        if not self._started or self._bad_step is None:
            return
        bad_step = int(self._bad_step)
        if bad_step < 0:
            return
        for keys, vals in self._bad_vals.items():
            reason = nonfinite_reason(dict(zip(keys, vals.tolist())))
            if reason is not None:
                stop_nonfinite(reason, bad_step, self.ckpt_path)
        stop_nonfinite("a loss or the gradient norm is not finite", bad_step, self.ckpt_path)

    def _agree_signal(self):
        """The largest signal number any rank has received, without a per-step blocking collective: each
        step starts an asynchronous all-reduce (MAX) of the local flag over gloo and reads the one started
        the step before, so all ranks agree on it, one step later. One process: the local flag."""
        if not dist.is_initialized():
            return self.signal.signum
        agreed = 0
        if self._pending_signal is not None:
            work, buf = self._pending_signal
            work.wait()
            agreed = int(buf[0])
        buf = torch.tensor([self.signal.signum], dtype=torch.int64)
        work = dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self._signal_group, async_op=True)
        self._pending_signal = (work, buf)
        return agreed

    def _interval_means(self):
        """Means over the non-skipped steps since the last metrics line (the last step's values if all were
        skipped): one host read per distinct set of loss parts."""
        sums, counts = {}, {}
        for keys, (total, n) in self._sums.items():
            for k, v in zip(keys, total.tolist()):
                sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + n
        if not sums and self._step is not None:
            keys, vec, _ = self._step
            return dict(zip(keys, vec.tolist()))
        return {k: sums[k] / counts[k] for k in sums}

    def end_step(self, step, metrics):
        """Record a finished step: a metrics line every --log-every steps; sets `stopping` (the signal number)
        when the run must save and stop.

        Before a metrics line, a sample grid, a checkpoint or a signal-stop save, checks that no step went
        non-finite (and stops the run if one did, writing nothing). `metrics` holds the step's plain values
        (level, phase: logged as of the metrics line's step) and those returned by `clip`."""
        a = self.args
        self.speed.add(a.global_batch)
        self.bar.update(1)
        if self._step is not None:
            keys, vec, skipped = self._step
            if skipped:
                self._interval_skipped += 1
            else:
                entry = self._sums.get(keys)
                self._sums[keys] = [vec.detach().clone(), 1] if entry is None else [entry[0] + vec, entry[1] + 1]
        self.stopping = self._agree_signal()
        log_due = self.due(step, a.log_every)
        if self.stopping or log_due or self.due(step, a.ckpt_every) or step % a.sample_every == 0:
            self.check_finite()
        if (self.stopping or self.due(step, a.ckpt_every)) and self.skipped == step - self.first_step:
            raise UserError(f"every step of this run ({self.first_step + 1}-{step}) had a non-finite loss or "
                            f"gradient norm and was skipped (--on-nonfinite skip): nothing was learned, so no "
                            f"checkpoint is written; last checkpoint: "
                            f"{self.ckpt_path if os.path.isfile(self.ckpt_path) else 'none written yet'}")
        if log_due:
            values = self._interval_means()
            rate = self.speed.rate()
            plain = {k: v for k, v in metrics.items() if not isinstance(v, torch.Tensor) and k != "skipped"}
            record = dict(step=step, img_per_s=rate, **plain, **values, skipped=self._interval_skipped)
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", img_s=f"{rate:.0f}")
            self.log.write(**record)
            self._sums, self._interval_skipped, self._step = {}, 0, None
        return self.stopping

    def record(self, step, metrics_fn):
        """Validation metrics at `step` into the metrics log: checked finite on every rank first (never a metric
        of a non-finite model), then metrics_fn() on rank 0 (None where a rank has nothing to record)."""
        self.check_finite()
        if metrics_fn is not None:
            self.log.write(step=step, **metrics_fn())

    def grid(self, path, step):
        """--log-to tensorboard: a sample / reconstruction grid just written, as an image there too."""
        self.log.grid(path, step)

    def close(self):
        if not self._started:
            return
        self._started = False
        if self._pending_signal is not None:
            self._pending_signal[0].wait()
            self._pending_signal = None
        self.log.close()
        self.bar.close()
        self.signal.restore()

    def finish(self, step, done):
        """The end of the loop: exit 128 + N after a signal-stop save, else the run's last line: `done` only
        when this run trained and wrote its final checkpoint."""
        self.close()
        if self.stopping:
            log0(f"stop signal: saved {self.ckpt_path} at step {step}", self.d)
            raise SignalStop(self.stopping, self.ckpt_path, step)
        if step == self.args.steps and step > self.first_step:
            log0(done, self.d)
        else:
            log0(f"nothing to train: at step {step} of --steps {self.args.steps}; "
                 f"{'no checkpoint written' if step == 0 else 'no new checkpoint written'}", self.d)
