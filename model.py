"""The training-side model: load Qwen2.5-VL, wrap it in FSDP2, per-token log-probs, save.

- `build_tiny_model` makes a random ~1M-parameter Qwen2.5-VL with a locally trained tokenizer and a
  real processor, so everything (tests, the default CPU run) works with no download.
- `apply_fsdp` is the whole FSDP2 wrap (the torchtitan recipe), its memory options and freezing;
  `load_fsdp_model` builds it on the meta device and fills it from rank 0's one copy of the weights.
- `apply_lora` (hand-written LoRA on the language model), `merge_lora` back to plain HF weights for
  vLLM and exports, `save_lora_adapter` in PEFT's format.
- `token_logprobs` runs the forward with explicit 3-D mRoPE positions and returns log p(token) for
  the response tokens only; a group's shared prompt runs once (`shared_prompt_logits`).
- Checkpoints: sharded save/load (DCP); `export_checkpoint` (`python model.py export`) to an HF folder.
"""
import json
import os
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, Qwen2_5_VLForConditionalGeneration
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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


def build_tiny_model(out_dir, texts, *, seed=0, vocab_size=1024, min_pixels=56 * 56,
                     max_pixels=112 * 112, tie_word_embeddings=False):
    """Write a random tiny Qwen2.5-VL (model, tokenizer, processor) that transformers and vLLM load.

    texts: the corpus the byte-level BPE is trained on (the prompts and answers it will see).
    Shapes follow vLLM's CPU limits: text head_dim 32 (16 fails there) and mrope_section summing to
    head_dim / 2. Deterministic for a seed. tie_word_embeddings: lm_head shares embed_tokens'
    weight, as in Qwen2.5-VL-3B (the 7B and larger are untied).
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
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                              tie_word_embeddings=tie_word_embeddings,
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
def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention minus a copy. Under a padding mask it repeats each K/V head for its
    query heads (repeat_kv: SDPA's enable_gqa runs unmasked only), copying the whole KV cache per layer
    and decoded token. Here a K/V head's query heads are stacked along the query axis instead,
    (B, H, L, D) -> (B, H_kv, groups * L, D), the mask repeated to match: the same attention over the
    same keys, uncopied (flash-decoding's grouping of query heads). Only for queries shorter than
    2 * H_kv * D tokens, where the repeated mask (kept for backward) costs less than the K/V copy."""
    groups = query.shape[1] // key.shape[1]
    if groups == 1 or attention_mask is None or query.shape[2] >= 2 * key.shape[1] * key.shape[3]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    B, H, L, D = query.shape
    out = F.scaled_dot_product_attention(query.reshape(B, H // groups, groups * L, D), key, value, dropout_p=dropout,
                                         attn_mask=attention_mask.repeat(1, 1, groups, 1), scale=scaling)
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
    """flash-attention 2 when it is importable and there is a GPU, PyTorch SDPA otherwise (grouped_sdpa)."""
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2" if torch.cuda.is_available() else "sdpa_grouped"
    except ImportError:
        return "sdpa_grouped"


def linear_patch_embed(model):
    """The vision tower's patch embedding run as the matmul it is. Its Conv3d has kernel == stride and
    every input is one kernel's worth of pixels, so it is x @ W.view(out, -1).T. torch 2.9 dropped
    cuDNN's Conv3d for it (pytorch#166122; 10-50,000x slower on some GPUs and dtypes, transformers#45750),
    and on CPU the conv is 3.5x slower than the matmul. vLLM makes the same swap (Conv3dLayer._forward_mulmat,
    vllm/model_executor/layers/conv.py), so sampler and trainer compute it alike. Same parameter."""
    embed = model.model.visual.patch_embed
    assert embed.proj.kernel_size == embed.proj.stride and embed.proj.bias is None, "not a plain strided Conv3d"
    embed.forward = types.MethodType(_patch_embed_matmul, embed)  # bound, so a deepcopy runs on its own weights
    return model


def _patch_embed_matmul(self, x):
    return F.linear(x.to(self.proj.weight.dtype), self.proj.weight.reshape(self.proj.out_channels, -1))


def load_model(path, *, dtype=torch.float32, device="cpu"):
    """Qwen2.5-VL from a hub id or local folder, whole, on one device."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype,
                                                               attn_implementation=attention_implementation())
    return linear_patch_embed(model).to(device)


def load_processor(path, **kwargs):
    """AutoProcessor.from_pretrained(path, **kwargs), or a stop that says what to change in the older and
    derived Qwen2.5-VL folders whose preprocessor_config.json names "Qwen2_5_VLImageProcessor":
    transformers 5 has no such class (huggingface/transformers#36193) and vLLM 0.32 fails on them
    too, with a hint at trust_remote_code that does not help."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(path, **kwargs)
    except ValueError as e:
        if "Unrecognized image processor" not in str(e):
            raise
    raise ValueError(f"{path}: preprocessor_config.json names an image processor that transformers "
                     f"{transformers.__version__} does not have (older Qwen2.5-VL folders say "
                     '"Qwen2_5_VLImageProcessor"). Qwen2.5-VL uses Qwen2-VL\'s: set '
                     '"image_processor_type": "Qwen2VLImageProcessor" in that file.')


def apply_fsdp(model, mesh, *, param_dtype=torch.float32, reduce_dtype=torch.float32, reshard_after_forward=True,
               cpu_offload=False, activation_checkpointing=False, freeze_vision=False, freeze_merger=False,
               freeze_llm=False):
    """FSDP2, as torchtitan does it: each vision block and each decoder layer is its own unit (its
    parameters are all-gathered just before it runs and freed after), then the merger, the rest of
    the vision tower (patch embed) and the root (embeddings, final norm, lm_head). Mixed precision:
    compute in param_dtype, reduce gradients in reduce_dtype (bf16 compute with fp32 reduction on
    GPUs); the sharded copy the optimizer updates keeps the dtype the model was loaded in.

    - reshard_after_forward=False keeps each unit gathered from its forward to its backward: no
      second all-gather, but the whole model is held unsharded in param_dtype. The root is never
      resharded after forward either way (FSDP2's default for it: backward starts there at once),
      so build the optimizer before any forward, or it holds the root's gathered copies.
    - cpu_offload: sharded parameters, gradients and AdamW state live in host memory and the
      optimizer step runs on the CPU (FSDP2's CPUOffloadPolicy); a unit is copied in when gathered.
      On GPUs the process group needs a CPU backend too, init_process_group("cuda:nccl,cpu:gloo")
      as torchtitan does: the grad-norm all-reduce runs on the offloaded gradients.
    - activation_checkpointing: each block and layer keeps only its input and recomputes the rest
      in backward. Wrapped before fully_shard, so FSDP's hooks stay outside the recompute
      (torchtitan); parameter names gain "_checkpoint_wrapped_module.", which state-dict helpers
      (get_model_state_dict, hence checkpoints and save_hf) and rollout.sync_weights strip.
    - freeze_vision (patch embed + blocks), freeze_merger, freeze_llm: requires_grad False. Each
      part is a unit of its own, so a frozen unit has no gradient to reduce at all.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    visual, lm = model.model.visual, model.model.language_model
    for part, frozen in ((visual.patch_embed, freeze_vision), (visual.blocks, freeze_vision),
                         (visual.merger, freeze_merger), (lm, freeze_llm), (model.lm_head, freeze_llm)):
        if frozen:
            part.requires_grad_(False)
    if activation_checkpointing:
        for blocks in (visual.blocks, lm.layers):
            for i, block in enumerate(blocks):
                blocks[i] = checkpoint_wrapper(block)  # non-reentrant (use_reentrant=False)
    # Pinned host memory makes the copies to the GPU asynchronous; a CPU-only torch cannot pin.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    options = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
                   offload_policy=offload)
    for unit in (*visual.blocks, visual.merger, visual, *lm.layers):
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, **options)
    model.reshard_after_forward = reshard_after_forward  # what rollout.generate_hf restores after decoding
    return model


def load_fsdp_model(path, mesh, *, rank, master_dtype=torch.float32, lora=None, **fsdp_options):
    """The FSDP2-wrapped model (apply_fsdp with `fsdp_options`) with at most one full copy in host
    memory, on rank 0: every rank builds the model on the meta device (shapes, no storage), wraps it
    and allocates only its shards; rank 0 alone reads the weights and broadcasts them tensor by
    tensor (as verl's fsdp2_load_full_state_dict). `mesh` spans the whole world.

    master_dtype: the dtype of the sharded copy the optimizer updates. bfloat16 halves parameter,
    gradient and AdamW-state memory but keeps 8 significant bits, so an update under ~2^-9 of a
    weight rounds away: at lr 1e-6 Adam moves a weight of 1e-2 by 1e-4 of itself, and training
    silently stalls (EasyR1 pairs pure bf16 with a Kahan-summing AdamW). float32 is the default.

    lora: apply_lora's keywords (dict(rank=8, alpha=16)), applied to the meta model before the wrap and
    to rank 0's copy before the broadcast: the same names (`q_proj.base.weight`), rank 0's adapters.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, GenerationConfig

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            AutoConfig.from_pretrained(path), dtype=master_dtype, attn_implementation=attention_implementation())
    try:  # config.json names one eos (<|im_end|>); Qwen's generation_config.json adds <|endoftext|>
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # the folder has none
        pass
    linear_patch_embed(model)
    if lora:
        apply_lora(model, **lora)
    apply_fsdp(model, mesh, **fsdp_options)
    device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")
    model.to_empty(device=device)  # on the GPU even with cpu_offload: NCCL broadcasts from GPU memory
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
                buf.copy_(full.get_buffer(name.replace("_checkpoint_wrapped_module.", "")))
            dist.broadcast(buf, src=0)
    if fsdp_options.get("cpu_offload"):
        model.to("cpu")  # FSDP2 requires the shards in host memory; the buffers go back to the GPU
        for buf in model.buffers():
            buf.data = buf.data.to(device)
    return model


# ----------------------------------------------------------------------------- LoRA
class LoRALinear(torch.nn.Module):
    """y = base(x) + dropout(x) @ A^T @ B^T * alpha / rank (Hu et al. 2021), `base` frozen. PEFT's init:
    A (rank, in) kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(in)), B (out, rank) zeros: it starts as base."""

    def __init__(self, base, *, rank, alpha, dropout, generator):
        super().__init__()
        self.base, self.scale, self.dropout = base, alpha / rank, torch.nn.Dropout(dropout)
        A = torch.nn.init.kaiming_uniform_(torch.empty(rank, base.in_features), a=5 ** 0.5, generator=generator)
        self.lora_A = torch.nn.Parameter(A.to(base.weight))  # drawn on the CPU, then base's device and dtype
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank).to(base.weight))

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale


