"""FSDP2 for real: 2 gloo ranks, each holding half the batch and half of every parameter, must take
the same optimizer step as 1 rank holding everything; the memory options must not change that step,
frozen parts must not move, and a 2-rank checkpoint must export to the model that was trained."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import model as modeling
from export import export_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(nproc, model_dir, data_dir, out, mixed="plain"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           os.path.join(ROOT, "tests", "fsdp_worker.py"), model_dir, data_dir, out, mixed]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def variants(tiny_dir, tmp_path_factory):
    """(out_path, results) of one 2-rank run of fsdp_worker.py's VARIANTS, one step each (a torchrun
    costs 10-20 s here, so one run serves the tests below)."""
    out = str(tmp_path_factory.mktemp("variants") / "variants.pt")
    return out, run_worker(2, *tiny_dir, out, "variants")


def initial_state(model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()


def test_two_ranks_take_the_same_step_as_one(tiny_dir, tmp_path, variants):
    """...and the shared-prompt forwards (2 ranks) the same step as the full rows (1 rank)."""
    model_dir, data_dir = tiny_dir
    one = run_worker(1, model_dir, data_dir, str(tmp_path / "one.pt"), "unshared")
    two = variants[1]["base"]  # the same step on 2 ranks, each group's prompt run once
    for key in ("loss/policy", "loss/kl", "grad_norm"):
        assert abs(one["stats"][key] - two["stats"][key]) < 1e-5, (key, one["stats"][key], two["stats"][key])
    assert one["stats"]["grad_norm"] > 0 and one["stats"]["clip_frac"] > 0  # a real step with clipping in it
    before = initial_state(model_dir)
    moved = 0
    for name, w in one["state"].items():
        assert torch.allclose(one["grads"][name], two["grads"][name], atol=1e-7, rtol=0), name
        # Adam's first step is about lr * sign(grad): an element whose gradient is ~0 moves by up to
        # lr = 1e-3 either way on rounding alone (a few of 660k here), so the weights get a looser bound.
        assert torch.allclose(w, two["state"][name], atol=1e-4, rtol=0), name
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


def test_meta_init_loads_exactly_the_pretrained_model(tiny_dir, variants):
    """load_fsdp_model (meta device on every rank, weights read by rank 0 and broadcast) equals a
    plain from_pretrained: every parameter, the rotary buffers no state dict holds, the log-probs."""
    load = variants[1]["load"]
    before = initial_state(tiny_dir[0])
    assert load["state"].keys() == before.keys()
    assert all(torch.equal(load["state"][k], before[k]) for k in before)
    rotary = {"model.language_model.rotary_emb.inv_freq", "model.visual.rotary_pos_emb.inv_freq"}
    assert rotary <= load["plain_buffers"].keys()
    assert len(load["ranks"]) == 2
    for rank in load["ranks"]:
        assert rank["buffers"].keys() == load["plain_buffers"].keys()
        assert all(torch.equal(b, load["plain_buffers"][k]) for k, b in rank["buffers"].items())
        assert torch.equal(rank["logp"], rank["plain_logp"])  # both computed in that rank's process


def test_memory_options_take_the_same_step(variants):
    """Activation checkpointing, no reshard after forward and CPU offload change where tensors live
    and when they are computed, not the step: the same losses, gradients and updated weights, under
    the same (unwrapped) names. On a CPU-only machine offload moves nothing: this runs the policy's
    code path (optimizer step on the offloaded shards), not host-device copies."""
    res = variants[1]
    base = res["base"]
    in_blocks = [k for k in base["state"] if k.startswith(("model.visual.blocks.", "model.language_model.layers."))]
    assert sum("._checkpoint_wrapped_module." in n for n in res["checkpointing"]["names"]) == len(in_blocks) > 0
    for name in ("checkpointing", "no_reshard", "cpu_offload"):
        run = res[name]
        for key in ("loss/policy", "loss/kl", "grad_norm"):
            assert abs(run["stats"][key] - base["stats"][key]) < 1e-6, (name, key)
        assert run["state"].keys() == run["grads"].keys() == base["state"].keys()
        for k, w in base["state"].items():
            assert torch.allclose(run["grads"][k], base["grads"][k], atol=1e-6, rtol=0), (name, k)
            assert torch.allclose(run["state"][k], w, atol=1e-6, rtol=0), (name, k)


def test_frozen_parts_stay_bit_identical_while_the_rest_trains(tiny_dir, variants):
    """freeze_vision (patch embed + blocks), and freeze_merger with freeze_llm (gradients then reach
    the vision tower through frozen units): frozen weights get no gradient and do not move; every
    other weight moves."""
    before = initial_state(tiny_dir[0])

    def vision(k):
        return k.startswith("model.visual.") and not k.startswith("model.visual.merger.")

    for name, frozen in (("freeze_vision", vision), ("freeze_merger_llm", lambda k: not vision(k))):
        run = variants[1][name]
        assert run["grads"].keys() == {k for k in before if not frozen(k)}, name
        for k, w in run["state"].items():
            assert torch.equal(w, before[k]) == frozen(k), (name, k)


def test_bf16_master_weights_train_but_lose_small_updates(tiny_dir, variants):
    """master_dtype=bf16: weights and AdamW moments in bf16, a step close to fp32's, but a 1e-3
    update of a weight equal to 1 (the norms) is under half of bf16's spacing there (2^-8 below 1,
    2^-7 above) and is lost, while the fp32 master moves it: the risk load_fsdp_model describes."""
    base, bf16 = variants[1]["base"], variants[1]["bf16_master"]
    assert bf16["optim_dtypes"] == {torch.bfloat16}
    assert all(w.dtype == torch.bfloat16 for w in bf16["state"].values())
    assert abs(bf16["stats"]["loss/policy"] - base["stats"]["loss/policy"]) < 1e-3
    before = initial_state(tiny_dir[0])
    ones = {k for k, w in before.items() if torch.all(w == 1)}
    assert len(ones) == 10  # 2 norms per vision block and decoder layer, the merger's and the final norm
    for k, w in bf16["state"].items():
        assert torch.equal(w.float(), before[k]) == (k in ones), k
        assert not torch.equal(base["state"][k], before[k]), k


def test_exported_checkpoint_gives_the_trained_log_probs(tiny_dir, variants, tmp_path):
    """A checkpoint written by 2 ranks after one step (activation-checkpointed, so the wrapped names
    must not leak into it), exported by `python export.py` in one process, loads in
    transformers with exactly the trained weights and save_hf's folder's log-probs; save_hf's folder
    gives exactly the trained FSDP model's log-probs in the worker; and a bf16 export holds the same
    weights rounded."""
    out_path, res = variants
    model_dir, _ = tiny_dir
    trained = res["checkpointing"]
    cmd = [sys.executable, os.path.join(ROOT, "export.py"), out_path + ".ckpt", f"--model_path={model_dir}",
           f"--out={tmp_path / 'hf'}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(str(tmp_path / "hf")).tokenizer.eos_token == "<|im_end|>"
    logp = {}
    for folder in (str(tmp_path / "hf"), out_path + ".hf"):
        exported = modeling.load_model(folder)
        assert exported.state_dict().keys() == trained["state"].keys()
        assert all(torch.equal(w, trained["state"][k]) for k, w in exported.state_dict().items())
        with torch.no_grad():
            logp[folder] = modeling.token_logprobs(exported, res["batch"])
    # Same bits only where both sides ran in one process: the worker (save_hf's folder read back
    # there), and this one (the two folders).
    assert torch.equal(trained["hf_logp"], trained["logp"])
    assert torch.equal(logp[str(tmp_path / "hf")], logp[out_path + ".hf"])
    # Across processes, float32 round-off alone: the worker ran with 1 thread, this process with
    # the machine's count, and CPU kernels may sum in another order for another thread count.
    assert torch.allclose(logp[out_path + ".hf"], trained["logp"], atol=1e-5, rtol=0)
    bf16 = export_checkpoint(out_path + ".ckpt", model_dir, str(tmp_path / "bf16"), dtype=torch.bfloat16)
    state = modeling.load_model(bf16, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(w, trained["state"][k].to(torch.bfloat16)) for k, w in state.items())


def test_on_policy_step_takes_its_old_log_probs_from_its_own_forward(variants):
    """optimizer_step(on_policy=True) (the first update of a rollout: train.main skips its no-grad
    forward) takes the step's own log-probs, detached, as old_logp: the same step, bit for bit, as
    old log-probs from a separate forward, and it returns those log-probs (and the entropies)."""
    ref, fresh = variants[1]["on_policy_ref"], variants[1]["on_policy"]
    assert ref["stats"] == fresh["stats"] and fresh["stats"]["clip_frac"] == 0  # ratio 1: nothing clipped
    for k, w in ref["state"].items():
        assert torch.equal(fresh["grads"][k], ref["grads"][k]) and torch.equal(fresh["state"][k], w), k
    for theirs, ours in zip(ref["old_logp"], fresh["old_logp"]):
        assert len(ours) == 4 and all(e is None for _, e in theirs)
        for (expected, _), (got, entropy) in zip(theirs, ours):
            assert torch.equal(got, expected) and entropy.shape == got.shape and torch.all(entropy >= 0)
