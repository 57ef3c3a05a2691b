"""Both samplers against the trainer. vLLM: after sync_weights the sampled tokens' log-probs must
equal the trainer's, and before a sync of changed weights they must not (TRL PR #3670: FSDP2
weights once silently never reached vLLM). transformers (`generate_hf`): the same parity, with the
checkpoint's own generation_config set up to mislead it. And the vLLM warnings the console drops
are the harmless ones only."""
import logging

import pytest
import torch

import data
import model as modeling
import rollout


@pytest.fixture(scope="module")
def parts(tiny_dir):
    model_dir, data_dir = tiny_dir
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    policy = modeling.load_model(model_dir)
    rows = data.load_rows(f"{data_dir}@train")
    image_prompt = data.build_prompt(rows[0], 0, processor, min_pixels=56 * 56,
                                     max_pixels=112 * 112)
    question = "What is 2 + 3? Answer in \\boxed{}."
    text = processor.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)
    text_prompt = {"text": text, "images": [], "answer": "5"}
    return processor, policy, [text_prompt, image_prompt]


@pytest.fixture(scope="module")
def setup(parts, tiny_dir):
    processor, policy, prompts = parts
    # One engine per test module: it seeds global RNGs and pins threads for the whole process.
    engine = rollout.make_engine(tiny_dir[0], world_size=1, kv_cache_bytes=64 << 20,
                                 max_model_len=512)
    return processor, policy, engine, prompts


def max_logp_diff(processor, policy, engine, prompts, temperature, results=None):
    """Sample with vLLM (or take `results`), recompute with the trainer; max |difference| per prompt
    over response tokens."""
    banned = rollout.banned_token_ids(processor.tokenizer)
    if results is None:
        results = rollout.generate(engine, prompts, n=3, temperature=temperature, max_tokens=16,
                                   seed=0, banned_ids=banned)
    diffs = []
    for prompt, res in zip(prompts, results):
        enc = data.encode_prompt(prompt, processor)
        # vLLM expands the single image pad itself; its prompt ids must be the processor's.
        assert res["prompt_token_ids"] == enc["prompt_ids"].tolist()
        samples = [{**enc, "response_ids": ids, "sampler_logp": lps} for ids, lps in res["samples"]]
        batch = data.collate(samples, processor.tokenizer.pad_token_id)
        with torch.no_grad():
            logp = modeling.token_logprobs(policy, batch, temperature=temperature,
                                           banned_ids=banned)
        diffs.append(((logp - batch["sampler_logp"]).abs() * batch["response_mask"]).max().item())
    return diffs


