"""model.py: the tiny model is what it claims, positions and log-probs match independent references."""
import copy
import json
import os

import torch

import data
import model as modeling
import patches
import tiny


def test_tiny_model_is_deterministic_and_consistent(tiny_dir, tmp_path):
    model_dir, _ = tiny_dir
    texts = ["How many shapes? <think>x</think> \\boxed{3}"] * 50
    a = tiny.build_tiny_model(str(tmp_path / "a"), texts, seed=3)
    b = tiny.build_tiny_model(str(tmp_path / "b"), texts, seed=3)
    c = tiny.build_tiny_model(str(tmp_path / "c"), texts, seed=4)
    wa, wb, wc = (modeling.load_model(p).state_dict() for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["lm_head.weight"], wc["lm_head.weight"])
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    tok = processor.tokenizer
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    # The config's special ids are the tokenizer's, and each special token is one id.
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert tok.eos_token == "<|im_end|>" and tok.encode("<|im_start|>user")[0] == tok.convert_tokens_to_ids("<|im_start|>")
    n_params = sum(p.numel() for p in modeling.load_model(model_dir).parameters())
    assert 0.3e6 < n_params < 2e6
    head_dim = cfg["text_config"]["hidden_size"] // cfg["text_config"]["num_attention_heads"]
    assert head_dim >= 32 and sum(cfg["text_config"]["rope_parameters"]["mrope_section"]) == head_dim // 2


