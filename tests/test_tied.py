"""Tied embeddings, Qwen2.5-VL-3B's layout (lm_head holds embed_tokens' Parameter; the tiny default
and the 7B are untied): loading, 2-rank FSDP2, weight sync into vLLM, the transformers sampler,
checkpoint resume and export. One 2-rank torchrun (tests/tied_worker.py) serves the FSDP tests."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import data
import fsdp_worker
import model as modeling
import rollout
import tiny
import train
from export import export_checkpoint
from test_rollout import max_logp_diff, perturb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBED = "model.language_model.embed_tokens.weight"


def is_tied(model):
    return model.lm_head.weight is model.model.language_model.embed_tokens.weight


@pytest.fixture(scope="module")
def tied_dir(tiny_dir, tmp_path_factory):
    """(model_dir, data_dir): conftest's tiny model with tie_word_embeddings=True, its data."""
    fmt = data.MATH_FORMAT_PROMPT.replace("{{ content | trim }}", "")
    texts = [q + fmt for q in tiny.QUESTIONS] + [tiny.synthetic_response(k) for k in range(10)]
    out = str(tmp_path_factory.mktemp("tied") / "model")
    return tiny.build_tiny_model(out, texts * 20, seed=0, tie_word_embeddings=True), tiny_dir[1]


@pytest.fixture(scope="module")
def worker(tied_dir, tmp_path_factory):
    """(out_path, results) of one 2-rank run of tied_worker.py."""
    out = str(tmp_path_factory.mktemp("tied_worker") / "tied.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(port), os.path.join(ROOT, "tests", "tied_worker.py"), *tied_dir, out]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return out, torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def engine(tied_dir):
    # One engine per test module: it seeds global RNGs and pins threads for the whole process.
    return rollout.make_engine(tied_dir[0], world_size=1, kv_cache_bytes=64 << 20,
                               max_model_len=512)


def test_tied_model_is_written_and_loaded_with_one_shared_weight(tied_dir, tiny_dir):
    from safetensors.torch import load_file

    names = load_file(os.path.join(tied_dir[0], "model.safetensors")).keys()
    assert not any("lm_head" in n for n in names)  # as in the 3B's checkpoint
    tied, untied = modeling.load_model(tied_dir[0]), modeling.load_model(tiny_dir[0])
    assert is_tied(tied) and not is_tied(untied)
    assert len(list(tied.parameters())) == len(list(untied.parameters())) - 1


def test_vllm_samples_from_the_synced_head_of_a_tied_model(tied_dir, engine):
    """vLLM's lm_head is a module of its own sharing the embedding's weight; on CPU it computes
    logits from a packed copy. Sync must refresh it: from a plain model, over two rounds of changed
    weights, and from an FSDP2 (activation-checkpointed) model, whose parameters name it once."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tied_dir[0])
    rows = data.load_rows(f"{tied_dir[1]}@train")
    prompts = [data.build_prompt(row, 0, processor, min_pixels=56 * 56, max_pixels=112 * 112)
               for row in ({"problem": "What is 2 + 3?", "answer": "5"}, rows[0])]
    policy = modeling.load_model(tied_dir[0])
    for k in range(2):
        perturb(policy, seed=k)  # perturb() walks parameters(): the shared weight moves once
        assert is_tied(policy)
        assert min(max_logp_diff(processor, policy, engine, prompts, 1.0)) > 1e-2, k
        rollout.sync_weights(engine, policy)
        assert max(max_logp_diff(processor, policy, engine, prompts, 1.0)) < 1e-4, k
    wrapped = modeling.load_model(tied_dir[0])
    perturb(wrapped, seed=2)
    layers = wrapped.model.language_model.layers
    layers[0] = checkpoint_wrapper(layers[0])
    wrapped = modeling.apply_fsdp(wrapped, init_device_mesh("cpu", (1,)))  # vLLM's world of one
    names = [n for n, _ in rollout.full_weights(wrapped)]
    assert is_tied(wrapped) and EMBED in names and "lm_head.weight" not in names
    assert min(max_logp_diff(processor, wrapped, engine, prompts, 1.0)) > 1e-2
    rollout.sync_weights(engine, wrapped)
    assert max(max_logp_diff(processor, wrapped, engine, prompts, 1.0)) < 1e-4


def test_meta_init_loads_the_tied_model_exactly(tied_dir, worker):
    """load_fsdp_model (meta build, rank 0 broadcasts both names of the shared weight) keeps one
    tensor for embed_tokens and lm_head on every rank: sharded, then gathered by the root unit's
    forward, with exactly the plain model's weights and log-probs."""
    load = worker[1]["load"]
    before = modeling.load_model(tied_dir[0]).state_dict()
    assert load["state"].keys() == before.keys() and "lm_head.weight" in before
    assert all(torch.equal(load["state"][k], before[k]) for k in before)
    assert load["plain_tie"] == (True, False)
    assert len(load["ranks"]) == 2
    for rank in load["ranks"]:
        assert rank["sharded"] == (True, True) and rank["gathered"] == (True, False)
        assert rank["stepped"] == (True, True)
        assert torch.equal(rank["logp"], load["plain_logp"])


def test_two_fsdp_ranks_take_the_plain_models_step_on_a_tied_model(tied_dir, worker, engine):
    """The 2-rank FSDP2 step (fsdp_worker.step, shared-prompt forwards) against a plain, unwrapped
    model taking the same step on all 8 rows with full-row forwards in this process (vLLM's world of
    one): the shared weight's gradient sums its use as embedding and as head."""
    import torch.distributed as dist
    from transformers import AutoProcessor

    assert dist.is_initialized() and dist.get_world_size() == 1  # train.optimizer_step all-reduces
    processor = AutoProcessor.from_pretrained(tied_dir[0])
    samples, g = fsdp_worker.make_samples(processor, tied_dir[1], False)
    plain = modeling.load_model(tied_dir[0])
    with torch.no_grad():  # old/ref log-probs drawn as tied_worker draws them
        for s in samples:
            lp = modeling.token_logprobs(plain, data.collate([s], 0))[0]
            s["old_logp"] = lp + 0.3 * torch.randn(lp.shape, generator=g)
            s["ref_logp"] = lp + 0.2 * torch.randn(lp.shape, generator=g)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.01)
    grads = {}
    optimizer.register_step_pre_hook(lambda *_: grads.update(  # after clipping, as fsdp_worker's
        {n: p.grad.clone() for n, p in plain.named_parameters() if p.grad is not None}))
    cfg = train.Config(micro_batch_size=2, max_response_length=12, clip_eps_low=0.2,
                       clip_eps_high=0.3, share_prompts=False)
    stats, _ = train.optimizer_step(plain, optimizer, samples, torch.tensor([s["adv"] for s in samples]),
                                    cfg, on_policy=False, use_kl=True, device=torch.device("cpu"),
                                    pad_id=0, banned_ids=[])
    two = worker[1]["step"]
    for key in ("loss/policy", "loss/kl", "grad_norm"):
        assert abs(stats[key] - two["stats"][key]) < 1e-5, (key, stats[key], two["stats"][key])
    assert stats["grad_norm"] > 0 and stats["clip_frac"] > 0
    assert grads.keys() == two["grads"].keys() and EMBED in grads  # the shared weight once
    for name, grad in grads.items():
        assert torch.allclose(grad, two["grads"][name], atol=1e-7, rtol=0), name
    before = modeling.load_model(tied_dir[0]).state_dict()
    for name, w in plain.state_dict().items():  # lm_head.weight included, moved as the embedding
        assert torch.allclose(w, two["state"][name], atol=1e-4, rtol=0), name
        assert not torch.equal(w, before[name]), name
    assert torch.equal(two["state"]["lm_head.weight"], two["state"][EMBED])


