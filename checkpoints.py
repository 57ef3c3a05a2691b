"""Checkpoints, and the run folder they live in. A checkpoint (save_checkpoint) is the sharded
model and AdamW state (torch.distributed.checkpoint, each rank its shards), each rank's data
position and RNGs, and checkpoint.json; checkpoint_problem says, cheaply and before anything
unpickles, whether a folder is one. Around it: one run per out_dir (claim), which checkpoint a
resume takes and the history rewound to it (resume), and the end of a run with a checkpoint on a
signal or a circuit breaker (checkpoint_or_stop). export.py turns one into an HF folder."""
import atexit
import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import socket

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_fs
import torch.distributed.checkpoint.metadata as dcp_md
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from runlog import print0


# ----------------------------------------------------------------------------- the run folder
def on_rank0(fn, *args, rank):
    """fn(*args) on rank 0, its SystemExit raised on every rank (the others would wait forever in
    their next collective); returns fn's result on rank 0, None elsewhere."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn(*args)
        except SystemExit as e:
            error = str(e)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise SystemExit(box[0])
    return result


def claim(out_dir, resume, rank, world_size):
    """out_dir for this run alone (claim_out_dir, released at exit), and the checkpoint that
    `resume` names ("" = a fresh start, refused where out_dir already holds checkpoints)."""
    lock = on_rank0(claim_out_dir, out_dir, rank=rank)
    if lock:
        atexit.register(lambda: os.path.exists(lock) and os.remove(lock))
    ckpt_root = os.path.join(out_dir, "checkpoints")
    resume_from = find_checkpoint(resume, ckpt_root, world_size) if resume else ""
    if not resume_from and checkpoint_steps(ckpt_root):
        how = ", none usable (above)" if resume else ": --resume=auto continues from the newest"
        raise SystemExit(f"{ckpt_root} holds checkpoints {checkpoint_steps(ckpt_root)}{how}; to "
                         "start over, use another --out_dir or delete them")
    return resume_from


def claim_out_dir(out_dir):
    """One run per out_dir: out_dir/run.lock holds the owner's pid and host; a second run stops
    here. A lock left by a run that died on this host (its pid is gone) is taken over."""
    lock, me = os.path.join(out_dir, "run.lock"), f"{os.getpid()} {socket.gethostname()}"
    while True:
        try:
            with open(lock, "x") as f:
                f.write(me)
            return lock
        except FileExistsError:
            pid, _, host = open(lock).read().partition(" ")
            if host != socket.gethostname() or not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
                raise SystemExit(f"{out_dir} is in use by the run with pid {pid} on {host} (lock "
                                 f"file {lock}; delete it if that run is over)")
            os.remove(lock)  # its owner is dead


def checkpoint_steps(ckpt_root):
    """The step numbers of the step_N folders in ckpt_root, oldest first."""
    names = os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else []
    return sorted(int(d[5:]) for d in names if re.fullmatch(r"step_\d+", d))


def find_checkpoint(resume, ckpt_root, world_size):
    """`resume` itself, or for "auto" the newest whole checkpoint in ckpt_root, naming each
    damaged one it skips ("" if none). A checkpoint of another world size is refused: each rank's
    data position and RNGs are its own."""
    candidates = [resume] if resume != "auto" else [
        os.path.join(ckpt_root, f"step_{n}") for n in reversed(checkpoint_steps(ckpt_root))]
    for path in candidates:
        if problem := checkpoint_problem(path):
            if resume != "auto":
                raise SystemExit(f"--resume={resume}: {problem}")
            print0(f"--resume=auto: skipping {path}: {problem}")
        elif problem := checkpoint_problem(path, world_size):
            raise SystemExit(f"--resume: {problem}; resume on that many ranks")
        else:
            return path
    return ""


def resume(path, policy, optimizer, pos, order_rng, *, lr, weight_decay, out_dir):
    """Load a checkpoint in place (this run's lr and weight_decay win over the saved ones, saying
    so), with the data position `pos`, the order's RNG and torch's; returns the saved state, or
    None for a fresh start. Either way out_dir's history is rewound to that step, and from here
    SIGTERM and Ctrl-C stop the run after its step, with a checkpoint (on_signal)."""
    state = None
    if path:
        state = load_checkpoint(path, policy, optimizer, rank=dist.get_rank())
    if state:
        print0(f"resumed from {path} (step {state['step']})")
        saved = {k: optimizer.param_groups[0][k] for k in ("lr", "weight_decay")}
        if saved != {"lr": lr, "weight_decay": weight_decay}:
            print0(f"the checkpoint's optimizer had {saved}; this run's --lr={lr} and "
                f"--weight_decay={weight_decay} apply")
        for group in optimizer.param_groups:
            group.update(lr=lr, weight_decay=weight_decay)
        pos.update(order=state["order"], cursor=state["cursor"], draws=state["draws"])
        order_rng.setstate(state["order_rng"])
        torch.set_rng_state(state["torch_rng"])
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    on_rank0(rewind_out_dir, out_dir, state["step"] if state else 0, rank=dist.get_rank())
    return state


def rewind_out_dir(out_dir, step):
    """Make out_dir's history end at `step`: metrics.jsonl keeps records up to it, and checkpoints
    after it (a rollback with --resume=<older step>) are deleted, saying so, or the newest-first
    pruning would keep them and drop the new ones."""
    ckpt_root = os.path.join(out_dir, "checkpoints")
    metrics = os.path.join(out_dir, "metrics.jsonl")
    for n in [n for n in checkpoint_steps(ckpt_root) if n > step]:
        print(f"rewinding to step {step}: deleting {ckpt_root}/step_{n}", flush=True)
        shutil.rmtree(os.path.join(ckpt_root, f"step_{n}"))
    if os.path.exists(metrics):
        # A line cut short by a kill mid-write ends with no newline: it is dropped too.
        kept = [line for line in open(metrics)
                if line.endswith("\n") and json.loads(line)["step"] <= step]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics + ".tmp", metrics)

# SIGTERM (a scheduler's notice before preemption) and Ctrl-C end the run after the current step,
# with a checkpoint; a second signal ends it at once. The names of the signals caught:
CAUGHT = []


def on_signal(signum, frame):
    CAUGHT.append(signal.Signals(signum).name)
    signal.signal(signum, signal.SIG_DFL)


def checkpoint_or_stop(out_dir, step, policy, optimizer, state, *, save_freq, save_limit,
                       reason=""):
    """The step's checkpoint (every save_freq steps, the newest save_limit kept), and the end of
    the run, with a checkpoint, on a signal or a circuit breaker's `reason`. Every rank decides
    alike (a signal may reach one). A checkpoint resumes exactly: weights, AdamW state, `state`
    (data position, RNGs)."""
    stop = torch.tensor(float(bool(CAUGHT or reason)), dtype=torch.float64)
    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    ckpt_root = os.path.join(out_dir, "checkpoints")
    if stop or save_freq and step % save_freq == 0:
        save_checkpoint(os.path.join(ckpt_root, f"step_{step}"), policy, optimizer,
                                 {"step": step, **state, "torch_rng": torch.get_rng_state()},
                                 rank=dist.get_rank())
        if dist.get_rank() == 0 and save_limit > 0:
            for old in checkpoint_steps(ckpt_root)[:-save_limit]:
                shutil.rmtree(os.path.join(ckpt_root, f"step_{old}"))
    if stop:
        why = reason or " and ".join(CAUGHT) or "a signal on another rank"
        raise SystemExit(f"stopped after step {step}: {why}; checkpoint {ckpt_root}/step_{step} "
                         "(--resume=auto continues from it)")


# ----------------------------------------------------------------------------- a checkpoint
def _fsync(path):
    fd = os.open(path, os.O_RDONLY)  # a file, or a folder: its entries (new files, renames) too
    os.fsync(fd)
    os.close(fd)


def save_checkpoint(path, model, optimizer, extra, *, rank):
    """Sharded model + optimizer (torch.distributed.checkpoint: each rank writes its own shards),
    this rank's `extra` (step, data position, RNG states, as plain data and tensors) and
    checkpoint.json (world size, file sizes). Written to `path.tmp`, fsynced and renamed when every
    rank is done, so a crash mid-save never leaves a folder that looks complete. An existing `path`
    (a rerun, a resume from an older step) is replaced."""
    tmp = path + ".tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)  # the remains of a save that crashed
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)  # fsyncs its files
    torch.save(extra, os.path.join(tmp, f"extra_rank{rank}.pt"))
    _fsync(os.path.join(tmp, f"extra_rank{rank}.pt"))
    if rank == 0 and getattr(model, "lora", None):  # export.py rebuilds the adapters from it
        with open(os.path.join(tmp, "lora.json"), "w") as f:
            json.dump(model.lora, f)
        _fsync(os.path.join(tmp, "lora.json"))
    dist.barrier()
    if rank == 0:
        files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, "checkpoint.json"), "w") as f:
            json.dump({"world_size": dist.get_world_size(), "files": files}, f)
        _fsync(os.path.join(tmp, "checkpoint.json"))
        _fsync(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
        _fsync(os.path.dirname(os.path.abspath(path)))
    dist.barrier()


def checkpoint_problem(path, world_size=None):
    """What keeps `path` from being a whole save_checkpoint folder (of `world_size` ranks if
    given), naming the folder and file; None if nothing. Cheap, no shard is read: every file must
    have its size in checkpoint.json; DCP's .metadata, which DCP reads with a plain pickle.load,
    may name only the classes DCP writes there, so a crafted one runs nothing; each rank's extra
    state (a few KB) must load with weights_only. Another world size is refused: each rank's
    extra state (data position, RNGs) is its own."""
    here = dcp_md.__name__  # the dataclasses and enums DCP defines for its metadata
    safe = {(here, k) for k, v in vars(dcp_md).items() if getattr(v, "__module__", 0) == here}
    safe |= {(dcp_fs.__name__, "_StorageInfo"), ("torch.serialization", "_get_layout")}
    dtypes = {k for k, v in vars(torch).items() if isinstance(v, torch.dtype)}
    safe |= {("torch", k) for k in dtypes | {"Size"}}
    safe |= {(c.__module__, c.__name__) for c in (pathlib.PosixPath, pathlib.WindowsPath)}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in safe:
                raise pickle.UnpicklingError(f"{module}.{name} may not be in checkpoint metadata")
            return super().find_class(module, name)

    if not os.path.isdir(path):
        return f"checkpoint {path}: no such folder"
    name = "checkpoint.json"
    try:
        with open(os.path.join(path, name)) as f:
            saved = json.load(f)
        ranks = saved["world_size"]
        for name, size in saved["files"].items():
            if (got := os.path.getsize(os.path.join(path, name))) != size:
                return f"checkpoint {path}: {name} has {got} bytes, {size} when saved"
        name = ".metadata"
        with open(os.path.join(path, name), "rb") as f:
            Unpickler(f).load()
        for name in [n for n in saved["files"] if n.startswith("extra_rank")]:  # a few KB each
            torch.load(os.path.join(path, name), weights_only=True)
    except Exception as e:  # a missing file, bad JSON, a refused pickle: the folder is unusable
        why = e
        if isinstance(e, FileNotFoundError):
            why = "missing" + (" (written before checkpoints listed their files, or not a "
                               "checkpoint): nothing vouches that it is whole, so it is not "
                               "loaded; resume from a newer one or start afresh"
                               if name == "checkpoint.json" else "")
        elif isinstance(e, pickle.UnpicklingError) and name.startswith("extra_rank"):
            why = "holds objects other than tensors and plain data (their pickle could run code)"
        return f"checkpoint {path}: {name}: {why}"
    if world_size not in (None, ranks):
        return f"checkpoint {path} was saved by {ranks} ranks, not {world_size}"
    return None


def load_checkpoint(path, model, optimizer, *, rank):
    """Restore what save_checkpoint wrote, in place; returns this rank's `extra`. A
    checkpoint_problem is a ValueError, before anything loads. No pickle runs code."""
    class WeightsOnlyPlanner(dcp.DefaultLoadPlanner):
        # DCP unpickles non-tensor entries (lr, betas) with weights_only=False: check them first
        def load_bytes(self, read_item, value):
            torch.load(value, weights_only=True)
            value.seek(0)
            super().load_bytes(read_item, value)

    if problem := checkpoint_problem(path, dist.get_world_size()):
        raise ValueError(problem)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path, planner=WeightsOnlyPlanner())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return torch.load(os.path.join(path, f"extra_rank{rank}.pt"), weights_only=True)
