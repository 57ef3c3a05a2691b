"""The training-side model: load Qwen2.5-VL or Qwen3-VL, wrap it in FSDP2, per-token log-probs,
save it for transformers and vLLM.

- `apply_fsdp`: the FSDP2 wrap (torchtitan's recipe) with its memory options; `load_fsdp_model`
  builds it on the meta device and fills it from rank 0's one copy of the weights.
- LoRA (lora.py) is applied before the wrap; attention and the patch embedding: patches.py.
- `token_logprobs`: log p(response token) with explicit 3-D mRoPE positions; a group's shared
  prompt runs once. Checkpoints (sharded, resumable): checkpoints.py.
"""
import json
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)
from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy,
                                    fully_shard)
from torch.utils.checkpoint import checkpoint
from transformers import (AutoConfig, DynamicCache, GenerationConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration)

import grpo
import patches
from lora import apply_lora, hf_state_dict


# ----------------------------------------------------------------------------- loading and FSDP2
# The architectures trained here, by config.model_type (Qwen3-VL's MoE variants are not).
MODEL_CLASSES = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
                 "qwen3_vl": Qwen3VLForConditionalGeneration}


def model_class(config):
    if config.model_type not in MODEL_CLASSES:
        raise ValueError(f"model type {config.model_type!r} is not one of {list(MODEL_CLASSES)}")
    return MODEL_CLASSES[config.model_type]


def load_model(path, *, dtype=torch.float32, device="cpu"):
    """Qwen2.5-VL or Qwen3-VL from a hub id or local folder, whole, on one device."""
    config = AutoConfig.from_pretrained(path)
    model = model_class(config).from_pretrained(
        path, config=config, dtype=dtype, attn_implementation=patches.attention_implementation())
    return patches.linear_patch_embed(model).to(device)