def test_hf_sampler_on_fsdp_ranks_of_a_tied_model_matches_the_trainer(worker):
    assert max(worker[1]["hf"]) < 1e-4


def test_tied_checkpoint_resumes_exactly(worker):
    """A fresh load_fsdp_model + AdamW restored from the checkpoint written after the first step
    takes the second step bit for bit as the model that kept going, and keeps the tie."""
    res = worker[1]
    second, resumed = res["second"], res["resumed"]
    assert resumed["tie"] == (True, True)
    assert resumed["stats"] == second["stats"] and second["stats"]["grad_norm"] > 0
    for name, w in second["state"].items():
        assert torch.equal(resumed["state"][name], w), name
        assert not torch.equal(w, res["step"]["state"][name]), name  # the second step moved it


def test_tied_exports_reload_tied_with_the_trained_log_probs(tied_dir, worker, tmp_path):
    """save_hf's folder (2 ranks) and export_checkpoint's (one process, from the 2-rank
    checkpoint) load in transformers tied, with the trained weights and exactly the trained FSDP
    model's log-probs."""
    out_path, res = worker
    exported = export_checkpoint(out_path + ".ckpt", tied_dir[0], str(tmp_path / "hf"))
    trained = res["step"]["state"]
    for folder in (exported, out_path + ".hf"):
        model = modeling.load_model(folder)
        assert is_tied(model), folder
        assert model.state_dict().keys() == trained.keys()
        assert all(torch.equal(w, trained[k]) for k, w in model.state_dict().items()), folder
        with torch.no_grad():
            logp = modeling.token_logprobs(model, res["batch"])
        assert torch.equal(logp, res["trained_logp"]), folder
