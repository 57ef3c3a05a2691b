"""The memory plan of a train.py run, per rank and phase, from the model's config alone.

    python memplan.py --world_size=4 --model_path=Qwen/Qwen2.5-VL-7B-Instruct <train.py flags>
    torchrun --nproc_per_node 4 train.py --dry_run=true <flags>     # the same plan, from train.py

Parameters are counted on a meta-device build (no weights). Activations are what one decoder layer
or vision block saves for backward per token (layer_bytes, vision_block_bytes: Qwen2.5-VL's and
Qwen3-VL's layers and blocks; the tensors transformers 5.19 saves under torch 2.13 in bf16
with SDPA, equal to a saved-tensor count in tests/test_memplan.py). The rest is FSDP2 and vLLM
bookkeeping, written out in plan().
It plans the worst case the flags allow (prompts of max_prompt_length tokens, all image; responses
of max_response_length; a micro-batch straddling two groups) with bf16 compute, for the train.py
of issue 14: the reference model's shards in bf16 and resharded after its no-grad pass, vLLM
asleep during the final save. A periodic checkpoint (sharded, DCP) gathers nothing: no row.
The estimates (CTX, VLLM_*) are for scripts/gpu_check.sh to calibrate.
"""
import dataclasses
import inspect
import math
import os
import sys

import torch

from runlog import print0

GIB = 2 ** 30
DEFAULT_GPU_GIB = 79.2  # an "80 GB" H100/A100 as torch.cuda reports its total memory
CTX = 1.0 * GIB  # estimate: CUDA context, cuBLAS workspaces, NCCL buffers (gpu-readiness.md)
VLLM_RUNTIME = 4.0 * GIB  # estimate: vLLM's profiled activation peak + CUDA graphs
VLLM_ASLEEP = 1.5 * GIB  # estimate: what a sleeping engine keeps (graph pool, runner buffers)
COLUMNS = ("params", "grads", "optim", "ref", "vllm", "activ", "logits", "other")
# The public config.json of Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct and Qwen/Qwen3-VL-{4B,8B,32B}-
# Instruct (huggingface.co), so that a plan needs no hub. Qwen3-VL's were rebuilt from public
# copies and checked against what the hub publishes (tests/test_memplan.py): the 8B's parameter
# total, the 4B's rounded size, the 32B's git blob id. None of the 2B's could be checked.
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def load_config(model_path):
    """A local folder's config.json, else the shipped copy named by the hub id's last component
    (Qwen/Qwen2.5-VL-7B-Instruct -> configs/Qwen2.5-VL-7B-Instruct), else the hub (or its cache)."""
    from transformers import AutoConfig

    shipped = os.path.join(CONFIGS, model_path.rstrip("/").rsplit("/", 1)[-1])
    for folder in (model_path, shipped):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return AutoConfig.from_pretrained(folder)
    try:
        return AutoConfig.from_pretrained(model_path)
    except OSError as e:
        raise SystemExit(f"memplan: no config.json for --model_path={model_path}: not a folder, "
                         f"not in {CONFIGS}, not on the hub or in its cache ({e})")


def count_params(config):
    """Parameter counts of a meta-device build: vision (patch embed + blocks), merger, decoder
    layers, embed, lm_head (0 when tied: counted once), rest (final norm); one layer, one block,
    the largest tensor. Qwen3-VL's deepstack mergers count as merger."""
    from model import model_class

    with torch.device("meta"):
        model = model_class(config)._from_config(config, attn_implementation="sdpa")
    n = dict(vision=0, merger=0, layers=0, embed=0, lm_head=0, rest=0, layer=0, block=0, largest=0)
    for name, p in model.named_parameters():  # a tied lm_head is the embedding: named once
        n["merger" if "merger" in name else "vision" if ".visual." in name else
          "layers" if ".layers." in name else "embed" if "embed_tokens" in name else
          "lm_head" if name.startswith("lm_head") else "rest"] += p.numel()
        n["layer"] += p.numel() * (".layers.0." in name)
        n["block"] += p.numel() * (".blocks.0." in name)
        n["largest"] = max(n["largest"], p.numel())
    n["total"] = sum(n[k] for k in ("vision", "merger", "layers", "embed", "lm_head", "rest"))
    return n


