"""FSDP2 for real: 2 gloo ranks, each holding half the batch and half of every parameter, must take
the same optimizer step as 1 rank holding everything."""
import os
import socket
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(nproc, model_dir, data_dir, out, mixed="plain"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           os.path.join(ROOT, "tests", "fsdp_worker.py"), model_dir, data_dir, out, mixed]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out)


def test_two_ranks_take_the_same_step_as_one(tiny_dir, tmp_path):
    model_dir, data_dir = tiny_dir
    one = run_worker(1, model_dir, data_dir, str(tmp_path / "one.pt"))
    two = run_worker(2, model_dir, data_dir, str(tmp_path / "two.pt"))
    for key in ("loss/policy", "loss/kl", "grad_norm"):
        assert abs(one["stats"][key] - two["stats"][key]) < 1e-5, (key, one["stats"][key], two["stats"][key])
    assert one["stats"]["grad_norm"] > 0 and one["stats"]["clip_frac"] > 0  # a real step with clipping in it
    from transformers import AutoModelForImageTextToText

    before = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()
    moved = 0
    for name, w in one["state"].items():
        assert torch.allclose(w, two["state"][name], atol=1e-5, rtol=0), name
        moved += int(not torch.allclose(w, before[name]))
    assert moved == len(before)  # every parameter was updated, so the comparison covers them all


def test_rank_without_images_neither_hangs_nor_changes_the_step(tiny_dir, tmp_path):
    """Rank 0 holds only image rows, rank 1 only text rows: rank 1 runs the vision tower on a dummy
    image times 0 (else its FSDP collectives would not match rank 0's and the step would hang)."""
    model_dir, data_dir = tiny_dir
    one = run_worker(1, model_dir, data_dir, str(tmp_path / "one.pt"), "mixed")
    two = run_worker(2, model_dir, data_dir, str(tmp_path / "two.pt"), "mixed")
    for key in ("loss/policy", "loss/kl", "grad_norm"):
        assert abs(one["stats"][key] - two["stats"][key]) < 1e-5, key
    for name, w in one["state"].items():
        assert torch.allclose(w, two["state"][name], atol=1e-5, rtol=0), name
