"""checkpoints.save_checkpoint / load_checkpoint / checkpoint_problem in one gloo process, on a small
nn.Sequential and AdamW (DCP treats a plain module as FSDP's one-rank case): a round trip restores
the state, a rerun replaces a step, files are fsynced before the rename, and a damaged, crafted or
foreign checkpoint is refused with the folder and file named, before anything is loaded."""
import json
import os
import pickle
import random
import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

import checkpoints


@pytest.fixture(scope="module", autouse=True)
def group():
    if dist.is_initialized():  # another test module's group serves as well
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def trained(seed=0):
    """A model and AdamW after one step (so the optimizer has state), deterministic for a seed."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    return net, opt


EXTRA = {"step": 4, "order": [3, 0, 2, 1], "cursor": 2, "order_rng": random.Random(1).getstate(),
         "torch_rng": torch.get_rng_state(), "mpo": {"delta": 0.25, "batches": 3}}


def save(path, extra=EXTRA, seed=0):
    net, opt = trained(seed)
    checkpoints.save_checkpoint(str(path), net, opt, extra, rank=0)
    return net, opt


def test_round_trip_restores_model_optimizer_and_extra_under_weights_only(tmp_path):
    net, opt = save(tmp_path / "step_4")
    other, other_opt = trained(seed=1)
    extra = checkpoints.load_checkpoint(str(tmp_path / "step_4"), other, other_opt, rank=0)
    for a, b in zip(net.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), other_opt.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert extra.keys() == EXTRA.keys() and torch.equal(extra.pop("torch_rng"), EXTRA["torch_rng"])
    assert extra == {k: v for k, v in EXTRA.items() if k != "torch_rng"}  # random's state tuple too
    raw = torch.load(tmp_path / "step_4" / "extra_rank0.pt", weights_only=True)  # no pickle needed
    assert raw["order_rng"] == EXTRA["order_rng"]
    assert torch.equal(raw["torch_rng"], EXTRA["torch_rng"])
    assert sorted(os.listdir(tmp_path)) == ["step_4"]
    saved = json.loads((tmp_path / "step_4" / "checkpoint.json").read_text())
    assert saved["world_size"] == 1
    assert set(saved["files"]) == {".metadata", "__0_0.distcp", "extra_rank0.pt"}


def test_saving_onto_an_existing_step_replaces_it(tmp_path):
    save(tmp_path / "step_2", {"step": 2, "run": "first"})
    (tmp_path / "step_2.tmp").mkdir()  # and the remains of a crashed save
    net, _ = save(tmp_path / "step_2", {"step": 2, "run": "second"}, seed=3)
    assert sorted(os.listdir(tmp_path)) == ["step_2"]
    other, other_opt = trained(seed=1)
    extra = checkpoints.load_checkpoint(str(tmp_path / "step_2"), other, other_opt, rank=0)
    assert extra["run"] == "second"
    assert torch.equal(other[0].weight, net[0].weight)


def test_every_file_and_the_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events, fsync, rename = [], os.fsync, os.rename

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        rename(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "rename", record_rename)
    save(tmp_path / "step_1")
    tmp = str(tmp_path / "step_1.tmp")
    moved = events.index(("rename", tmp, str(tmp_path / "step_1")))
    synced = set()
    for kind, *paths in events[:moved]:  # DCP writes .metadata.tmp, fsyncs it, renames it .metadata
        synced |= {paths[0]} if kind == "fsync" else {paths[1]} if paths[0] in synced else set()
    files = {os.path.join(tmp, name) for name in os.listdir(tmp_path / "step_1")}
    assert files | {tmp} <= synced, sorted((files | {tmp}) - synced)
    assert ("fsync", str(tmp_path)) in events[moved:]  # the rename itself, in the parent folder


def test_checkpoint_problem_names_the_folder_and_the_damaged_file(tmp_path):
    path = tmp_path / "step_6"
    save(path)
    assert checkpoints.checkpoint_problem(str(path)) is None
    assert checkpoints.checkpoint_problem(str(path), world_size=1) is None
    assert checkpoints.checkpoint_problem(str(path), world_size=2) == \
        f"checkpoint {path} was saved by 1 ranks, not 2"
    assert checkpoints.checkpoint_problem(str(tmp_path / "step_9")) == \
        f"checkpoint {tmp_path / 'step_9'}: no such folder"
    (tmp_path / "old").mkdir()  # as written before checkpoint.json: refused, saying why
    assert checkpoints.checkpoint_problem(str(tmp_path / "old")).startswith(
        f"checkpoint {tmp_path / 'old'}: checkpoint.json: missing (written before checkpoints "
        "listed their files")
    shard = path / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    assert checkpoints.checkpoint_problem(str(path)) == \
        f"checkpoint {path}: __0_0.distcp has {size // 2} bytes, {size} when saved"
    (path / "extra_rank0.pt").unlink()
    other, other_opt = trained(seed=1)
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(ValueError, match=f"checkpoint {path}: __0_0.distcp has"):  # the first listed
        checkpoints.load_checkpoint(str(path), other, other_opt, rank=0)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))  # nothing was loaded
    with open(shard, "r+b") as f:
        f.truncate(0)
    sizes = {"__0_0.distcp": 0, "extra_rank0.pt": 9}
    (path / "checkpoint.json").write_text(json.dumps({"world_size": 1, "files": sizes}))
    assert checkpoints.checkpoint_problem(str(path)) == f"checkpoint {path}: extra_rank0.pt: missing"
    (path / "checkpoint.json").write_text("{")
    problem = checkpoints.checkpoint_problem(str(path))
    assert problem.startswith(f"checkpoint {path}: checkpoint.json: Expecting")


class Touch:
    """Unpickling this creates `marker`: the proof that a pickle ran code."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def fix_sizes(path):
    saved = json.loads((path / "checkpoint.json").read_text())
    saved["files"] = {name: (path / name).stat().st_size for name in saved["files"]}
    (path / "checkpoint.json").write_text(json.dumps(saved))


def test_resume_runs_no_pickle_from_extra_metadata_or_optimizer_entries(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "extra"  # a crafted extra_rank0.pt
    save(path, {"step": 1, "payload": Touch(str(marker))})
    assert checkpoints.checkpoint_problem(str(path)) == f"checkpoint {path}: extra_rank0.pt: " \
        "holds objects other than tensors and plain data (their pickle could run code)"
    with pytest.raises(ValueError, match="extra_rank0.pt: holds objects other than tensors"):
        checkpoints.load_checkpoint(str(path), *trained(seed=1), rank=0)
    path = tmp_path / "metadata"  # a crafted .metadata, with checkpoint.json made to match
    save(path)
    (path / ".metadata").write_bytes(pickle.dumps(Touch(str(marker))))
    fix_sizes(path)
    assert checkpoints.checkpoint_problem(str(path)) == \
        f"checkpoint {path}: .metadata: io.open may not be in checkpoint metadata"
    path = tmp_path / "optim"  # an optimizer entry that DCP stores as a pickle
    net, opt = trained()
    opt.param_groups[0]["payload"] = Touch(str(marker))
    checkpoints.save_checkpoint(str(path), net, opt, {}, rank=0)
    other, other_opt = trained(seed=1)
    other_opt.param_groups[0]["payload"] = None  # so that DCP loads that entry
    with pytest.raises(CheckpointException, match="Unsupported global: GLOBAL io.open"):
        checkpoints.load_checkpoint(str(path), other, other_opt, rank=0)
    assert not marker.exists()