def layer_bytes(seqs, q_len, kv_len, *, hidden, inter, heads, kv_heads, head_dim, grouped=None,
                qk_norm=False):
    """Bytes one bf16 decoder layer saves for backward: seqs sequences of q_len queries over kv_len
    keys (their own, after a prompt's cache) under a padding mask, attention as model.grouped_sdpa
    runs it. Per query token: each RMSNorm's float32 input (4h), rsqrt (4) and bf16 output (2h);
    the inputs of q/k/v and of the MLP (2h each); q and the attention output (2 heads*d each);
    SDPA's float32 logsumexp (4 heads); gate, silu(gate), up and their product (2I each); the mask
    as a bf16 bias (2 kv_len). Per key token: K and V (2d bytes per head each). grouped: whether
    grouped_sdpa stacks the query heads (None: its own rule on q_len). qk_norm: Qwen3-VL's RMSNorm
    of each q and k head, which saves its float32 input (4d), rsqrt (4) and bf16 output (2d)."""
    groups = heads // kv_heads
    if grouped is None:
        grouped = groups > 1 and q_len < 2 * kv_heads * head_dim
    per_q = 2 * (6 * hidden + 4) + 4 * hidden + 4 * heads * head_dim + 4 * heads + 8 * inter
    per_q += qk_norm * (heads + kv_heads) * (6 * head_dim + 4)
    if grouped:  # the mask repeated per query head of a group; o_proj's input is a copy
        per_q += 2 * kv_len * groups + 2 * heads * head_dim
    else:  # transformers' SDPA under a mask: repeat_kv copies K and V for every query head
        per_q += 2 * kv_len
    per_kv = 4 * head_dim * (kv_heads if grouped else heads)
    return seqs * (q_len * per_q + kv_len * per_kv)


def vision_block_bytes(patches, *, hidden, inter, heads, gated=True):
    """Bytes one bf16 vision block saves for backward. Per patch in both: the qkv input (2h) and
    output (6h: V is a view of it), q and k after rotary (4h), the attention output and proj input
    (4h), the MLP input (2h), logsumexp (4 heads). Qwen2.5-VL's block (gated) adds two RMSNorms
    (12h + 8) and gate/silu/up/product (8I); Qwen3-VL's (gated=False) two LayerNorms, each its
    input (2h) with float32 mean and 1/std on CUDA (8; bf16 on the CPU), and fc1's output and its
    GELU (4I): its MLP is two linears, no gate."""
    norms_and_mlp = 12 * hidden + 8 + 8 * inter if gated else 4 * hidden + 16 + 4 * inter
    return patches * (18 * hidden + 4 * heads + norms_and_mlp)


