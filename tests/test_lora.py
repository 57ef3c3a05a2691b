"""LoRA (lora.apply_lora): the adapted model starts as the base, trains only its adapters, and
merges back into a plain Qwen2.5-VL with the same log-probs, in one process and from 2 FSDP ranks;
the adapter file is PEFT's layout and holds the same adapters."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import data
import model as modeling
from export import export_checkpoint
from lora import apply_lora, hf_state_dict
from test_fsdp import initial_state, run_worker
from test_model import make_batch

LORA = dict(rank=4, alpha=8)  # as tests/fsdp_worker.py's
SCALE = LORA["alpha"] / LORA["rank"]
N_ADAPTED = 2 * 7  # 2 decoder layers x (q, k, v, o, gate, up, down)


def image_batch(tiny_dir):
    processor, samples = make_batch(tiny_dir)
    return processor, data.collate(samples, processor.tokenizer.pad_token_id)


def adapted(model_dir):
    return apply_lora(modeling.load_model(model_dir), **LORA)


def plain_from(model_dir, state):
    """A plain Qwen2.5-VL holding `state` (HF names, every parameter)."""
    model = modeling.load_model(model_dir)
    assert state.keys() == model.state_dict().keys()
    model.load_state_dict(state)
    return model


def test_adapters_wrap_only_the_language_model_and_start_at_the_base(tiny_dir):
    _, batch = image_batch(tiny_dir)
    base, lora = modeling.load_model(tiny_dir[0]), adapted(tiny_dir[0])
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * N_ADAPTED
    assert all(n.startswith("model.language_model.layers.") and n.endswith((".lora_A", ".lora_B")) for n in trainable)
    q = lora.model.language_model.layers[0].self_attn.q_proj
    assert q.lora_A.shape == (4, 128) and q.lora_B.shape == (128, 4) and not q.base.weight.requires_grad
    bound = 1 / 128 ** 0.5  # PEFT's kaiming-uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
    assert 0.8 * bound < q.lora_A.abs().max() <= bound and torch.all(q.lora_B == 0)
    assert torch.equal(q.lora_A, adapted(tiny_dir[0]).model.language_model.layers[0].self_attn.q_proj.lora_A)
    with torch.no_grad():
        assert torch.equal(modeling.token_logprobs(lora, batch), modeling.token_logprobs(base, batch))


def test_merged_plain_model_gives_the_adapted_log_probs(tiny_dir):
    _, batch = image_batch(tiny_dir)
    lora = adapted(tiny_dir[0])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        merged = plain_from(tiny_dir[0], hf_state_dict(lora, lora.state_dict()))
        logp = modeling.token_logprobs(lora, batch)
        base_logp = modeling.token_logprobs(modeling.load_model(tiny_dir[0]), batch)
        assert (logp - base_logp).abs().max() > 0.1  # the adapters matter
        assert torch.allclose(modeling.token_logprobs(merged, batch), logp, atol=1e-5, rtol=0)


def test_optimizer_moves_only_the_adapters(tiny_dir):
    """Two AdamW steps on the trainable parameters (the first moves only B, which starts at 0 and
    so gives A no gradient; the second moves A too): every adapter moves, nothing else does, and the
    merged weights leave the base exactly where an adapter sits."""
    _, batch = image_batch(tiny_dir)
    lora = adapted(tiny_dir[0])
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    for _ in range(2):
        loss = -modeling.token_logprobs(lora, batch).sum() / batch["response_mask"].sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in lora.named_parameters():
        assert torch.equal(p, before[n]) != n.endswith((".lora_A", ".lora_B")), n
    base = initial_state(tiny_dir[0])
    merged = hf_state_dict(lora, lora.state_dict())
    for k, w in merged.items():
        is_adapted = k.startswith("model.language_model.layers.") and k.endswith("_proj.weight")
        assert torch.equal(w, base[k]) != is_adapted, k


def check_adapter_file(folder, lora_state, merged):
    """PEFT's names and shapes for every adapter in lora_state, the config, and base + scale * B @ A
    from the file equal to `merged`."""
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    config = json.load(open(os.path.join(folder, "adapter_config.json")))
    adapters = {k for k in lora_state if k.endswith((".lora_A", ".lora_B"))}
    assert len(adapters) == 2 * N_ADAPTED
    assert tensors.keys() == {f"base_model.model.{k}.weight" for k in adapters}
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout")} == dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0)
    for k in adapters:  # PEFT full-matches target_modules: every adapted module, no vision module
        assert re.fullmatch(config["target_modules"], k.rsplit(".", 1)[0]), k
    assert not re.fullmatch(config["target_modules"], "model.visual.blocks.0.mlp.up_proj")
    for k in sorted(adapters):
        if k.endswith(".lora_A"):
            m = k.removesuffix(".lora_A")
            A, B = tensors[f"base_model.model.{m}.lora_A.weight"], tensors[f"base_model.model.{m}.lora_B.weight"]
            assert torch.equal(A, lora_state[k]) and torch.equal(B, lora_state[m + ".lora_B"])
            assert torch.allclose(lora_state[m + ".base.weight"] + SCALE * B @ A, merged[m + ".weight"], atol=1e-7, rtol=0)


def test_adapter_file_is_peft_layout_and_holds_the_merge(tiny_dir, tmp_path):
    lora = adapted(tiny_dir[0])
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    folder = modeling.save_lora_adapter(lora, str(tmp_path / "adapter"), rank=0)
    assert json.load(open(os.path.join(folder, "adapter_config.json")))["base_model_name_or_path"] == tiny_dir[0]
    check_adapter_file(folder, lora.state_dict(), hf_state_dict(lora, lora.state_dict()))


@pytest.fixture(scope="module")
def two_ranks(tiny_dir, tmp_path_factory):
    """(out_path, results) of fsdp_worker.py's "lora" mode: one torchrun, 2 ranks."""
    out = str(tmp_path_factory.mktemp("lora") / "lora.pt")
    return out, run_worker(2, *tiny_dir, out, "lora")