def unwrapped_name(name):
    """A parameter's or buffer's name without the prefixes that activation checkpointing and
    torch.compile insert: the name in the plain model."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def apply_fsdp(model, mesh, *, param_dtype=torch.float32, reduce_dtype=torch.float32,
               reshard_after_forward=True, cpu_offload=False, activation_checkpointing=False,
               freeze_vision=False, freeze_merger=False, freeze_llm=False):
    """FSDP2 as torchtitan does it: each vision block and decoder layer is its own unit (gathered
    just before it runs, freed after), then the merger, the rest of the vision tower and the root.
    Compute in param_dtype, reduce in reduce_dtype; the sharded copy the optimizer updates keeps
    the loaded dtype. The options are the flags of the same names. The root is never resharded
    after forward (backward starts there), so build the optimizer before any forward. cpu_offload
    on GPUs needs a CPU backend too ("cuda:nccl,cpu:gloo"): the grad-norm all-reduce runs on the
    offloaded gradients. Activation checkpointing wraps before fully_shard, so FSDP's hooks stay
    outside the recompute; names gain "_checkpoint_wrapped_module." (see unwrapped_name). Each
    frozen part is a unit of its own, with no gradient to reduce at all."""
    visual, lm = model.model.visual, model.model.language_model
    # Qwen3-VL's vision tower adds a learned position embedding, and mergers into early decoder
    # layers (deepstack); both architectures name the rest alike.
    mergers = [visual.merger, *getattr(visual, "deepstack_merger_list", [])]
    tower = [visual.patch_embed, visual.blocks, getattr(visual, "pos_embed", None)]
    for parts, frozen in ((tower, freeze_vision), (mergers, freeze_merger),
                          ([lm, model.lm_head], freeze_llm)):
        for part in parts if frozen else []:
            if part is not None:
                part.requires_grad_(False)
    if activation_checkpointing:
        for blocks in (visual.blocks, lm.layers):
            for i, block in enumerate(blocks):
                blocks[i] = checkpoint_wrapper(block)  # non-reentrant (use_reentrant=False)
    # Pinned host memory makes the copies to the GPU asynchronous; a CPU-only torch cannot pin.
    pin = torch.cuda.is_available()
    offload = CPUOffloadPolicy(pin_memory=pin) if cpu_offload else OffloadPolicy()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    options = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    for unit in (*visual.blocks, *mergers, visual, *lm.layers):
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, **options)
    model.reshard_after_forward = reshard_after_forward  # what rollout.generate_hf restores
    return model


def load_fsdp_model(path, mesh, *, rank, master_dtype=torch.float32, lora=None, **fsdp_options):
    """The FSDP2-wrapped model (apply_fsdp with `fsdp_options`) with at most one full copy in host
    memory: every rank builds the model on the meta device, wraps it and allocates only its shards;
    rank 0 alone reads the weights and broadcasts them tensor by tensor (as verl's
    fsdp2_load_full_state_dict). master_dtype: the optimizer's copy; in bfloat16 an update under
    ~2^-9 of a weight rounds away and training silently stalls (EasyR1 pairs pure bf16 with a
    Kahan-summing AdamW). lora: apply_lora's keywords, applied to the meta model and to rank 0's
    copy alike, so the names match and every rank gets rank 0's adapters."""
    with torch.device("meta"):
        config = AutoConfig.from_pretrained(path)
        model = model_class(config)._from_config(
            config, dtype=master_dtype, attn_implementation=patches.attention_implementation())
    try:  # config.json names one eos (<|im_end|>); Qwen's generation_config.json adds <|endoftext|>
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # the folder has none
        pass
    patches.linear_patch_embed(model)
    if lora:
        apply_lora(model, **lora)
    apply_fsdp(model, mesh, **fsdp_options)
    cuda = mesh.device_type == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model.to_empty(device=device)  # on the GPU even with cpu_offload: NCCL broadcasts from there
    full = load_model(path, dtype=master_dtype) if rank == 0 else None
    if lora and rank == 0:
        apply_lora(full, **lora)
    set_model_state_dict(model, full.state_dict() if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Non-persistent buffers (the text and vision rotary inv_freq, computed in __init__) are in no
    # state dict, and on the meta device they were never computed: take rank 0's.
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if rank == 0:
                buf.copy_(full.get_buffer(unwrapped_name(name)))
            dist.broadcast(buf, src=0)
    if fsdp_options.get("cpu_offload"):
        model.to("cpu")  # FSDP2 requires the shards in host memory; the buffers go back to the GPU
        for buf in model.buffers():
            buf.data = buf.data.to(device)
    return model


# ----------------------------------------------------------------------------- log-probs
def mrope_position_ids(input_ids, attention_mask, image_grid_thw, *, image_token_id, merge_size):
    """Qwen2.5-VL's 3-D rotary positions (3, B, L): text tokens count up on all three axes; the
    tokens of an image with merged grid (t, h, w) take (start + t_idx, start + h_idx, start + w_idx)
    and the text after it resumes at start + max(h, w). Padding gets 0. Written out, as
    transformers' get_rope_index changes signature across versions; tests check both agree.
    Qwen3-VL's are the same for images (it differs for video: timestamps; it interleaves the
    axes over the rotary frequencies, inside its rotary embedding)."""
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


def vlm_forward(model, batch, position_ids, **kwargs):
    """model(...) on a padded batch that always runs the vision tower: a batch without images runs
    it on a dummy 28x28 image whose output is added times 0 to the text embeddings. Under FSDP a
    rank that skipped the tower would leave the others waiting in its collectives (EasyR1 #468,
    verl #3491), e.g. with text-only and image rows in one dataset. The hook runs inside the
    root's forward, where FSDP expects it."""
    cfg, hook = model.config, None
    if batch.get("pixel_values") is None:
        def add_dummy_vision(module, args, kw):
            vis = cfg.vision_config
            pixels = torch.zeros(4, vis.in_channels * vis.temporal_patch_size * vis.patch_size ** 2,
                                 device=batch["input_ids"].device)
            grid = torch.tensor([[1, 2, 2]], device=pixels.device)
            out = model.model.get_image_features(pixels, grid)
            # Qwen3-VL's deepstack mergers (features for early decoder layers) must run too.
            total = 0
            for f in (out.pooler_output, *(getattr(out, "deepstack_features", None) or [])):
                total = total + (torch.cat(f) if isinstance(f, (list, tuple)) else f).sum()
            embeds = kw["inputs_embeds"]
            kw["inputs_embeds"] = embeds + 0.0 * total.to(embeds.dtype)
            return args, kw

        hook = model.model.language_model.register_forward_pre_hook(add_dummy_vision,
                                                                    with_kwargs=True)
    try:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=position_ids, pixel_values=batch.get("pixel_values"),
                     image_grid_thw=batch.get("image_grid_thw"), **kwargs)
    finally:
        if hook is not None:
            hook.remove()


def shared_prompt_logits(model, batch, position_ids):
    """The (B, T, V) logits predicting each response token when rows share prompts: each distinct
    prompt (and image) runs once, its keys/values are copied to its responses, which run on top of
    them. G responses cost one prompt forward, not G (Prefix Grouper's shared prefix, arXiv
    2506.05433); the gradient reaches the prompt through the copies. Each cache is left as the
    forward found it, so a layer recomputed by activation checkpointing sees the same keys again."""
    idx, ids, mask = batch["prompt_index"], batch["response_ids"], batch["response_mask"]
    prompt_cache = DynamicCache()
    out = vlm_forward(model, batch, position_ids, past_key_values=prompt_cache, use_cache=True,
                      logits_to_keep=1)
    first = out.logits[idx]  # (B, 1, V): the last prompt position predicts response token 0
    if ids.shape[1] == 1:
        return first
    prefix = [(layer.keys[idx], layer.values[idx]) for layer in prompt_cache.layers]
    for layer in prompt_cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :0], layer.values[:, :, :0]
    cache = DynamicCache()
    for i, (k, v) in enumerate(prefix):
        cache.update(k, v, i)
    start = position_ids.amax(dim=(0, 2))[idx] + 1  # text after the prompt continues on all 3 axes
    pos = (start[:, None] + torch.arange(ids.shape[1] - 1, device=ids.device)).expand(3, -1, -1)
    prompt_mask = batch["attention_mask"][idx]
    attention_mask = torch.cat([prompt_mask, mask[:, :-1].to(prompt_mask.dtype)], 1)
    rest = model(input_ids=ids[:, :-1], attention_mask=attention_mask, position_ids=pos,
                 past_key_values=cache, use_cache=True).logits  # (B, T-1, V): token t predicts t+1
    for layer, (k, v) in zip(cache.layers, prefix):
        layer.keys, layer.values = k, v
    return torch.cat([first, rest], 1)


