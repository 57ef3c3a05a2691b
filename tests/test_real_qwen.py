"""The real Qwen2.5-VL-7B-Instruct tokenizer, chat template, processor and generation config
(rebuilt offline by real_qwen.py, byte-identical to the hub's) around a tiny random model with the
7B's vocabulary, token ids, head_dim, mRoPE sections and legacy checkpoint layout: prompts in
Qwen's chat format token for token, both samplers against the trainer, what the savers write, and
short train runs. The reference tokenizer here is tiktoken on the same ranks, as Qwen ships it."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import checkpoints
import data
import model as modeling
import patches
import real_qwen
import rollout
import tiny
from export import export_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = [real_qwen.ID["<|im_end|>"], real_qwen.ID["<|endoftext|>"]]
PIXELS = dict(min_pixels=3136, max_pixels=12544)


@pytest.fixture(scope="session")
def real_dir(tmp_path_factory):
    return real_qwen.build(str(tmp_path_factory.mktemp("real_qwen") / "7b"))


@pytest.fixture(scope="session")
def tied_dir(real_dir, tmp_path_factory):
    """The 3B's layout (tied lm_head, vocab 151,936) with the same tokenizer files."""
    out = str(tmp_path_factory.mktemp("real_qwen") / "3b")
    real_qwen.write_model(out, tied=True, seed=1)
    for name in (*real_qwen.HUB_SHA256, "tokenizer.json"):
        shutil.copy(os.path.join(real_dir, name), out)
    return out


def reference_encoder():
    """Qwen's own tokenizer: tiktoken on the ranks with Qwen2's split regex (no special tokens)."""
    import tiktoken

    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    return tiktoken.Encoding("qwen", pat_str=split, mergeable_ranks=real_qwen.read_ranks(),
                             special_tokens=real_qwen.ID).encode_ordinary


@pytest.fixture(scope="module")
def parts(real_dir):
    """(processor, plain policy, [text prompt, image prompt]) on the 7B layout."""
    processor = patches.load_processor(real_dir)
    rows = [{"problem": "What is 2 + 3?", "answer": "5", "images": []},
            {"problem": "<image>How many shapes are in the figure?", "answer": "3",
             "images": [Image.new("RGB", (84, 56), "white")]}]
    prompts = [data.build_prompt(r, i, processor, **PIXELS) for i, r in enumerate(rows)]
    return processor, modeling.load_model(real_dir), prompts


@pytest.fixture(scope="module")
def engine(real_dir):
    # One engine per test module: it seeds global RNGs and pins threads for the whole process. Its
    # world of one is the process group the FSDP fixtures below use.
    return rollout.make_engine(real_dir, world_size=1, kv_cache_bytes=64 << 20, max_model_len=1024,
                               **PIXELS)


@pytest.fixture(scope="module")
def fsdp_policy(real_dir, engine):
    from torch.distributed.device_mesh import init_device_mesh

    return modeling.load_fsdp_model(real_dir, init_device_mesh("cpu", (1,)), rank=0)


def test_tokenizer_files_are_the_hubs_and_encode_as_tiktoken(real_dir, parts):
    import hashlib

    for name, digest in real_qwen.HUB_SHA256.items():
        raw = open(os.path.join(real_dir, name), "rb").read()
        assert hashlib.sha256(raw).hexdigest() == digest, name
    tok, ref = parts[0].tokenizer, reference_encoder()
    texts = ["Find x. \\frac{1}{2} \\sqrt{3} 60^\\circ, so x = 12345.",
             "don't  WE'LL\tgo\n\n  \r\nnow ", "<think>I count the shapes.</think> \\boxed{4}",
             "中文 naïve café 😀 Ωmega", " ".join(["word"] * 50)]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == ref(text), text
        assert tok.decode(ref(text)) == text
    assert tok.convert_tokens_to_ids(real_qwen.ADDED_TOKENS) == list(range(151643, 151665))
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (151645, 151643, 151665)


