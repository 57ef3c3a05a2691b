"""Qwen3-VL, the second architecture: the tiny random one is what it claims, and the Qwen2.5-VL
tests of positions, log-probs, shared prompts and FSDP2 pass on it unchanged (they are called here
with its folder)."""
import json
import os

import pytest
import torch

import data
import model as modeling
import rollout
import test_fsdp
import test_model
import tiny
from test_rollout import max_logp_diff, perturb


def build(tiny_dir, tmp_path_factory, **kw):
    fmt = data.MATH_FORMAT_PROMPT.replace("{{ content | trim }}", "")
    texts = [q + fmt for q in tiny.QUESTIONS] + [tiny.synthetic_response(k) for k in range(10)]
    out = str(tmp_path_factory.mktemp("qwen3") / "model")
    return tiny.build_tiny_model(out, texts * 20, seed=0, arch="qwen3_vl", **kw), tiny_dir[1]


@pytest.fixture(scope="session")
def qwen3_dir(tiny_dir, tmp_path_factory):
    """(model_dir, data_dir): a random tiny Qwen3-VL on the tiny Qwen2.5-VL's tokenizer corpus and
    data, built once."""
    return build(tiny_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def tied_dir(tiny_dir, tmp_path_factory):
    """The same with tied embeddings, as Qwen3-VL-2B and 4B."""
    return build(tiny_dir, tmp_path_factory, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def thinking_dir(tiny_dir, tmp_path_factory):
    """The same with the Thinking variants' chat template: the assistant turn opens "<think>\n"."""
    return build(tiny_dir, tmp_path_factory, thinking=True)


def test_tiny_qwen3_is_a_qwen3_vl(qwen3_dir):
    """Qwen3-VL's classes, deepstack mergers, interleaved mRoPE, patch 16 in the model and the
    processor (a 56x56 image is resized to 64x64: 4x4 patches, 2x2 tokens), the Instruct template
    (no default system turn), and is_tiny knows it."""
    from transformers import AutoProcessor

    model_dir, _ = qwen3_dir
    policy = modeling.load_model(model_dir)
    assert type(policy).__name__ == "Qwen3VLForConditionalGeneration"
    assert len(policy.model.visual.deepstack_merger_list) == 2 and tiny.is_tiny(model_dir)
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    assert cfg["text_config"]["rope_parameters"]["mrope_interleaved"]
    processor = AutoProcessor.from_pretrained(model_dir)
    assert processor.image_processor.patch_size == cfg["vision_config"]["patch_size"] == 16
    rows = data.load_rows(f"{qwen3_dir[1]}@train")
    prompt = data.build_prompt(rows[0], 0, processor, min_pixels=56 * 56, max_pixels=112 * 112)
    assert prompt["text"].startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    enc = data.encode_prompt(prompt, processor)
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert (enc["prompt_ids"] == cfg["image_token_id"]).sum() == 4


def test_linear_patch_embed_equals_the_conv3d_with_its_bias(qwen3_dir):
    from transformers import Qwen3VLForConditionalGeneration

    ours = modeling.load_model(qwen3_dir[0]).model.visual.patch_embed
    theirs = Qwen3VLForConditionalGeneration.from_pretrained(qwen3_dir[0]).model.visual.patch_embed
    assert theirs.proj.bias is not None and torch.equal(ours.proj.bias, theirs.proj.bias)
    x = torch.randn(37, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_positions_match_transformers(qwen3_dir):
    """model.mrope_position_ids == Qwen3-VL's get_rope_index: images of two sizes, a text-only row,
    left padding."""
    test_model.test_mrope_positions_match_transformers(qwen3_dir)


def test_token_logprobs_match_unpadded_full_forward(qwen3_dir):
    test_model.test_token_logprobs_match_unpadded_full_forward(qwen3_dir)


def test_shared_prompts_give_the_full_rows_log_probs_and_gradients(qwen3_dir):
    """The responses on the prompt's KV cache see the deepstack features the prompt forward added at
    its image tokens: the same log-probs and gradients as the full rows."""
    test_model.test_shared_prompts_give_the_full_rows_log_probs_and_gradients(qwen3_dir)


def test_text_only_batch_runs_every_vision_module(qwen3_dir):
    """A batch without images still gives every vision parameter, the deepstack mergers included,
    a (zero) gradient: under FSDP each rank then runs the same collectives."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(qwen3_dir[0])
    text = processor.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}],
                                         add_generation_prompt=True, tokenize=False)
    sample = {**data.encode_prompt({"text": text, "images": []}, processor), "response_ids": [5, 6]}
    policy = modeling.load_model(qwen3_dir[0])
    logp = modeling.token_logprobs(policy, data.collate([sample], processor.tokenizer.pad_token_id))
    logp.sum().backward()
    visual = {n: p.grad for n, p in policy.named_parameters() if n.startswith("model.visual.")}
    assert any("deepstack_merger_list" in n for n in visual)
    assert all(g is not None and torch.all(g == 0) for g in visual.values())


def test_rank_without_images_neither_hangs_nor_changes_the_step(qwen3_dir, tmp_path):
    test_fsdp.test_rank_without_images_neither_hangs_nor_changes_the_step(qwen3_dir, tmp_path)


def test_both_samplers_match_the_trainer_after_each_sync(tied_dir):
    """vLLM's log-probs equal the trainer's after each sync (and not before: the weights really
    arrive), a text and an image prompt, on the tied layout (the one whose output head vLLM on CPU
    keeps a separate copy of); generate_hf's too."""
    from transformers import AutoProcessor

    model_dir, data_dir = tied_dir
    processor, policy = AutoProcessor.from_pretrained(model_dir), modeling.load_model(model_dir)
    assert policy.lm_head.weight is policy.model.language_model.embed_tokens.weight
    rows = data.load_rows(f"{data_dir}@train")
    image_prompt = data.build_prompt(rows[0], 0, processor, min_pixels=56 * 56,
                                     max_pixels=112 * 112)
    text = processor.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                         add_generation_prompt=True, tokenize=False)
    prompts = [{"text": text, "images": [], "answer": "5"}, image_prompt]
    # One engine per test module: it seeds global RNGs and pins threads for the whole process.
    engine = rollout.make_engine(model_dir, world_size=1, kv_cache_bytes=64 << 20,
                                 max_model_len=512, min_pixels=56 * 56, max_pixels=112 * 112)
    assert min(max_logp_diff(processor, policy, engine, prompts, 1.0)) > 1e-2
    for k, temperature in enumerate((1.0, 0.7)):
        rollout.sync_weights(engine, policy)
        assert max(max_logp_diff(processor, policy, engine, prompts, temperature)) < 1e-4, k
        perturb(policy, seed=k)
        assert min(max_logp_diff(processor, policy, engine, prompts, temperature)) > 1e-2, k
    banned = rollout.banned_token_ids(processor.tokenizer)
    results = rollout.generate_hf(policy, processor, prompts, n=4, temperature=1.0, max_tokens=16,
                                  seed=0, banned_ids=banned, batch_size=8)
    assert max(max_logp_diff(processor, policy, None, prompts, 1.0, results)) < 1e-4


def test_short_run_syncs_exactly_and_exports_a_model_vllm_loads(qwen3_dir, tmp_path):
    """train.py on the tiny Qwen3-VL (2 steps, vLLM sampler): the sampler's log-probs are the
    trainer's before each update, and the final save_hf folder loads in vLLM and transformers with
    the same log-probs (tests/vllm_export_worker.py)."""
    import subprocess
    import sys

    model_dir, data_dir = qwen3_dir
    out, env = tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = [f"--model_path={model_dir}", f"--train_data={data_dir}/train.parquet",
             f"--val_data={data_dir}/test.parquet", f"--cache_dir={tmp_path / 'cache'}",
             f"--out_dir={out}", "--max_steps=2", "--rollout_batch_size=8", "--num_generations=4",
             "--global_batch_size=4", "--micro_batch_size=6", "--val_max_prompts=8",
             "--max_response_length=16", "--reward=random"]
    res = subprocess.run([sys.executable, os.path.join(test_fsdp.ROOT, "train.py"), *flags],
                         capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    steps = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in steps if "rollout/logp_diff_max" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["rollout/logp_diff_max"] < 1e-4 and r["grad_norm"] > 0 for r in steps)
    worker = os.path.join(test_fsdp.ROOT, "tests", "vllm_export_worker.py")
    res = subprocess.run([sys.executable, worker, str(out / "hf"), data_dir], capture_output=True,
                         text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.split("max_logp_diff")[-1]) < 1e-4, res.stdout[-500:]


def test_reward_reads_the_think_a_thinking_template_opened(thinking_dir, qwen3_dir, tiny_dir):
    """The Thinking template writes "<think>\n" after the assistant header, so the sampled response
    starts inside the reasoning: the reward reads the opening before it (a response that closes the
    reasoning and boxes the answer has the format; one that opens <think> again too). Instruct
    templates open nothing and score as before. A given response (SFT, preferences) loses its own
    <think>: the trainer's text has one."""
    import reward
    import train
    from transformers import AutoProcessor

    row = data.load_rows(f"{tiny_dir[1]}@train")[0]
    right, wrong = row["answer"], str(int(row["answer"]) % 4 + 1)
    responses = [f"I count them.</think> \\boxed{{{right}}}",
                 f"<think>I count.</think> \\boxed{{{right}}}", f"I count \\boxed{{{right}}}",
                 f"</think> \\boxed{{{wrong}}}"]
    expected = {thinking_dir: [1.0, 1.0, 0.9, 0.1], qwen3_dir: [0.9, 1.0, 0.9, 0.0],
                tiny_dir: [0.9, 1.0, 0.9, 0.0]}
    for model_dir, overall in expected.items():
        processor = AutoProcessor.from_pretrained(model_dir[0])
        tokenizer, eos = processor.tokenizer, processor.tokenizer.eos_token_id
        prompt = data.build_prompt(row, 0, processor, min_pixels=56 * 56, max_pixels=112 * 112)
        opening = "<think>\n" if model_dir is thinking_dir else ""
        assert prompt["text"].endswith("<|im_start|>assistant\n" + opening)
        assert data.assistant_opening(prompt["text"]) == opening
        prompt["row"] = {}
        samples = [{"response_ids": tokenizer.encode(r) + [eos], "prompt": prompt}
                   for r in responses]
        scores, _ = train.score(samples, reward.load_reward("math"), tokenizer, timeout_s=30)
        assert [s["overall"] for s in scores] == pytest.approx(overall), model_dir
        sample = train.with_response(prompt, responses[1], processor)
        full = prompt["text"] + tokenizer.decode(sample["response_ids"])
        assert full.endswith(f"assistant\n<think>\nI count.</think> \\boxed{{{right}}}<|im_end|>"
                             if opening else f"assistant\n{responses[1]}<|im_end|>")


def test_resume_after_sigkill_repeats_the_same_steps(qwen3_dir, tmp_path, monkeypatch):
    """test_train's on the tiny Qwen3-VL (vLLM sampler): a 2-rank run SIGKILLed after its step-2
    checkpoint and resumed with --resume=auto logs steps 3-4 exactly as the uninterrupted run."""
    import test_train

    monkeypatch.setitem(test_train.WORLD, "model", qwen3_dir[0])
    monkeypatch.setitem(test_train.WORLD, "data", qwen3_dir[1])
    test_train.test_resume_after_sigkill_repeats_the_same_steps(tmp_path, "vllm")


@pytest.fixture(scope="module")
def qwen3_variants(qwen3_dir, tmp_path_factory):
    """test_fsdp's variants fixture on the tiny Qwen3-VL: one 2-rank run of every wrap option."""
    out = str(tmp_path_factory.mktemp("variants") / "variants.pt")
    return out, test_fsdp.run_worker(2, *qwen3_dir, out, "variants")


def test_memory_options_take_the_same_step(qwen3_variants):
    """Activation checkpointing (every vision block and decoder layer wrapped, the deepstack
    mergers FSDP units beside them), no reshard after forward and CPU offload: the step of the
    default wrap, under the same names."""
    test_fsdp.test_memory_options_take_the_same_step(qwen3_variants)
