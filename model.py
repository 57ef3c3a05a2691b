"""The training-side model: load Qwen2.5-VL, wrap it in FSDP2, per-token log-probs, save.

- `apply_fsdp`: the FSDP2 wrap (torchtitan's recipe) with its memory options; `load_fsdp_model`
  builds it on the meta device and fills it from rank 0's one copy of the weights.
- `apply_lora`: hand-written LoRA; `merge_lora` back to plain HF weights; PEFT's adapter files.
- `token_logprobs`: log p(response token) with explicit 3-D mRoPE positions; a group's shared
  prompt runs once. Checkpoints: sharded save/load (DCP); export.py makes an HF folder of one.
"""
import json
import os
import pathlib
import pickle
import shutil
import types

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_fs
import torch.distributed.checkpoint.metadata as dcp_md
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy,
                                    fully_shard)
from torch.utils.checkpoint import checkpoint
from transformers import (AttentionInterface, AutoConfig, DynamicCache, GenerationConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import grpo


# ----------------------------------------------------------------------------- loading and FSDP2
def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention minus a copy. Under a padding mask it repeats each K/V head for
    its query heads (repeat_kv: SDPA's enable_gqa runs unmasked only), copying the whole KV cache
    per layer and decoded token. Here a K/V head's query heads are stacked along the query axis,
    (B, H, L, D) -> (B, H_kv, groups * L, D), the mask repeated to match: the same attention,
    uncopied (flash-decoding's grouping of query heads). Only for queries shorter than
    2 * H_kv * D tokens, where the repeated mask (kept for backward) costs less than the copy."""
    groups = query.shape[1] // key.shape[1]
    if groups == 1 or attention_mask is None or query.shape[2] >= 2 * key.shape[1] * key.shape[3]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    B, H, L, D = query.shape
    out = F.scaled_dot_product_attention(query.reshape(B, H // groups, groups * L, D), key, value,
                                         dropout_p=dropout, scale=scaling,
                                         attn_mask=attention_mask.repeat(1, 1, groups, 1))
    return out.reshape(B, H, L, D).transpose(1, 2).contiguous(), None


def sdpa_mask_no_empty_rows(*args, **kwargs):
    """transformers' sdpa_mask with every query row that may see no key opened to all keys. A
    left-padded position is one: causal and padding leave it nothing, and some SDPA kernels (cuDNN:
    huggingface/transformers#47651) return NaN there, which reaches the gradients. transformers 5
    no longer fixes such rows (4.x did); nothing reads the output of a padded position."""
    mask = sdpa_mask(*args, **kwargs)  # None: no mask needed (causal, no padding)
    return mask if mask is None or mask.dtype != torch.bool else mask | ~mask.any(-1, keepdim=True)


AttentionInterface.register("sdpa_grouped", grouped_sdpa)
AttentionMaskInterface.register("sdpa_grouped", sdpa_mask_no_empty_rows)


def attention_implementation():
    """flash-attention 2 when it is importable and there is a GPU, else SDPA (grouped_sdpa)."""
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2" if torch.cuda.is_available() else "sdpa_grouped"
    except ImportError:
        return "sdpa_grouped"


def linear_patch_embed(model):
    """The vision tower's patch embedding run as the matmul it is: its Conv3d has kernel == stride
    and every input is one kernel's worth of pixels, so it is x @ W.view(out, -1).T. torch 2.9
    dropped cuDNN's Conv3d for it (pytorch#166122; 10-50,000x slower on some GPUs and dtypes,
    transformers#45750); on CPU the conv is 3.5x slower. vLLM makes the same swap
    (Conv3dLayer._forward_mulmat), so sampler and trainer compute it alike. Same parameter."""
    embed = model.model.visual.patch_embed
    proj = embed.proj
    assert proj.kernel_size == proj.stride, "not a plain strided Conv3d"
    # Bound to this module, so a deepcopy runs on its own weights.
    embed.forward = types.MethodType(_patch_embed_matmul, embed)
    return model


def _patch_embed_matmul(self, x):
    w = self.proj.weight
    return F.linear(x.to(w.dtype), w.reshape(self.proj.out_channels, -1), self.proj.bias)


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
    model = model_class(config).from_pretrained(path, config=config, dtype=dtype,
                                                attn_implementation=attention_implementation())
    return linear_patch_embed(model).to(device)


def load_processor(path, **kwargs):
    """AutoProcessor.from_pretrained(path, **kwargs), or a stop that says what to change in older
    Qwen2.5-VL folders whose preprocessor_config.json names "Qwen2_5_VLImageProcessor":
    transformers 5 has no such class (huggingface/transformers#36193) and vLLM 0.32 fails on them
    too, with a hint at trust_remote_code that does not help."""
    try:
        return transformers.AutoProcessor.from_pretrained(path, **kwargs)
    except ValueError as e:
        if "Unrecognized image processor" not in str(e):
            raise
    raise ValueError(f"{path}: preprocessor_config.json names an image processor that "
                     f"transformers {transformers.__version__} does not have (older Qwen2.5-VL "
                     'folders say "Qwen2_5_VLImageProcessor"). Qwen2.5-VL uses Qwen2-VL\'s: set '
                     '"image_processor_type": "Qwen2VLImageProcessor" in that file.')


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
        model = model_class(config)._from_config(config, dtype=master_dtype,
                                                 attn_implementation=attention_implementation())
    try:  # config.json names one eos (<|im_end|>); Qwen's generation_config.json adds <|endoftext|>
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # the folder has none
        pass
    linear_patch_embed(model)
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


# ----------------------------------------------------------------------------- LoRA
class LoRALinear(torch.nn.Module):
    """y = base(x) + dropout(x) @ A^T @ B^T * alpha / rank (Hu et al. 2021), `base` frozen. PEFT's
    init: A (rank, in) kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(in)), B (out, rank) zeros."""

    def __init__(self, base, *, rank, alpha, dropout, generator):
        super().__init__()
        self.base, self.scale, self.dropout = base, alpha / rank, torch.nn.Dropout(dropout)
        A = torch.nn.init.kaiming_uniform_(torch.empty(rank, base.in_features), a=5 ** 0.5,
                                           generator=generator)
        # Drawn on the CPU, then moved to base's device and dtype.
        self.lora_A = torch.nn.Parameter(A.to(base.weight))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank).to(base.weight))

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale


def apply_lora(model, *, rank, alpha, dropout=0.0, seed=0,
               targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj")):
    """Freeze `model`, then wrap each nn.Linear named one of `targets` in the language model's
    layers (not the vision tower, whose MLP is named alike) in a LoRALinear; before FSDP. Names:
    `<m>.base.weight`, `<m>.base.bias` (frozen), `<m>.lora_A` (rank, in), `<m>.lora_B` (out, rank).
    A comes from a generator seeded with `seed`: every rank draws the same. `model.lora` keeps the
    settings, for the savers."""
    model.requires_grad_(False)
    generator, layers = torch.Generator().manual_seed(seed), model.model.language_model.layers
    for name, module in list(layers.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in targets:
            layers.set_submodule(name, LoRALinear(module, rank=rank, alpha=alpha, dropout=dropout,
                                                  generator=generator))
    model.lora = dict(rank=rank, alpha=alpha, dropout=dropout, targets=list(targets), seed=seed)
    return model


def merge_lora(named_tensors, *, scale):
    """(name, full tensor) pairs of a LoRA model (rollout.full_weights, a state dict) under the
    plain HF names: `<m>.weight` = base.weight + scale * lora_B @ lora_A (in float32), `<m>.bias` =
    base.bias, the rest as they come. A module's three tensors may come in any order."""
    pending = {}  # module -> {"weight", "lora_A", "lora_B"} so far
    for name, t in named_tensors:
        module, _, leaf = name.rpartition(".")
        if module.endswith(".base") and leaf == "bias":
            yield module.removesuffix(".base") + ".bias", t
        elif module.endswith(".base") or leaf in ("lora_A", "lora_B"):
            module = module.removesuffix(".base")
            pending.setdefault(module, {})[leaf] = t
            if len(pending[module]) == 3:
                w, A, B = map(pending.pop(module).get, ("weight", "lora_A", "lora_B"))
                yield module + ".weight", (w.float() + scale * (B.float() @ A.float())).to(w.dtype)
        else:
            yield name, t
    assert not pending, f"LoRA modules missing a tensor: {sorted(pending)}"


def merged_hf_weights(model, named_tensors):
    """(name, full tensor) pairs of `model` under the plain Qwen2.5-VL names: adapters merged."""
    lora = getattr(model, "lora", None)
    return merge_lora(named_tensors, scale=lora["alpha"] / lora["rank"]) if lora else named_tensors


def hf_state_dict(model, state):
    return dict(merged_hf_weights(model, state.items()))  # a full state dict, plain names


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


# ----------------------------------------------------------------------------- checkpoints
def _fsync(path):
    fd = os.open(path, os.O_RDONLY)  # a file, or a folder: its entries (new files, renames) too
    os.fsync(fd)
    os.close(fd)


def save_checkpoint(path, model, optimizer, extra, *, rank):
    """Sharded model + optimizer (torch.distributed.checkpoint: each rank writes its own shards),
    this rank's `extra` (step, data position, RNG states, as plain data and tensors) and
    checkpoint.json (world size, file sizes). Written to `path.tmp`, fsynced and renamed when every
    rank is done, so a crash mid-save never leaves a folder that looks complete. An existing `path`
    (a rerun, a resume from an older step) is replaced."""
    tmp = path + ".tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)  # the remains of a save that crashed
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)  # fsyncs its files
    torch.save(extra, os.path.join(tmp, f"extra_rank{rank}.pt"))
    _fsync(os.path.join(tmp, f"extra_rank{rank}.pt"))
    if rank == 0 and getattr(model, "lora", None):  # export.py rebuilds the adapters from it
        with open(os.path.join(tmp, "lora.json"), "w") as f:
            json.dump(model.lora, f)
        _fsync(os.path.join(tmp, "lora.json"))
    dist.barrier()
    if rank == 0:
        files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, "checkpoint.json"), "w") as f:
            json.dump({"world_size": dist.get_world_size(), "files": files}, f)
        _fsync(os.path.join(tmp, "checkpoint.json"))
        _fsync(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
        _fsync(os.path.dirname(os.path.abspath(path)))
    dist.barrier()


def checkpoint_problem(path, world_size=None):
    """What keeps `path` from being a whole save_checkpoint folder (of `world_size` ranks if
    given), naming the folder and file; None if nothing. Cheap, no tensor is read: every file must
    have its size in checkpoint.json, and DCP's .metadata, which DCP reads with a plain
    pickle.load, may name only the classes DCP writes there, so a crafted one runs nothing. Another
    world size is refused: each rank's extra state (data position, RNGs) is its own."""
    here = dcp_md.__name__  # the dataclasses and enums DCP defines for its metadata
    safe = {(here, k) for k, v in vars(dcp_md).items() if getattr(v, "__module__", 0) == here}
    safe |= {(dcp_fs.__name__, "_StorageInfo"), ("torch.serialization", "_get_layout")}
    dtypes = {k for k, v in vars(torch).items() if isinstance(v, torch.dtype)}
    safe |= {("torch", k) for k in dtypes | {"Size"}}
    safe |= {(c.__module__, c.__name__) for c in (pathlib.PosixPath, pathlib.WindowsPath)}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in safe:
                raise pickle.UnpicklingError(f"{module}.{name} may not be in checkpoint metadata")
            return super().find_class(module, name)

    name = "checkpoint.json"
    try:
        with open(os.path.join(path, name)) as f:
            saved = json.load(f)
        ranks = saved["world_size"]
        for name, size in saved["files"].items():
            if (got := os.path.getsize(os.path.join(path, name))) != size:
                return f"checkpoint {path}: {name} has {got} bytes, {size} when saved"
        name = ".metadata"
        with open(os.path.join(path, name), "rb") as f:
            Unpickler(f).load()
    except Exception as e:  # a missing file, bad JSON, a refused pickle: the folder is unusable
        why = "missing" if isinstance(e, FileNotFoundError) else e
        return f"checkpoint {path}: {name}: {why}"
    if world_size not in (None, ranks):
        return f"checkpoint {path} was saved by {ranks} ranks, not {world_size}"
    return None


def load_checkpoint(path, model, optimizer, *, rank):
    """Restore what save_checkpoint wrote, in place; returns this rank's `extra`. A
    checkpoint_problem is a ValueError, before anything loads. No pickle runs code."""
    class WeightsOnlyPlanner(dcp.DefaultLoadPlanner):
        # DCP unpickles non-tensor entries (lr, betas) with weights_only=False: check them first
        def load_bytes(self, read_item, value):
            torch.load(value, weights_only=True)
            value.seek(0)
            super().load_bytes(read_item, value)

    if problem := checkpoint_problem(path, dist.get_world_size()):
        raise ValueError(problem)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path, planner=WeightsOnlyPlanner())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return torch.load(os.path.join(path, f"extra_rank{rank}.pt"), weights_only=True)