def plan(config, *, world_size, gpu_gib, micro_batch_size, max_prompt_length, max_response_length,
         num_generations, rollout_batch_size, global_batch_size, master_dtype="float32",
         activation_checkpointing=False, reshard_after_forward=True, cpu_offload=False,
         ref_cpu_offload=False, use_ref=True, lora_rank=0,
         lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
         freeze_vision=False, freeze_merger=False, freeze_llm=False, share_prompts=True,
         max_pixels=4194304, sampler="vllm", hf_batch_size=0, vllm_dtype="auto",
         vllm_gpu_memory_utilization=0.6, vllm_kv_cache_mb=0, vllm_sleep_level=1, vllm_tp=1,
         max_tokens_per_micro_batch=0):
    """dict(rows=[(phase, {column: bytes per rank})], peak=(phase, bytes), fits, notes). A phase's
    row is the largest of the moments listed in it; Adam's states count from step 2 on."""
    from model import LOGP_CHUNK_BYTES  # token_logprobs' float32 chunk of logits

    tc, vc = config.text_config, config.vision_config
    h, L, V, kvh = tc.hidden_size, tc.num_hidden_layers, tc.vocab_size, tc.num_key_value_heads
    d = getattr(tc, "head_dim", None) or h // tc.num_attention_heads
    dims = dict(hidden=h, inter=tc.intermediate_size, heads=tc.num_attention_heads, kv_heads=kvh,
                head_dim=d, qk_norm=config.model_type == "qwen3_vl")
    n, cb, mb, W = count_params(config), 2, {"float32": 4, "bfloat16": 2}[master_dtype], world_size
    io = dict(q_proj=(h, d * dims["heads"]), k_proj=(h, d * kvh), v_proj=(h, d * kvh),
              o_proj=(d * dims["heads"], h), gate_proj=(h, dims["inter"]),
              up_proj=(h, dims["inter"]), down_proj=(dims["inter"], h))
    lora = L * lora_rank * sum(sum(io[t]) for t in lora_targets.split(","))
    root = n["embed"] + n["lm_head"] + n["rest"]  # FSDP2's root unit
    layer, everything = n["layer"] + lora // L, n["total"] + lora
    if lora:  # apply_lora freezes the rest
        trained, root_t, unit_t = lora, 0, lora // L
    else:
        trained = n["total"] - freeze_vision * n["vision"] - freeze_merger * n["merger"] \
            - freeze_llm * (n["layers"] + root)
        root_t = 0 if freeze_llm else root
        unit_t = max(0 if freeze_llm else n["layer"], 0 if freeze_vision else n["block"])
    shards = 0 if cpu_offload else everything * mb / W
    grads, adam = (0, 0) if cpu_offload else (trained * mb / W, 2 * trained * mb / W)
    ref = n["total"] * cb / W if use_ref and not ref_cpu_offload else 0
    # A micro-batch: B sequences; with shared prompts a window of B spans up to `prompts` groups.
    # A token budget bounds count x (longest prompt + longest response): B sequences of P + T, B
    # perhaps a fraction (a longer row runs alone); sorted by length, each may have its own prompt.
    P, T, budget = max_prompt_length, max_response_length, max_tokens_per_micro_batch
    B = min(max(1, budget / (P + T)) if budget else micro_batch_size,
            global_batch_size * num_generations // W)
    windowed = share_prompts and not budget
    prompts = min(B, math.ceil((B - 1) / num_generations) + 1) if windowed else B
    merge = vc.spatial_merge_size ** 2
    patches = merge * min(P, max_pixels // (vc.patch_size ** 2 * merge))  # an all-image prompt
    kv_token = L * 4 * kvh * d  # bf16 K and V of one token, all layers
    if share_prompts:  # each prompt once, then the responses on copies of its KV cache
        fwd, kv_cache = [(prompts, P, P), (B, T, P + T)], kv_token * (prompts * P + B * (P + T))
    else:
        fwd, kv_cache = [(B, P + T, P + T)], 0
    each = [layer_bytes(*f, **dims) for f in fwd]
    block = vision_block_bytes(prompts * patches, hidden=vc.hidden_size, inter=vc.intermediate_size,
                               heads=vc.num_heads, gated=config.model_type == "qwen2_5_vl")
    vis = not (freeze_vision or lora)  # the vision blocks save only when they train
    if activation_checkpointing:  # each layer and block keeps its input; one recomputes at a time
        saved = (L * sum(s * q for s, q, _ in fwd) * h + vis * vc.depth * prompts * patches
                 * vc.hidden_size) * cb
        working = 2 * max(*each, vis * block)  # one call's recomputed saves + backward temporaries
    else:
        saved, working = L * sum(each) + vis * vc.depth * block, max(*each, vis * block)
    chunk = 3 * min(LOGP_CHUNK_BYTES, B * T * V * 4)  # its logits, log-softmax and entropy terms
    gathered = (root + 2 * max(layer, n["block"])) * cb  # the root, a unit and the one prefetched
    if not reshard_after_forward:  # every unit stays gathered from its forward to its backward
        gathered = everything * cb
    vllm_weights = n["total"] * (4 if vllm_dtype == "float32" else 2) / vllm_tp
    share = vllm_kv_cache_mb * 2 ** 20 + vllm_weights + VLLM_RUNTIME if vllm_kv_cache_mb \
        else vllm_gpu_memory_utilization * gpu_gib * GIB  # reserved once, at engine start
    asleep = VLLM_ASLEEP if vllm_sleep_level else share
    if sampler != "vllm":
        share = asleep = 0
    base = dict(params=shards, optim=adam, ref=ref, other=CTX)
    # A sync gathers one unit at a time and clones its tensors, which vLLM buffers per module. The
    # first sync (before step 1) runs on the engine as it started, awake.
    sync = shards + (max(root, layer) + 2 * n["largest"]) * cb
    rows = [("engine start", [dict(base, optim=0, vllm=share, params=sync if share else shards)])]
    if sampler == "vllm":
        rows.append(("rollout", [dict(base, vllm=share)]))
    else:  # generate_hf decodes on the whole gathered policy, with a KV cache
        hb = hf_batch_size or micro_batch_size
        rows.append(("rollout", [dict(base, params=shards + everything * cb, activ=kv_token * hb
                                      * (P + T) + layer_bytes(hb, P, P, **dims))]))
    # No grad: one layer's (or block's) temporaries, the logits and their copy (shared_prompt_logits
    # concatenates). The policy's root stays gathered while the reference model runs.
    left = root * cb if reshard_after_forward else gathered
    rows.append(("old/ref log-probs", [dict(
        base, params=shards + gathered + use_ref * left, vllm=asleep,
        activ=kv_cache + max(*each, block), logits=2 * B * T * V * cb + chunk)]))
    # Update, three moments: backward starts (every save, the logits and their gradient, lm_head's
    # gradient held until the root reduces, a unit reduce-scattering its bf16 gradient through a
    # float32 copy); backward ends (the root reduces); AdamW steps (foreach: one state-sized temp).
    update = dict(base, params=shards + gathered, vllm=asleep)
    rows.append(("update", [
        dict(update, activ=kv_cache + saved + working, logits=3 * B * T * V * cb + chunk,
             grads=grads + bool(root_t) * (n["lm_head"] or n["embed"]) * cb + unit_t * (cb + 4)),
        dict(update, grads=grads + root_t * (cb + 4)),
        dict(base, vllm=asleep, grads=grads, optim=adam + adam / 2)]))
    if sampler == "vllm":  # later syncs wake the weights, reload, then wake the KV cache
        awake_weights = vllm_weights + VLLM_RUNTIME if vllm_sleep_level else share
        rows.append(("sync and wake", [dict(base, params=sync, vllm=awake_weights),
                                       dict(base, vllm=share)]))
    # save_hf gathers each full tensor in the master dtype on the GPU, then copies it to the host.
    rows.append(("final save", [dict(base, params=shards + 2 * n["largest"] * mb, vllm=asleep)]))
    rows = [(name, max(({c: m.get(c, 0) for c in COLUMNS} for m in moments), key=_total))
            for name, moments in rows]
    peak = max(rows, key=lambda r: _total(r[1]))
    kv = share - vllm_weights - VLLM_RUNTIME
    kv_short = sampler == "vllm" and kv < (P + T) * kv_token
    on = "on" if activation_checkpointing else "off"
    notes = [f"model: {g(n['total'])} B parameters (vision {g(n['vision'])}, merger "
             f"{g(n['merger'])}, {L} decoder layers {g(n['layers'])}, embed {g(n['embed'])}, "
             f"lm_head {g(n['lm_head'])}); {g(trained)} B trained, "
             f"{rollout_batch_size // global_batch_size} optimizer steps per step",
             f"micro-batch: {B:g} sequences of {P} + {T} tokens, {prompts:g} prompt(s) of "
             f"{patches} image patches; activation checkpointing {on}"]
    if sampler == "vllm":
        notes.append(f"vLLM: {share / GIB:.1f} GiB = weights {vllm_weights / GIB:.1f} + runtime "
                     f"~{VLLM_RUNTIME / GIB:.0f} + KV cache {kv / GIB:.1f} "
                     f"(~{kv / kv_token / 1e3:.0f}k tokens; a request needs {P + T}); "
                     f"asleep ~{asleep / GIB:.1f}")
    notes.append(f"host RAM: rank 0 gathers {n['total'] * mb / GIB:.1f} GiB at the final save" + (
        f"; sleep level 1 keeps {vllm_weights / GIB:.1f} GiB per rank"
        if sampler == "vllm" and vllm_sleep_level == 1 else ""))
    fits = _total(peak[1]) <= gpu_gib * GIB and not kv_short
    return dict(rows=rows, peak=(peak[0], _total(peak[1])), fits=fits, gpu_gib=gpu_gib,
                kv_short=kv_short, notes=notes)


def _total(cols):
    return sum(cols.values())


def g(count):
    return f"{count / 1e9:.2f}"


def report(p):
    """The plan as a printable table, ending with the `fits:` line."""
    lines = [*p["notes"], f"{'phase (GiB per rank)':22}" + "".join(f"{c:>8}" for c in COLUMNS)
             + f"{'total':>8}"]
    for name, cols in p["rows"]:
        lines.append(f"{name:22}" + "".join(f"{cols[c] / GIB:8.1f}" for c in COLUMNS)
                     + f"{_total(cols) / GIB:8.1f}")
    over = [name for name, cols in p["rows"] if _total(cols) > p["gpu_gib"] * GIB]
    if len(over) > 1:
        lines.append("over the GPU in: " + ", ".join(over))
    if p["kv_short"]:
        lines.append("vLLM's KV cache cannot hold one request: raise --vllm_gpu_memory_utilization")
    phase, peak = p["peak"]
    lines.append(f"fits: {'yes' if p['fits'] else 'no'} - peak {peak / GIB:.1f} GiB of "
                 f"{p['gpu_gib']:.1f} GiB in {phase}")
    return "\n".join(lines)


def plan_from_config(cfg, world_size, gpu_gib):
    """(report, fits) for a train.Config: what `train.py --dry_run=true` prints."""
    algo = getattr(cfg, "algo", "grpo")  # train_offline.py's sft / mpo, or train.py's GRPO
    use_ref = algo == "mpo" or algo == "grpo" and cfg.kl_coef > 0
    flags = {k: getattr(cfg, k) for k in inspect.signature(plan).parameters if hasattr(cfg, k)}
    flags.update({f"freeze_{part}": part in cfg.freeze.split(",") for part in
                  ("vision", "merger", "llm")})
    p = plan(load_config(cfg.model_path), world_size=world_size, gpu_gib=gpu_gib, use_ref=use_ref,
             **flags)  # plan's settings are named as train.Config's fields
    return report(p), p["fits"]


def check(cfg, model_path, world_size, device):
    """train.py's plan, before any weights load: printed (rank 0), and on CUDA a run that does not
    fit stops here. True for a dry run (the plan is all it does)."""
    if not (cfg.dry_run or device.type == "cuda" and cfg.memory_check):
        return False
    text, fits = plan_from_config(dataclasses.replace(cfg, model_path=model_path), world_size,
                                  gpu_gib(cfg.gpu_memory_gib, device))
    print0(text)
    if not fits and not cfg.dry_run:
        raise SystemExit("the memory plan above says this run does not fit; change the flags it "
                         "names (--memory_check=false starts it anyway)")
    return cfg.dry_run


def gpu_gib(flag, device):
    """The GPU size planned for: the flag's, else the visible GPU's, else DEFAULT_GPU_GIB."""
    if flag or device.type != "cuda":
        return flag or DEFAULT_GPU_GIB
    return torch.cuda.get_device_properties(device).total_memory / GIB


def main(argv):
    """--world_size=N (default $WORLD_SIZE, else 1), then train.py's flags; exit status 1: no fit"""
    import train

    world = [a for a in argv if a.startswith("--world_size=")]
    world_size = int(world[-1].partition("=")[2]) if world else int(os.environ.get("WORLD_SIZE", 1))
    cfg = train.parse_flags([a for a in argv if not a.startswith("--world_size=")])
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    text, fits = plan_from_config(cfg, world_size, gpu_gib(cfg.gpu_memory_gib, device))
    print(text)
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
