"""What the CUDA path relies on, checked on the CPU through the real code: no attention mask
leaves a query row without a key (cuDNN SDPA returns NaN there), and the log-probs are computed a
chunk of the sequence at a time with no (B, T, V) float32 copy kept for backward."""
import torch

import data
import model as modeling
import rollout
from test_model import make_batch


def record_attention_masks(monkeypatch):
    """The list every later call of the registered attention function appends its mask to."""
    from transformers import AttentionInterface

    masks, attend = [], AttentionInterface._global_mapping["sdpa_grouped"]

    def recording(module, query, key, value, attention_mask, *args, **kwargs):
        masks.append(attention_mask)
        return attend(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa_grouped", recording)
    return masks


def test_every_attention_query_row_has_a_key(tiny_dir, monkeypatch):
    """Left padding leaves the first positions of a short prompt no key (causal and padding). Every
    mask the attention gets, in token_logprobs with and without shared prompts and in generate_hf's
    prefill and decoding of prompts of three lengths, gives each query row a key. The plain
    left-padded forward's mask is written out: causal and key padding; a left-padded query row
    sees every key."""
    processor, samples = make_batch(tiny_dir)
    pad = processor.tokenizer.pad_token_id
    policy = modeling.load_model(tiny_dir[0])
    masks = record_attention_masks(monkeypatch)
    for share in (False, True):
        batch = data.collate([s for s in samples for _ in range(2)], pad, share_prompts=share)
        with torch.no_grad():
            modeling.token_logprobs(policy, batch)
        if not share:
            full, valid = [m for m in masks if m is not None][0], batch["attention_mask"].bool()
            L = valid.shape[1]
            ref = torch.ones(L, L, dtype=torch.bool).tril() & valid[:, None, None, :]  # B, 1, L, L
            left = valid.cumsum(1) == 0  # (B, L): the left padding, before a row's first token
            ref[left[:, None, :, None].expand_as(ref)] = True
            assert left[:, 0].sum() >= 4  # rows with left padding exist
            assert torch.equal(full, ref)
    n_forward = len(masks)
    rows = data.load_rows(f"{tiny_dir[1]}@train")
    prompts = [data.build_prompt(rows[i], i, processor, min_pixels=56 * 56, max_pixels=112 * 112)
               for i in range(2)]
    prompts[1]["images"] = [prompts[1]["images"][0].resize((84, 56))]
    chat = [{"role": "user", "content": "Add 2 and 3."}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    prompts.append({"text": text, "images": [], "answer": "5"})
    assert len({len(data.encode_prompt(p, processor)["prompt_ids"]) for p in prompts}) == 3
    rollout.generate_hf(policy, processor, prompts, n=2, temperature=1.0, max_tokens=3, seed=0,
                        banned_ids=rollout.banned_token_ids(processor.tokenizer))
    assert len(masks) > n_forward  # the sampler's prefill and decoding went through it too
    seen = [m for m in masks if m is not None]
    assert all(m.dtype == torch.bool for m in seen)
    assert [tuple(m.shape) for m in seen if not m.any(-1).all()] == []


def whole_logprobs(logits, ids, mask, temperature, banned):
    """The unchunked formula: float32, bias, temperature, log_softmax over V, gather; entropy."""
    bias = torch.zeros(logits.shape[-1])
    bias[banned] = -100.0
    z = (logits.float() + bias) / temperature
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, ids[..., None])[..., 0] * mask
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def test_chunked_logprobs_entropy_and_gradients_equal_the_whole_formula():
    """response_logprobs in chunks of 1, 4 and all 11 tokens and its default size: the log-probs,
    their gradient w.r.t. the logits (each token weighted differently) and the entropy equal the
    whole-sequence formula; float32 and bfloat16 logits, rows of 11, 7 and 1 tokens; no_grad too."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 11, 50
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T) < torch.tensor([[11], [7], [1]])).float()
    w = torch.randn(B, T, generator=g)
    # rtol 1e-6: a float32 ulp of log-probs near -19; bf16 gradients may round an ulp apart
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2 ** -8)):
        logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
        x = logits.clone().requires_grad_()
        ref, ref_entropy = whole_logprobs(x, ids, mask, 0.7, [2, 5])
        (ref * w).sum().backward()
        for chunk in (1, 4, 11, None):
            y = logits.clone().requires_grad_()
            kw = dict(temperature=0.7, banned_ids=[2, 5], with_entropy=True, chunk=chunk)
            logp, entropy = modeling.response_logprobs(y, ids, mask, **kw)
            (logp * w).sum().backward()
            assert torch.allclose(logp, ref, atol=1e-6, rtol=1e-6), chunk
            assert torch.all(logp[mask == 0] == 0)
            assert torch.allclose(y.grad.float(), x.grad.float(), atol=tol, rtol=0), (dtype, chunk)
            assert torch.allclose(entropy, ref_entropy, atol=1e-6, rtol=1e-6), chunk
        with torch.no_grad():
            logp = modeling.response_logprobs(logits, ids, mask, temperature=0.7, banned_ids=[2, 5],
                                              chunk=4)
        assert torch.allclose(logp, ref, atol=1e-6, rtol=1e-6)


def test_token_logprobs_keeps_no_vocab_sized_float32_tensor_for_backward(tiny_dir, monkeypatch):
    """With a bf16 model (bf16 logits, as on a GPU) in 4-token chunks, the float32 tensors with a
    vocabulary axis that token_logprobs saves for backward take far less than one float32 (B, T, V)
    copy (log_softmax's output, which the whole-sequence formula keeps); backward still runs.
    Only the chunks' inputs, views of the bf16 logits the model returns, are kept."""
    processor, samples = make_batch(tiny_dir)
    policy = modeling.load_model(tiny_dir[0], dtype=torch.bfloat16)
    V = policy.config.get_text_config().vocab_size
    batch = data.collate(samples, processor.tokenizer.pad_token_id)
    B, T = batch["response_ids"].shape
    monkeypatch.setattr(modeling, "LOGP_CHUNK_BYTES", 4 * B * V * 4, raising=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logp, _ = modeling.token_logprobs(policy, batch, temperature=0.8, banned_ids=[3],
                                          with_entropy=True)
    fp32_vocab = [t for t in saved if t.dtype == torch.float32 and t.dim() and t.shape[-1] == V]
    fp32_bytes = sum(t.numel() * 4 for t in fp32_vocab)
    assert T > 8 and fp32_bytes < B * T * V * 4 // 8, (fp32_bytes, B * T * V * 4)
    logp.sum().backward()
    assert policy.lm_head.weight.grad.abs().sum() > 0