def token_logprobs(model, batch, *, temperature=1.0, banned_ids=(), with_entropy=False):
    """log pi(response token) under `model`, (B, T), 0 where response_mask is 0 (response_logprobs).
    Only the T+1 last positions go through lm_head (logits_to_keep): no prompt logits."""
    ids, T, cfg = batch["response_ids"], batch["response_ids"].shape[1], model.config
    position_ids = mrope_position_ids(batch["input_ids"], batch["attention_mask"],
                                      batch.get("image_grid_thw"),
                                      image_token_id=cfg.image_token_id,
                                      merge_size=cfg.vision_config.spatial_merge_size)
    if "prompt_index" in batch:  # data.collate(share_prompts=True)
        logits = shared_prompt_logits(model, batch, position_ids)
    else:  # (B, T, V) in the compute dtype: position P-1+t predicts response token t
        out = vlm_forward(model, batch, position_ids, logits_to_keep=T + 1, use_cache=False)
        logits = out.logits[:, :-1]
    return response_logprobs(logits, ids, batch["response_mask"], temperature=temperature,
                             banned_ids=banned_ids, with_entropy=with_entropy)


LOGP_CHUNK_BYTES = 2 ** 28  # float32 logits per chunk: 256 MiB, 110 tokens of 4 rows of V=152064


def _sampler_logits(logits, bias, temperature):
    return (logits.float() + bias) / temperature  # float32: exp and sums over V need its mantissa


def _chunk_logp(logits, ids, bias, temperature):  # (B, c, V), (B, c) -> log p(ids) (B, c)
    logp_all = torch.log_softmax(_sampler_logits(logits, bias, temperature), dim=-1)
    return logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def response_logprobs(logits, ids, mask, *, temperature=1.0, banned_ids=(), with_entropy=False,
                      chunk=None):
    """(B, T, V) logits -> log p(ids) (B, T), 0 where mask is 0 [, entropy (B, T)], as the sampler
    reports them: (logits + bias) / temperature, the bias -100 on banned (image) tokens as vLLM's
    logit_bias applies it. `chunk` tokens at a time (default: LOGP_CHUNK_BYTES of float32): whole,
    each float32 copy of a 7B's (4, 2048, 152064) logits is 4.6 GiB. Each chunk is checkpointed:
    backward recomputes its float32 temporaries from the compute-dtype logits."""
    B, T, V = logits.shape
    chunk = chunk or max(1, LOGP_CHUNK_BYTES // (4 * B * V))
    bias = torch.zeros(V, device=logits.device)
    bias[list(banned_ids)] = -100.0
    grad = torch.is_grad_enabled() and logits.requires_grad
    parts = []  # split, not slices: backward then makes one (B, T, V) gradient, not one per chunk
    for x, i in zip(logits.split(chunk, 1), ids.split(chunk, 1)):
        args = (_chunk_logp, x, i, bias, temperature)
        parts.append(checkpoint(*args, use_reentrant=False, preserve_rng_state=False) if grad else
                     _chunk_logp(*args[1:]))
    logp = torch.where(mask.bool(), torch.cat(parts, 1), 0.0)
    if not with_entropy:
        return logp
    with torch.no_grad():  # of the sampling distribution, for logging
        entropy = [grpo.token_entropy(_sampler_logits(x, bias, temperature))
                   for x in logits.split(chunk, 1)]
    return logp, torch.cat(entropy, 1)


# ----------------------------------------------------------------------------- saving
def save_hf(model, processor, out_dir, *, rank):
    """A consolidated save_pretrained folder (model + processor) that transformers and vLLM load,
    LoRA merged in. Gathering the full state dict is collective: every rank calls; rank 0 writes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, state_dict=hf_state_dict(model, state))
        processor.save_pretrained(out_dir)
    return out_dir


def save_lora_adapter(model, out_dir, *, rank):
    """The adapters alone, as PEFT saves them (for PeftModel.from_pretrained, vLLM's LoRARequest):
    adapter_model.safetensors (`base_model.model.<m>.lora_A.weight` (rank, in), `.lora_B.weight`)
    and adapter_config.json. Collective under FSDP (each adapter is all-gathered); rank 0 writes."""
    tensors = {}
    for name, p in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):  # under FSDP2 a DTensor shard
            p = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
            tensors[f"base_model.model.{unwrapped_name(name)}.weight"] = p.cpu().contiguous()
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
        lora = model.lora
        # target_modules as a regex, which PEFT full-matches: a list would take the vision MLP too.
        targets = "|".join(lora["targets"])
        config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=lora["rank"],
                      lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], bias="none",
                      base_model_name_or_path=model.config.name_or_path,
                      target_modules=rf".*\.language_model\.layers\.\d+\..*\.({targets})")
        with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return out_dir
