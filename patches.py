"""Where the trainer departs from transformers' defaults for Qwen-VL, same values: SDPA attention
that groups query heads instead of copying K/V heads and never leaves a query row with no key (NaN
on some kernels), the vision patch embedding run as the matmul it is (model.load_model and
load_fsdp_model apply both), and a clear stop for older folders' processor name."""
import types

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


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
