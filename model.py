"""The training-side model: load Qwen2.5-VL, wrap it in FSDP2, per-token log-probs, save.

- `build_tiny_model` makes a random ~1M-parameter Qwen2.5-VL with a locally trained tokenizer and a
  real processor, so everything (tests, the default CPU run) works with no download.
- `apply_fsdp` is the whole FSDP2 wrap: one `fully_shard` per vision block and per decoder layer,
  then the root (the torchtitan recipe).
- `token_logprobs` runs the forward with explicit 3-D mRoPE positions and returns log p(token) for
  the response tokens only.
"""
import os

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import Qwen2_5_VLForConditionalGeneration

import grpo

# Qwen's special tokens, in Qwen2.5-VL's order (their ids follow the BPE vocabulary in the tiny model).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2's pre-tokenizer split: contractions, letters, single digits, punctuation runs, spaces.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The Qwen2.5-VL chat template (images only): a default system turn, one
# <|vision_start|><|image_pad|><|vision_end|> per image item, text items verbatim.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(out_dir, texts, *, seed=0, vocab_size=1024, min_pixels=56 * 56, max_pixels=112 * 112):
    """Write a random tiny Qwen2.5-VL (model, tokenizer, processor) that transformers and vLLM load.

    texts: the corpus the byte-level BPE is trained on (the prompts and answers it will see).
    Shapes follow vLLM's CPU limits: text head_dim 32 (16 fails there) and mrope_section summing to
    head_dim / 2. Deterministic for a seed.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    bpe.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHAT_TEMPLATE, model_max_length=32768)
    tok.padding_side = "left"
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    text = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                  fullatt_block_indexes=[1], window_size=112)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                              image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"],
                              bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                              pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- loading and FSDP2
def load_model(path, *, dtype=torch.float32, device="cpu"):
    """Qwen2.5-VL from a hub id or local folder, with flash-attention 2 when it is importable (GPU)
    and PyTorch SDPA otherwise."""
    try:
        import flash_attn  # noqa: F401
        attn = "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    except ImportError:
        attn = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    return model.to(device)


def apply_fsdp(model, mesh, *, param_dtype=torch.float32, reduce_dtype=torch.float32):
    """FSDP2, as torchtitan does it: each vision block and each decoder layer is its own unit (its
    parameters are all-gathered just before it runs and freed after), the root holds the rest
    (embeddings, patch embed, merger, final norm, lm_head). Mixed precision: compute in
    param_dtype, reduce gradients in reduce_dtype (bf16 compute with fp32 reduction on GPUs)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.model.visual.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


# ----------------------------------------------------------------------------- log-probs
def mrope_position_ids(input_ids, attention_mask, image_grid_thw, *, image_token_id, merge_size):
    """Qwen2.5-VL's 3-D rotary positions (3, B, L): text tokens count up on all three axes; the
    tokens of an image with merged grid (t, h, w) take (start + t_idx, start + h_idx, start + w_idx)
    and the text after it resumes at start + max(h, w). Padding (mask 0) gets position 0.
    Written out here rather than calling transformers' get_rope_index, whose signature changes
    across versions; a test checks both agree. Left padding is harmless: positions count valid tokens.
    """
    B, L = input_ids.shape
    pos = torch.zeros(3, B, L, dtype=torch.long, device=input_ids.device)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    for b in range(B):
        valid = attention_mask[b].bool()
        ids = input_ids[b][valid].tolist()
        out, cur, i = [], 0, 0
        while i < len(ids):
            if ids[i] == image_token_id:
                t, h, w = next(grids)
                h, w = h // merge_size, w // merge_size
                grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w),
                                                  indexing="ij")).reshape(3, -1)  # (3, t*h*w)
                out.append(grid + cur)
                cur += max(h, w)
                i += t * h * w
            else:
                j = i
                while j < len(ids) and ids[j] != image_token_id:
                    j += 1
                out.append(torch.arange(cur, cur + j - i).expand(3, -1))
                cur += j - i
                i = j
        pos[:, b, valid] = torch.cat(out, dim=1).to(pos.device)
    return pos


def token_logprobs(model, batch, *, temperature=1.0, banned_ids=(), with_entropy=False):
    """log pi(response token) under `model`, (B, T), 0 where response_mask is 0.

    Matches what the sampler reports: logits / temperature with the banned (image) tokens pushed
    down by 100, as vLLM's logit_bias does before its processed log-probs. Only the T+1 last
    positions go through lm_head (logits_to_keep), so prompt logits are never materialised.
    """
    T = batch["response_ids"].shape[1]
    cfg = model.config
    position_ids = mrope_position_ids(batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"),
                                      image_token_id=cfg.image_token_id,
                                      merge_size=cfg.vision_config.spatial_merge_size)
    # A micro-batch without images still runs the vision tower, on a dummy 28x28 image whose output
    # is added times 0 to the text embeddings: under FSDP a rank that skipped the tower would leave
    # the others waiting in its collectives (EasyR1 #468, verl #3491), e.g. with text-only and image
    # rows in one dataset. The hook runs inside the root's forward, where FSDP expects it.
    hook = None
    if batch.get("pixel_values") is None:
        def add_dummy_vision(module, args, kwargs):
            vis = cfg.vision_config
            pixels = torch.zeros(4, vis.in_channels * vis.temporal_patch_size * vis.patch_size ** 2,
                                 device=batch["input_ids"].device)
            features = model.model.get_image_features(pixels, torch.tensor([[1, 2, 2]], device=pixels.device))
            features = getattr(features, "pooler_output", features)  # an output object in transformers 5.x
            features = torch.cat(features) if isinstance(features, (list, tuple)) else features
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"] + 0.0 * features.sum().to(kwargs["inputs_embeds"].dtype)
            return args, kwargs

        hook = model.model.language_model.register_forward_pre_hook(add_dummy_vision, with_kwargs=True)
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=position_ids,
                    pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
                    logits_to_keep=T + 1, use_cache=False)
    finally:
        if hook is not None:
            hook.remove()
    logits = out.logits[:, :-1].float()  # (B, T, V): position P-1+t predicts response token t
    if banned_ids:
        bias = torch.zeros(logits.shape[-1], device=logits.device)
        bias[list(banned_ids)] = -100.0
        logits = logits + bias
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch["response_ids"].unsqueeze(-1)).squeeze(-1)
    logp = torch.where(batch["response_mask"].bool(), logp, torch.zeros_like(logp))
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = grpo.token_entropy(logits)  # of the sampling distribution, for logging
    return logp, entropy


# ----------------------------------------------------------------------------- saving
def save_hf(model, processor, out_dir, *, rank):
    """A consolidated save_pretrained folder (model + processor) that transformers and vLLM load.
    Gathering the full state dict is collective: every rank calls this; rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, state_dict=state)
        processor.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, model, optimizer, extra, *, rank):
    """Sharded model + optimizer (torch.distributed.checkpoint: each rank writes its own shards) and
    this rank's `extra` (step, data position, RNG states). Written to `path.tmp` and renamed when
    every rank is done, so a crash mid-save never leaves a folder that looks complete."""
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path + ".tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)  # the remains of a save that crashed
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    torch.save(extra, os.path.join(tmp, f"extra_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        os.rename(tmp, path)
    dist.barrier()


def load_checkpoint(path, model, optimizer, *, rank):
    """Restore what save_checkpoint wrote, in place; returns this rank's `extra`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return torch.load(os.path.join(path, f"extra_rank{rank}.pt"), weights_only=False)