def test_prompt_is_qwen_chat_format_token_for_token(parts):
    processor, _, prompts = parts
    ref, I = reference_encoder(), real_qwen.ID
    question = "How many shapes are in the figure?"
    user = data.MATH_FORMAT_PROMPT.replace("{{ content | trim }}", question)
    image_tokens = (56 // 28) * (84 // 28)  # 14-px patches merged 2x2: one token per 28x28 pixels
    S, E = I["<|im_start|>"], I["<|im_end|>"]
    want = [S, *ref("system\nYou are a helpful assistant."), E, *ref("\n"),
            S, *ref("user\n"), I["<|vision_start|>"], *[I["<|image_pad|>"]] * image_tokens,
            I["<|vision_end|>"], *ref(user), E, *ref("\n"),
            S, *ref("assistant\n")]
    enc = data.encode_prompt(prompts[1], processor)
    assert enc["prompt_ids"].tolist() == want
    assert enc["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert prompts[1]["text"].count("<|image_pad|>") == 1  # for vLLM, which expands the pad itself


def check_samples(processor, policy, prompts, results, max_tokens):
    """Each sample stops at its first eos of either kind (or runs to max_tokens) and vLLM's prompt
    ids are the processor's. Returns the max |sampler - trainer| log-prob over `results` and the
    set of tokens the samples ended on."""
    banned = rollout.banned_token_ids(processor.tokenizer)
    diff, ends = 0.0, set()
    for prompt, res in zip(prompts, results):
        enc = data.encode_prompt(prompt, processor)
        assert res["prompt_token_ids"] == enc["prompt_ids"].tolist()
        for ids, _ in res["samples"]:
            assert not set(ids[:-1]) & set(EOS), ids
            assert ids[-1] in EOS or len(ids) == max_tokens, ids
            ends.add(ids[-1])
        samples = [{**enc, "response_ids": ids, "sampler_logp": lps} for ids, lps in res["samples"]]
        batch = data.collate(samples, processor.tokenizer.pad_token_id)
        with torch.no_grad():
            logp = modeling.token_logprobs(policy, batch, temperature=1.0, banned_ids=banned)
        gap = (logp - batch["sampler_logp"]).abs() * batch["response_mask"]
        diff = max(diff, gap.max().item())
    return diff, ends


def distinct(results):
    """The fewest distinct samples of any prompt: Qwen's top_k 1 would make them all one."""
    return min(len({tuple(ids) for ids, _ in r["samples"]}) for r in results)


def test_vllm_stops_on_both_eos_and_matches_trainer_after_each_sync(parts, engine):
    """The engine reads generation_config.json (eos [151645, 151643], top_k 1, temperature 0.1,
    repetition_penalty 1.05): it must stop on both ids and sample at exactly the trainer's
    temperature-1 distribution (processed log-probs equal the trainer's), before and after a sync
    of changed weights."""
    processor, policy, prompts = parts
    banned = rollout.banned_token_ids(processor.tokenizer)
    sample = lambda n, max_tokens, seed: rollout.generate(  # noqa: E731
        engine, prompts, n=n, temperature=1.0, max_tokens=max_tokens, seed=seed, banned_ids=banned)
    ends = set()
    for k in range(2):
        if k:
            with torch.no_grad():
                g = torch.Generator().manual_seed(k)
                for p in policy.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
            stale = check_samples(processor, policy, prompts, sample(2, 8, 1), 8)[0]
            assert stale > 1e-2, "the engine matched weights it was never sent"
        rollout.sync_weights(engine, policy)
        results = sample(8, 24, k)
        diff, seen = check_samples(processor, policy, prompts, results, 24)
        assert diff < 1e-4 and distinct(results) > 4, (k, diff)
        ends |= seen
    assert set(EOS) <= ends


def test_fsdp_policy_keeps_generation_config_and_hf_sampler_stops_on_both_eos(parts, fsdp_policy):
    """load_fsdp_model builds from config.json (one eos); generation_config.json's two eos ids must
    reach the policy, which generate_hf stops on."""
    processor, _, prompts = parts
    banned = rollout.banned_token_ids(processor.tokenizer)
    results = rollout.generate_hf(fsdp_policy, processor, prompts, n=8, temperature=1.0,
                                  max_tokens=24, seed=0, banned_ids=banned)
    diff, ends = check_samples(processor, fsdp_policy, prompts, results, 24)
    assert diff < 1e-4 and set(EOS) <= ends and distinct(results) > 4, (diff, ends)
    gen = fsdp_policy.generation_config  # for whoever serves the saved model (save_hf writes it)
    assert (gen.eos_token_id, gen.pad_token_id, gen.top_k, gen.temperature) == (EOS, 151643, 1, 0.1)


def test_save_hf_and_export_carry_the_real_generation_config(fsdp_policy, parts, real_dir,
                                                             tmp_path):
    keys = ("eos_token_id", "pad_token_id", "top_k", "top_p", "temperature", "repetition_penalty")
    want = {k: real_qwen.GENERATION_CONFIG[k] for k in keys}
    hf = modeling.save_hf(fsdp_policy, parts[0], str(tmp_path / "hf"), rank=0)
    ckpt = str(tmp_path / "ckpt")
    optimizer = torch.optim.AdamW(fsdp_policy.parameters())
    checkpoints.save_checkpoint(ckpt, fsdp_policy, optimizer, {"step": 0}, rank=0)
    export = export_checkpoint(ckpt, real_dir, str(tmp_path / "export"))
    for out in (hf, export):
        got = json.load(open(os.path.join(out, "generation_config.json")))
        assert {k: got.get(k) for k in want} == want, out


def test_tied_3b_layout_loads_tied_and_samples_as_the_trainer_scores(parts, tied_dir, engine):
    """The 3B's layout: no lm_head in the checkpoint, lm_head is embed_tokens in the plain and the
    FSDP model alike, and generate_hf on the FSDP model matches the plain model's log-probs."""
    from torch.distributed.device_mesh import init_device_mesh

    processor, _, prompts = parts
    plain = modeling.load_model(tied_dir)
    policy = modeling.load_fsdp_model(tied_dir, init_device_mesh("cpu", (1,)), rank=0)
    for m in (plain, policy):
        assert m.lm_head.weight is m.model.language_model.embed_tokens.weight
        assert m.config.get_text_config().vocab_size == 151936
    results = rollout.generate_hf(policy, processor, prompts, n=4, temperature=1.0, max_tokens=16,
                                  seed=0, banned_ids=rollout.banned_token_ids(processor.tokenizer))
    diff, ends = check_samples(processor, plain, prompts, results, 16)
    assert diff < 1e-4 and ends & set(EOS), (diff, ends)


def test_load_processor_stops_on_the_old_image_processor_name_and_says_what_to_change(real_dir,
                                                                                      tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for name in (*real_qwen.HUB_SHA256, "tokenizer.json", "config.json"):
        os.symlink(os.path.join(real_dir, name), old / name)
    (old / "preprocessor_config.json").unlink()
    config = open(os.path.join(real_dir, "preprocessor_config.json")).read()
    (old / "preprocessor_config.json").write_text(
        config.replace('"Qwen2VLImageProcessor"', '"Qwen2_5_VLImageProcessor"'))
    with pytest.raises(ValueError, match="preprocessor_config.json") as e:
        patches.load_processor(str(old))
    fix = '"image_processor_type": "Qwen2VLImageProcessor"'
    assert str(e.value).startswith(str(old)) and fix in str(e.value)
    (old / "preprocessor_config.json").write_text(config)  # what the message says to do
    image = Image.new("RGB", (84, 56), "red")
    text = ["<|vision_start|><|image_pad|><|vision_end|>"]
    fixed, real = (patches.load_processor(d)(text=text, images=[image], return_tensors="pt")
                   for d in (str(old), real_dir))
    assert fixed["input_ids"].equal(real["input_ids"])
    assert fixed["pixel_values"].equal(real["pixel_values"])


@pytest.mark.parametrize("sampler", ["vllm", "hf"])
def test_short_train_run_on_the_real_layout(real_dir, tmp_path, sampler):
    """Two GRPO steps from the real-layout folder with either sampler: the sampler's log-probs are
    the trainer's (train.py also refuses vLLM prompt ids that differ from the processor's), and
    out_dir/hf carries the real generation_config."""
    data_dir = tiny.make_synthetic(str(tmp_path / "data"), n_train=8, n_test=4, seed=0)
    out = tmp_path / "out"
    flags = [f"--model_path={real_dir}", f"--train_data={data_dir}/train.parquet",
             f"--val_data={data_dir}/test.parquet", f"--out_dir={out}",
             f"--cache_dir={tmp_path / 'cache'}", f"--sampler={sampler}", "--max_steps=2",
             "--rollout_batch_size=2", "--global_batch_size=2", "--num_generations=4",
             "--micro_batch_size=8", "--max_response_length=16", "--val_max_prompts=2",
             "--min_pixels=3136", "--max_pixels=12544", "--max_prompt_length=512",
             "--vllm_kv_cache_mb=64", "--vllm_enforce_eager=true", "--kl_coef=0", "--lr=1e-4",
             "--reward=random"]
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags], timeout=900,
                         capture_output=True, text=True, cwd=str(tmp_path),
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    steps = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "reward/overall" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["rollout/logp_diff_max"] < 1e-4 for r in steps), steps
    got = json.load(open(out / "hf" / "generation_config.json"))
    assert [got.get(k) for k in ("eos_token_id", "pad_token_id", "top_k")] == [EOS, 151643, 1]