def perturb(policy, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_vllm_logprobs_match_trainer_only_after_each_sync(setup):
    processor, policy, engine, prompts = setup
    # The engine starts with dummy weights: nothing matches before the first sync.
    assert min(max_logp_diff(processor, policy, engine, prompts, 1.0)) > 1e-2
    rollout.sync_weights(engine, policy)
    text_diff, image_diff = max_logp_diff(processor, policy, engine, prompts, 1.0)
    assert text_diff < 1e-4 and image_diff < 1e-4
    for k in range(2):  # two rounds of changed weights
        perturb(policy, seed=k)
        stale = max_logp_diff(processor, policy, engine, prompts, 1.0)
        assert min(stale) > 1e-2, f"round {k}: the engine already matched weights it was never sent"
        rollout.sync_weights(engine, policy)
        text_diff, image_diff = max_logp_diff(processor, policy, engine, prompts, 1.0)
        assert text_diff < 1e-4 and image_diff < 1e-4, (k, text_diff, image_diff)


def test_vllm_logprobs_match_trainer_at_temperature(setup):
    # Processed log-probs include temperature and the -100 bias on image tokens, as the trainer's.
    processor, policy, engine, prompts = setup
    rollout.sync_weights(engine, policy)
    assert max(max_logp_diff(processor, policy, engine, prompts, 0.7)) < 1e-4


def test_sampler_never_emits_banned_tokens(setup):
    processor, policy, engine, prompts = setup
    rollout.sync_weights(engine, policy)
    banned = rollout.banned_token_ids(processor.tokenizer)
    # A random model puts ~1/1000 of its mass on each token: 200 x 16 draws would hit them unbanned.
    results = rollout.generate(engine, prompts, n=100, temperature=1.5, max_tokens=16, seed=1,
                               banned_ids=banned)
    sampled = {t for r in results for ids, _ in r["samples"] for t in ids}
    assert len(sampled) > 300  # the draws really cover the vocabulary
    assert not sampled & set(banned)


def test_log_filter_drops_only_rotary_caches_and_thread_skips(setup):
    """What make_engine's filter (keep_record) drops, caught before it: after a sync the only
    layers vLLM reports as not loaded are the two rotary ones (a cos_sin_cache buffer, computed,
    not loaded), so every parameter arrived; on CPU each image prompt makes vLLM skip
    set_num_threads, and the thread count stays."""
    processor, policy, engine, prompts = setup
    names = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.v1.worker.cpu_worker")
    records = []
    catch = logging.Handler()
    catch.emit = records.append
    for name in names:
        logging.getLogger(name).removeFilter(rollout.keep_record)
        logging.getLogger(name).addHandler(catch)
    threads = torch.get_num_threads()
    try:
        rollout.sync_weights(engine, policy)
        rollout.generate(engine, prompts, n=2, temperature=1.0, max_tokens=4, seed=0,
                         banned_ids=rollout.banned_token_ids(processor.tokenizer))
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(catch)
            logging.getLogger(name).addFilter(rollout.keep_record)
    assert torch.get_num_threads() == threads
    failed = [r for r in records if "Failed to load weights" in r.getMessage()]
    assert {r.getMessage() for r in failed} == {"RotaryEmbedding: Failed to load weights",
                                                "MRotaryEmbedding: Failed to load weights"}
    skips = [r for r in records if "torch.set_num_threads" in r.getMessage()]
    assert len(skips) == (0 if torch.cuda.is_available() else 2)  # one image prompt: set, restore
    assert not any(rollout.keep_record(r) for r in failed + skips)


def test_hf_sampler_logprobs_match_trainer(parts):
    """generate_hf: a text and an image prompt left-padded into one prefill, each copied to its 4
    rows, two temperatures; the returned log-probs must be the trainer's full-forward ones."""
    processor, policy, prompts = parts
    banned = rollout.banned_token_ids(processor.tokenizer)
    for temperature in (1.0, 0.7):
        results = rollout.generate_hf(policy, processor, prompts, n=4, temperature=temperature,
                                      max_tokens=16, seed=0, banned_ids=banned, batch_size=8)
        assert [r["prompt_token_ids"] for r in results] == [
            data.encode_prompt(p, processor)["prompt_ids"].tolist() for p in prompts]
        assert all(len(r["samples"]) == 4 and len({tuple(ids) for ids, _ in r["samples"]}) == 4
                   for r in results)
        assert max(max_logp_diff(processor, policy, None, prompts, temperature, results)) < 1e-4
    again = rollout.generate_hf(policy, processor, prompts, n=4, temperature=0.7, max_tokens=16,
                                seed=0, banned_ids=banned, batch_size=8)
    assert [r["samples"] for r in again] == [r["samples"] for r in results]  # seeded


def test_hf_sampler_greedy_and_tiny_top_p_follow_the_argmax(parts):
    processor, policy, prompts = parts
    banned = rollout.banned_token_ids(processor.tokenizer)
    enc = data.encode_prompt(prompts[1], processor)
    ref = []  # greedy decoding written out: full forward without cache, argmax of the biased logits
    for _ in range(8):
        batch = data.collate([{**enc, "response_ids": ref + [0]}], processor.tokenizer.pad_token_id)
        pos = modeling.mrope_position_ids(batch["input_ids"], batch["attention_mask"],
                                          batch["image_grid_thw"],
                                          image_token_id=policy.config.image_token_id, merge_size=2)
        with torch.no_grad():
            full = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=pos, pixel_values=batch["pixel_values"],
                          image_grid_thw=batch["image_grid_thw"]).logits[0, -2]
        full[banned] -= 100
        ref.append(int(full.argmax()))
        if ref[-1] == processor.tokenizer.eos_token_id:
            break
    for temperature, top_p in ((0, 1.0), (1.0, 1e-6)):
        res = rollout.generate_hf(policy, processor, prompts[1:], n=2, temperature=temperature,
                                  top_p=top_p, max_tokens=8, seed=0, banned_ids=banned)
        assert [ids for ids, _ in res[0]["samples"]] == [ref, ref], (temperature, top_p)


def test_sync_from_fsdp_units_matches_plain_weights(setup, tiny_dir):
    """sync_weights from an FSDP2-wrapped model gathers unit by unit (unshard/reshard): every name
    and value must be the plain model's, with the checkpoint wrapper's prefix gone, and vLLM must
    then match the trainer."""
    import copy

    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh

    processor, policy, engine, prompts = setup
    assert dist.is_initialized() and dist.get_world_size() == 1  # vLLM's single-process world
    plain = copy.deepcopy(policy)
    perturb(plain, seed=7)
    wrapped = copy.deepcopy(plain)
    layers = wrapped.model.language_model.layers
    layers[0] = checkpoint_wrapper(layers[0])
    wrapped = modeling.apply_fsdp(wrapped, init_device_mesh("cpu", (1,)))
    got = {n.replace("_checkpoint_wrapped_module.", ""): t
           for n, t in rollout.full_weights(wrapped)}
    want = dict(plain.named_parameters())
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(hasattr(p, "full_tensor") for p in wrapped.parameters())  # resharded afterwards
    rollout.sync_weights(engine, wrapped)
    assert max(max_logp_diff(processor, plain, engine, prompts, 1.0)) < 1e-4


def test_hf_sampler_keeps_fsdp_ranks_in_step_with_uneven_shards(tiny_dir, tmp_path):
    """2 FSDP ranks: one with 3 chunks of image prompts, one with a single text-only chunk. Both
    must finish (a mismatch of collectives hangs, and the timeout fails the test) with the
    trainer's log-probs and the right number of samples per prompt."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "res")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(port), os.path.join(root, "tests", "hf_sampler_worker.py"),
           *tiny_dir, out]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = torch.load(out + ".0"), torch.load(out + ".1")
    assert r0["counts"] == [2, 2, 2] and r1["counts"] == [1]
    assert r0["diff"] < 1e-4 and r1["diff"] < 1e-4
    assert r0["sharded"] and r1["sharded"]  # every FSDP unit resharded after decoding