def apply_lora(model, *, rank, alpha, dropout=0.0, seed=0,
               targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """Freeze `model`, then wrap each nn.Linear named one of `targets` in the language model's layers
    (not in the vision tower, whose MLP is named alike) in a LoRALinear. Before FSDP: load_fsdp_model(lora=).
    Names: `<m>.base.weight`, `<m>.base.bias` (frozen), `<m>.lora_A` (rank, in), `<m>.lora_B` (out, rank),
    m = e.g. model.language_model.layers.0.self_attn.q_proj; merge_lora turns them back into `<m>.weight`.
    Only the adapters train; to train more, unfreeze it before apply_fsdp (model.lm_head.requires_grad_(True)).
    A is drawn from a generator seeded with `seed`, so every rank draws the same. `model.lora` keeps the
    settings, for the savers."""
    model.requires_grad_(False)
    generator, layers = torch.Generator().manual_seed(seed), model.model.language_model.layers
    for name, module in list(layers.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in targets:
            layers.set_submodule(name, LoRALinear(module, rank=rank, alpha=alpha, dropout=dropout, generator=generator))
    model.lora = dict(rank=rank, alpha=alpha, dropout=dropout, targets=list(targets), seed=seed)
    return model


def merge_lora(named_tensors, *, scale):
    """(name, full tensor) pairs of a LoRA model (rollout.full_weights, a state dict) under the plain HF
    names: `<m>.weight` = base.weight + scale * lora_B @ lora_A (in float32), `<m>.bias` = base.bias, the
    rest as they come. A module's three tensors may come in any order; each waits only for the others."""
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


def hf_named(model, named_tensors):
    """(name, full tensor) pairs of `model` under the plain Qwen2.5-VL names: adapters merged, if it has any."""
    lora = getattr(model, "lora", None)
    return merge_lora(named_tensors, scale=lora["alpha"] / lora["rank"]) if lora else named_tensors


def hf_state_dict(model, state):
    return dict(hf_named(model, state.items()))  # a full state dict under the plain names


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


def vlm_forward(model, batch, position_ids, **kwargs):
    """model(...) on a padded batch that always runs the vision tower: a batch without images runs it
    on a dummy 28x28 image whose output is added times 0 to the text embeddings. Under FSDP a rank
    that skipped the tower would leave the others waiting in its collectives (EasyR1 #468, verl
    #3491), e.g. with text-only and image rows in one dataset. The hook runs inside the root's
    forward, where FSDP expects it."""
    cfg, hook = model.config, None
    if batch.get("pixel_values") is None:
        def add_dummy_vision(module, args, kw):
            vis = cfg.vision_config
            pixels = torch.zeros(4, vis.in_channels * vis.temporal_patch_size * vis.patch_size ** 2,
                                 device=batch["input_ids"].device)
            features = model.model.get_image_features(pixels, torch.tensor([[1, 2, 2]], device=pixels.device))
            features = getattr(features, "pooler_output", features)  # an output object in transformers 5.x
            features = torch.cat(features) if isinstance(features, (list, tuple)) else features
            kw["inputs_embeds"] = kw["inputs_embeds"] + 0.0 * features.sum().to(kw["inputs_embeds"].dtype)
            return args, kw

        hook = model.model.language_model.register_forward_pre_hook(add_dummy_vision, with_kwargs=True)
    try:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=position_ids,
                     pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"), **kwargs)
    finally:
        if hook is not None:
            hook.remove()


def shared_prompt_logits(model, batch, position_ids):
    """The (B, T, V) logits predicting each response token when rows share prompts: each distinct prompt
    (and image) runs once, its keys/values are copied to its responses, which run on top of them. G
    responses cost one prompt forward, not G (Prefix Grouper's shared prefix, arXiv 2506.05433); the
    gradient reaches the prompt through the copies. Each cache is left as the forward found it, so a
    layer recomputed by activation checkpointing sees the same keys again."""
    from transformers import DynamicCache

    idx, ids, mask = batch["prompt_index"], batch["response_ids"], batch["response_mask"]
    prompt_cache = DynamicCache()
    out = vlm_forward(model, batch, position_ids, past_key_values=prompt_cache, use_cache=True, logits_to_keep=1)
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
    attention_mask = torch.cat([batch["attention_mask"][idx], mask[:, :-1].to(batch["attention_mask"].dtype)], 1)
    rest = model(input_ids=ids[:, :-1], attention_mask=attention_mask, position_ids=pos, past_key_values=cache,
                 use_cache=True).logits  # (B, T-1, V): response token t predicts t+1
    for layer, (k, v) in zip(cache.layers, prefix):
        layer.keys, layer.values = k, v
    return torch.cat([first, rest], 1)


def token_logprobs(model, batch, *, temperature=1.0, banned_ids=(), with_entropy=False):
    """log pi(response token) under `model`, (B, T), 0 where response_mask is 0 (response_logprobs).
    Only the T+1 last positions go through lm_head (logits_to_keep): no prompt logits."""
    ids, T, cfg = batch["response_ids"], batch["response_ids"].shape[1], model.config
    position_ids = mrope_position_ids(batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"),
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
    logit_bias applies it before its processed log-probs.

    `chunk` tokens at a time (default: LOGP_CHUNK_BYTES of float32). Whole, each float32 copy of a
    7B's (4, 2048, 152064) logits is 4.6 GiB, several are alive at once and log_softmax's output
    is kept for backward. Each chunk is checkpointed: backward recomputes its float32 temporaries
    from the compute-dtype logits, which the model returns anyway."""
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
    LoRA merged in. Gathering the full state dict is collective: every rank calls this; rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, state_dict=hf_state_dict(model, state))
        processor.save_pretrained(out_dir)
    return out_dir


def save_lora_adapter(model, out_dir, *, rank):
    """The adapters alone, as PEFT saves them (for PeftModel.from_pretrained, vLLM's LoRARequest):
    adapter_model.safetensors (`base_model.model.<m>.lora_A.weight` (rank, in), `.lora_B.weight`) and
    adapter_config.json. Collective under FSDP (each adapter is all-gathered); rank 0 writes."""
    from safetensors.torch import save_file

    tensors = {}
    for name, p in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            p = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()  # FSDP2: a DTensor shard
            tensors[f"base_model.model.{name.replace('_checkpoint_wrapped_module.', '')}.weight"] = p.cpu().contiguous()
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
        lora = model.lora  # target_modules as a regex, which PEFT full-matches: a list takes the vision MLP too
        config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=lora["rank"], lora_alpha=lora["alpha"],
                      lora_dropout=lora["dropout"], bias="none", base_model_name_or_path=model.config.name_or_path,
                      target_modules=rf".*\.language_model\.layers\.\d+\..*\.({'|'.join(lora['targets'])})")
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
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path + ".tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)  # the remains of a save that crashed
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)  # fsyncs its files
    torch.save(extra, os.path.join(tmp, f"extra_rank{rank}.pt"))
    _fsync(os.path.join(tmp, f"extra_rank{rank}.pt"))
    if rank == 0 and getattr(model, "lora", None):  # export_checkpoint rebuilds the adapters from it
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
    import pathlib
    import pickle

    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    here = md.__name__  # the dataclasses and enums DCP defines for its metadata
    safe = {(here, k) for k, v in vars(md).items() if getattr(v, "__module__", 0) == here}
    safe |= {(fs.__name__, "_StorageInfo"), ("torch.serialization", "_get_layout")}
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
        return f"checkpoint {path}: {name}: {'missing' if isinstance(e, FileNotFoundError) else e}"
    if world_size not in (None, ranks):
        return f"checkpoint {path} was saved by {ranks} ranks, not {world_size}"
    return None


def load_checkpoint(path, model, optimizer, *, rank):
    """Restore what save_checkpoint wrote, in place; returns this rank's `extra`. A
    checkpoint_problem is a ValueError, before anything loads. No pickle runs code."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

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


def export_checkpoint(ckpt_dir, model_path, out_dir, *, dtype=torch.float32):
    """A save_pretrained folder (model + processor), as save_hf writes, from a save_checkpoint
    folder, in one process: DCP reshards when it loads, so a checkpoint written by any number of
    ranks reads here whole. Only the model entries are read, not the optimizer state. model_path
    is the model the run started from: it gives the config, the processor and the tensors to fill.
    A LoRA run's checkpoint (it holds lora.json) is exported with the adapters merged in."""
    import torch.distributed.checkpoint as dcp

    model = load_model(model_path, dtype=dtype)
    if os.path.exists(os.path.join(ckpt_dir, "lora.json")):
        with open(os.path.join(ckpt_dir, "lora.json")) as f:
            apply_lora(model, **json.load(f))
    if problem := checkpoint_problem(ckpt_dir):  # before DCP unpickles its metadata
        raise ValueError(problem)
    dcp.load({"model": model.state_dict()}, checkpoint_id=ckpt_dir, no_dist=True)  # in place, into the model
    model.save_pretrained(out_dir, state_dict=hf_state_dict(model, model.state_dict()))
    load_processor(model_path).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":  # python model.py export out/checkpoints/step_60 --model_path=PATH --out=DIR
    import argparse

    parser = argparse.ArgumentParser(description="Write a train.py checkpoint as a transformers/vLLM folder.")
    parser.add_argument("command", choices=["export"])
    parser.add_argument("ckpt_dir")
    parser.add_argument("--model_path", required=True, help="the model the run started from")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="float32", help="float32 / bfloat16")
    args = parser.parse_args()
    export_checkpoint(args.ckpt_dir, args.model_path, args.out, dtype=getattr(torch, args.dtype))