def test_sharded_lora_loads_trains_and_merges_like_one_process(tiny_dir, two_ranks):
    """load_fsdp_model(lora=...) on 2 ranks with different global seeds: the pretrained base and,
    to round-off, the A of apply_lora in this process (rows from both ranks' shards); one step moves
    only the adapters; merge_lora over rollout.full_weights (what vLLM gets, one FSDP unit at a time,
    with activation-checkpointed names) equals merging the gathered state (both in the worker), and
    a plain model holding it gives the sharded model's log-probs."""
    model_dir, _ = tiny_dir
    out_path, res = two_ranks
    base, ref = initial_state(model_dir), adapted(model_dir).state_dict()
    assert res["loaded"].keys() == ref.keys()
    for k, w in res["loaded"].items():  # the base is copied from the files: the same bits
        # A: the same seeded uniform draws, scaled in another process, whose CPU kernels may fuse
        # the multiply-add or not (1 ulp, 7e-9 here); a wrong seed would be off by ~0.05.
        tol = 1e-7 if k.endswith(".lora_A") else 0.0
        assert torch.allclose(w, ref[k], atol=tol, rtol=0), k
    adapters = {k for k in ref if k.endswith((".lora_A", ".lora_B"))}
    assert res["grads"].keys() == adapters
    for k, w in res["state"].items():  # A moves by weight decay alone: B=0 gives it no gradient yet
        assert torch.equal(w, res["loaded"][k]) != (k in adapters), k
    merged = res["state_merged"]  # both merges ran in the worker: one process, one thread count
    assert res["merged"].keys() == merged.keys() == base.keys()
    for k, w in merged.items():
        assert torch.equal(res["merged"][k], w), k
        assert torch.equal(w, base[k]) != (k.startswith("model.language_model.layers.") and k.endswith("_proj.weight"))
    with torch.no_grad():  # float32 round-off: here the machine's thread count, in the worker 1
        logp = modeling.token_logprobs(plain_from(model_dir, merged), res["batch"])
    assert torch.allclose(logp, res["logp"], atol=1e-5, rtol=0)


def test_sharded_lora_saves_merged_hf_folder_adapter_and_checkpoint(tiny_dir, two_ranks, tmp_path):
    """save_hf and save_lora_adapter called by both ranks, and export_checkpoint of the 2-rank
    checkpoint: plain HF folders holding the merged weights, and the trained adapters in PEFT's layout."""
    out_path, res = two_ranks
    one = adapted(tiny_dir[0])
    one.load_state_dict(res["state"])
    merged = hf_state_dict(one, one.state_dict())  # B @ A in this process
    exported = export_checkpoint(out_path + ".ckpt", tiny_dir[0], str(tmp_path / "export"))
    # Each folder holds the same bits as the merge done in the process that wrote it: save_hf's in
    # the worker, export_checkpoint's here (B @ A may round differently under another thread count).
    for folder, want in ((out_path + ".hf", res["state_merged"]), (exported, merged)):
        state = modeling.load_model(folder).state_dict()
        assert state.keys() == want.keys(), folder
        assert all(torch.equal(w, want[k]) for k, w in state.items()), folder
    check_adapter_file(out_path + ".adapter", res["state"], merged)