def test_linear_patch_embed_equals_the_conv3d(tiny_dir):
    """The matmul patch embedding == transformers' own Conv3d one: outputs and weight gradients."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    ours = modeling.load_model(tiny_dir[0]).model.visual.patch_embed
    theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir[0]).model.visual.patch_embed
    assert isinstance(theirs.proj, torch.nn.Conv3d) and torch.equal(ours.proj.weight, theirs.proj.weight)
    x = torch.randn(37, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    out, ref = ours(x), theirs(x)
    assert out.shape == ref.shape == (37, ours.proj.out_channels)
    assert torch.allclose(out, ref, atol=1e-5) and (out - ref).abs().max() > 0  # the matmul path really ran
    (out ** 2).sum().backward()
    (ref ** 2).sum().backward()
    assert torch.allclose(ours.proj.weight.grad, theirs.proj.weight.grad, rtol=1e-5, atol=1e-4)
    twin = copy.deepcopy(ours)  # a copy computes with its own weight, not the original's
    with torch.no_grad():
        twin.proj.weight.mul_(2)
        assert torch.allclose(twin(x), 2 * ours(x), atol=1e-5)


def test_grouped_sdpa_is_grouped_query_attention():
    """patches.grouped_sdpa == attention written out: each K/V head repeated for its query heads,
    softmax(q k^T * scale, masked) v; a padding mask per row, queries of 1 (decoding), 5 and 40 tokens
    (40 >= 2 * H_kv * D: transformers' own path)."""
    g = torch.Generator().manual_seed(0)
    for L in (1, 5, 40):
        B, H, H_kv, S, D = 3, 6, 2, L + 4, 8
        q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, L), (H_kv, S), (H_kv, S)))
        mask = torch.ones(B, 1, L, S, dtype=torch.bool).tril(S - L)  # causal for the last L keys
        mask[1, ..., :4] = False  # row 1 left-padded by 4
        attn = torch.nn.Module()
        attn.num_key_value_groups = H // H_kv  # what transformers' own path reads off the layer
        out, _ = patches.grouped_sdpa(attn, q, k, v, mask, scaling=0.3)
        scores = q @ k.repeat_interleave(H // H_kv, 1).transpose(-1, -2) * 0.3
        ref = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.repeat_interleave(H // H_kv, 1)
        assert out.shape == (B, L, H, D)
        assert torch.allclose(out, ref.transpose(1, 2), atol=1e-6), L


def test_trainer_attention_equals_transformers_eager(tiny_dir):
    """The model as load_model builds it (grouped_sdpa, matmul patch embed) gives transformers' eager
    attention's log-probs on left-padded rows, with shared prompts too (responses on a KV cache)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor, samples = make_batch(tiny_dir)
    ours = modeling.load_model(tiny_dir[0])
    eager = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir[0], attn_implementation="eager")
    assert ours.config._attn_implementation == "sdpa_grouped"
    samples = [s for s in samples for _ in range(2)]  # pairs: a prompt shared by two responses
    for share in (False, True):
        batch = data.collate(samples, processor.tokenizer.pad_token_id, share_prompts=share)
        assert not batch["attention_mask"].all()  # padded, so the grouped path runs, not SDPA's own
        with torch.no_grad():
            a, b = (modeling.token_logprobs(m, batch) for m in (ours, eager))
        assert torch.allclose(a, b, atol=2e-5), share


def make_batch(tiny_dir, n_image=3, with_text=True):
    from transformers import AutoProcessor

    model_dir, data_dir = tiny_dir
    processor = AutoProcessor.from_pretrained(model_dir)
    rows = data.load_rows(f"{data_dir}@train")
    prompts = [data.build_prompt(rows[i], i, processor, min_pixels=56 * 56, max_pixels=112 * 112) for i in range(n_image)]
    # Different image sizes give different grids: 56x56 -> 2x2 merged tokens, 84x56 -> 3x2.
    prompts[1]["images"] = [prompts[1]["images"][0].resize((84, 56))]
    if with_text:
        text = processor.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}], add_generation_prompt=True,
                                             tokenize=False)
        prompts.append({"text": text, "images": [], "answer": "5"})
    g = torch.Generator().manual_seed(0)
    n_plain = len(processor.tokenizer) - len(tiny.SPECIAL_TOKENS)  # the sampler never emits special tokens
    samples = []
    for k, p in enumerate(prompts):
        length = 3 + 4 * k  # responses of different lengths, so padding differs per row
        samples.append({**data.encode_prompt(p, processor), "response_ids": torch.randint(0, n_plain, (length,), generator=g).tolist()})
    return processor, samples


def test_mrope_positions_match_transformers(tiny_dir):
    processor, samples = make_batch(tiny_dir)
    batch = data.collate(samples, processor.tokenizer.pad_token_id)
    policy = modeling.load_model(tiny_dir[0])
    ours = modeling.mrope_position_ids(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                                       image_token_id=policy.config.image_token_id, merge_size=2)
    mm = (batch["input_ids"] == policy.config.image_token_id).int()
    theirs, _ = policy.model.get_rope_index(batch["input_ids"], mm, batch["image_grid_thw"],
                                            attention_mask=batch["attention_mask"])
    valid = batch["attention_mask"].bool()
    assert torch.equal(ours[:, valid], theirs[:, valid])
    # The image rows really are 3-D: height and width positions differ inside the image span.
    assert not torch.equal(ours[1], ours[2])


def test_token_logprobs_match_unpadded_full_forward(tiny_dir):
    """Padded, batched, logits_to_keep log-probs == each sample alone through a plain forward."""
    processor, samples = make_batch(tiny_dir)
    policy = modeling.load_model(tiny_dir[0])
    batch = data.collate(samples, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logp = modeling.token_logprobs(policy, batch, temperature=0.8)
        for i, s in enumerate(samples):
            ids = torch.cat([s["prompt_ids"], torch.tensor(s["response_ids"])])[None]
            mm = (ids == policy.config.image_token_id).int()
            out = policy(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=s.get("pixel_values"),
                         image_grid_thw=s.get("image_grid_thw"), mm_token_type_ids=mm)
            P, R = len(s["prompt_ids"]), len(s["response_ids"])
            ref = torch.log_softmax(out.logits[0, P - 1:P + R - 1] / 0.8, -1)
            ref = ref.gather(-1, torch.tensor(s["response_ids"])[:, None])[:, 0]
            assert torch.allclose(logp[i, :R], ref, atol=1e-5), i
            assert torch.all(logp[i, R:] == 0)


def test_shared_prompts_give_the_full_rows_log_probs_and_gradients(tiny_dir):
    """collate(share_prompts=True) + token_logprobs (each prompt once, its responses on its KV cache)
    == the full left-padded rows: log-probs and gradients, image prompts of two sizes and a text
    prompt in groups of 3 responses of different lengths; and with every response one token long."""
    processor, prompts = make_batch(tiny_dir)
    g = torch.Generator().manual_seed(1)
    n_plain = len(processor.tokenizer) - len(tiny.SPECIAL_TOKENS)
    policy = modeling.load_model(tiny_dir[0])
    for lengths in ((1, 6, 3), (1, 1, 1)):
        samples = [{**p, "response_ids": torch.randint(0, n_plain, (n,), generator=g).tolist()}
                   for p in prompts for n in lengths]
        results = []
        for share in (False, True):
            batch = data.collate(samples, processor.tokenizer.pad_token_id, share_prompts=share)
            policy.zero_grad()
            logp = modeling.token_logprobs(policy, batch, temperature=0.8, banned_ids=[3])
            (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()  # every token, its own weight
            results.append((logp.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()}))
        (full, full_grads), (shared, shared_grads) = results
        assert batch["input_ids"].shape[0] == len(prompts)  # one row per prompt
        assert torch.allclose(shared, full, atol=1e-5, rtol=0) and torch.all(shared[batch["response_mask"] == 0] == 0)
        for name, grad in full_grads.items():
            # atol: float32 rounding of sums over many tokens (embed_tokens' rows reach |5|, 3e-6 apart)
            assert torch.allclose(shared_grads[name], grad, atol=1e-5, rtol=1e-4), name
        assert sum(grad.abs().sum() for name, grad in full_grads.items() if "visual" in name) > 0
