"""GRPO for Qwen2.5-VL: one file of setup, then one loop.

    python train.py                                   # tiny model + synthetic data, on the CPU
    torchrun --nproc_per_node 4 train.py --model_path=Qwen/Qwen2.5-VL-7B-Instruct \
        --train_data=hiyouga/geometry3k@train --val_data=hiyouga/geometry3k@test

Each step: every rank samples n responses for its share of the prompts with its own in-process
vLLM engine, scores them, turns the scores into group-relative advantages, recomputes old and
reference log-probs, takes the clipped-surrogate update(s) through FSDP2, and pushes the new
weights into its engine. Simplifications, on purpose: groups never cross ranks (each rank samples
whole groups), no padding-free packing, no dynamic batching, synchronous rollouts.
"""
import atexit
import dataclasses
import datetime
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from tqdm import tqdm
from PIL import Image
from transformers import AutoProcessor

import data
import grpo
import model as modeling
import reward
import rollout


@dataclass
class Config:
    # --- model and data ---
    model_path: str = "tiny"  # hub id or local folder; "tiny" builds the CPU default in cache_dir
    train_data: str = "synthetic@train"  # name@split (hub id or folder) or .parquet/.json/.jsonl; "synthetic" = built in cache_dir
    val_data: str = "synthetic@test"  # same forms; "" = no validation
    cache_dir: str = ".cache/tiny"  # where the tiny model and the synthetic data are built
    out_dir: str = "out"  # metrics.jsonl and the final HF model (out_dir/hf)
    format_prompt: str = ""  # jinja file with {{ content }}; "" = the seed's math.jinja text; "none" = no format prompt
    min_pixels: int = 262144  # images are resized so that their area lies in [min_pixels, max_pixels]
    max_pixels: int = 4194304
    max_prompt_length: int = 2048  # tokens after image expansion; longer prompts are skipped and counted
    prompt_key: str = "problem"  # the row fields holding the prompt (with <image> placeholders), answer, images
    answer_key: str = "answer"
    image_key: str = "images"
    # --- rollout ---
    sampler: str = "vllm"  # vllm (in-process engine) | hf (the trainer's model decodes: no vLLM; the faster one on CPU)
    num_generations: int = 5  # G, responses per prompt
    rollout_batch_size: int = 512  # prompts per step, all ranks together
    max_response_length: int = 2048  # tokens
    temperature: float = 1.0  # rollout sampling temperature (log-probs are taken at the same temperature)
    top_p: float = 1.0
    vllm_dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    vllm_gpu_memory_utilization: float = 0.6  # GPU share for vLLM (weights + KV cache)
    vllm_kv_cache_mb: int = 0  # explicit KV cache size in MiB (0 = use vllm_gpu_memory_utilization); set on CPU
    vllm_enforce_eager: bool = False  # True disables CUDA graphs
    vllm_tp: int = 1  # tensor parallel size: groups of vllm_tp consecutive ranks share one engine's prompts
    hf_batch_size: int = 0  # --sampler=hf: sequences decoded together (0 = micro_batch_size)
    vllm_sleep_level: int = 1  # CUDA: free vLLM's memory between rollouts (1 = weights to host RAM, 2 = dropped; 0 = off)
    # --- algorithm ---
    algo: str = "grpo"  # grpo | sft (train_data: rows with a response) | mpo (train_data: chosen/rejected pairs)
    adv_estimator: str = "grpo"  # grpo | rloo
    adv_std_norm: bool = True  # divide by the group std (False = Dr.GRPO)
    ratio_level: str = "token"  # token | sequence (GSPO) | sequence_token (GSPO-token)
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.3
    dual_clip: float = 3.0  # 0 turns dual clip off
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum | seq_mean_token_sum_norm
    kl_coef: float = 1e-2  # 0 = no reference model at all
    kl_estimator: str = "k3"  # k1 | k2 | k3 | abs
    kl_in_reward: bool = False  # subtract kl_coef * sum_t KL(old || ref) from each reward instead of a loss term
    dynamic_sampling: bool = False  # DAPO: keep only groups whose mean accuracy lies in (filter_low, filter_high)
    filter_low: float = 0.01
    filter_high: float = 0.99
    max_sample_tries: int = 4  # rollout rounds per step before dynamic sampling fills up with unfiltered groups
    mismatch_correction: str = "none"  # none | token | sequence: truncated IS weight exp(old_logp - sampler_logp)
    mismatch_cap: float = 3.0  # the truncation cap of that weight
    sft_data: str = ""  # CHORD: rows with problem/images/response; "" = no SFT term
    sft_batch_size: int = 16  # SFT rows per optimizer step, all ranks together
    chord_mu_peak: float = 0.9  # loss = (1 - mu) * L_rl + mu * L_sft, mu warmed up to the peak then decayed
    chord_mu_valley: float = 0.05
    chord_warmup_steps: int = 0
    chord_decay_steps: int = 100
    chord_phi: bool = True  # weight SFT tokens by p (1 - p) (CHORD-phi)
    mpo_beta: float = 0.1  # MPO: the DPO/BCO temperature on sum_t log(pi / pi_ref)
    mpo_weights: str = "0.8,0.2,1.0"  # MPO: weights of the DPO, BCO and SFT terms (the MPO paper's)
    reward: str = "math"  # math | r1v | choice | random | path/to/file.py:function
    reward_timeout: float = 10.0  # seconds per reward chunk before it is scored 0
    # --- optimisation ---
    lr: float = 1e-6
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    master_dtype: str = "float32"  # the sharded weights and AdamW states: float32 | bfloat16 (half the memory, small updates round away)
    reshard_after_forward: bool = True  # False keeps each layer gathered from forward to backward: faster, more memory
    cpu_offload: bool = False  # FSDP2 keeps params, grads and AdamW states in host RAM and steps there
    activation_checkpointing: bool = False  # recompute each decoder layer / vision block in backward
    freeze_vision: bool = False  # no updates to the vision tower (patch embed + blocks)
    freeze_merger: bool = False  # no updates to the vision-language merger
    freeze_llm: bool = False  # no updates to the language model (and lm_head)
    ref_cpu_offload: bool = False  # keep the frozen reference model's shards in host RAM
    lora_rank: int = 0  # > 0: train LoRA adapters on the language model's linears only (merged into vLLM at each sync)
    lora_alpha: float = 32.0  # the adapters' scale is lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # linear names to adapt
    global_batch_size: int = 128  # prompts per optimizer step; rollout_batch_size / global_batch_size updates per step
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    share_prompts: bool = True  # a micro-batch runs each group's prompt once, its responses on the prompt's KV cache
    max_steps: int = 60
    seed: int = 1
    # --- validation and output ---
    val_freq: int = 5  # validate every val_freq steps, 0 = never in between (always before and after: --val_data="" for none)
    val_temperature: float = 0.6  # 0 = greedy
    val_top_p: float = 0.95
    val_max_prompts: int = 0  # 0 = the whole validation set
    save_hf: bool = True  # write out_dir/hf at the end
    save_freq: int = 0  # checkpoint (model, optimizer, data position, RNG) every save_freq steps; 0 = never
    save_limit: int = 2  # keep the newest save_limit checkpoints; <= 0 = keep all
    resume: str = ""  # "auto" = the newest checkpoint in out_dir/checkpoints, or a checkpoint folder
    max_bad_steps: int = 3  # stop (after a checkpoint) when this many steps in a row skipped every update
    # --- memory plan (memplan.py) ---
    dry_run: bool = False  # print the memory plan of this run per rank and phase, then exit: nothing loads
    gpu_memory_gib: float = 0.0  # the GPU size the plan assumes; 0 = the visible GPU's, else 79.2 (an "80 GB" card)
    memory_check: bool = True  # CUDA: refuse to start when the plan says the run does not fit
    # --- tiny default ---
    warm_start_steps: int = 150  # SFT steps that teach the tiny random model the answer format (random answers)
    warm_start_grounded_steps: int = 30  # then SFT steps on the true answers, stopped while accuracy is at chance


# The tiny default: what `python train.py` runs on a laptop CPU. Applied only to the tiny model (or
# a folder trained from it, e.g. an SFT stage's out_dir/hf), and only to the flags the user did not
# set: its sizes and learning rate are the tiny model's; a real model keeps the seed's GPU recipe.
TINY = dict(lr=1e-3, weight_decay=0.0, min_pixels=56 * 56, max_pixels=112 * 112, max_prompt_length=512,
            rollout_batch_size=32, global_batch_size=16, micro_batch_size=40, hf_batch_size=160,
            max_response_length=24, max_steps=120, val_freq=20, vllm_kv_cache_mb=64, vllm_enforce_eager=True)


def parse_flags(argv):
    """--name=value or --name value, exact field names, strict booleans; unknown flags are errors."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if "--help" in argv or "-h" in argv:
        print("flags (default; tiny default in brackets):")
        for f in fields.values():
            tiny = f" [{TINY[f.name]}]" if f.name in TINY else ""
            print(f"  --{f.name}={f.default}{tiny}")
        sys.exit(0)
    given, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}; flags look like --name=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise SystemExit(f"flag --{name} needs a value")
            value, i = argv[i + 1], i + 1
        if name not in fields:
            raise SystemExit(f"unknown flag --{name}; see --help")
        kind = type(fields[name].default)
        if kind is bool:
            if value not in ("true", "false", "True", "False", "1", "0"):
                raise SystemExit(f"--{name} takes true or false, not {value!r}")
            given[name] = value in ("true", "True", "1")
        else:
            try:
                given[name] = kind(value)
            except ValueError:
                raise SystemExit(f"--{name} takes a {kind.__name__}, not {value!r}")
        i += 1
    if is_tiny(given.get("model_path", Config.model_path)):
        given = {**TINY, **given}
    return check_flags(Config(**given))


def is_tiny(model_path):
    """"tiny", or a local folder with the tiny model's vocabulary (1,024 tokens; Qwen's has 151,665)."""
    config = os.path.join(model_path, "config.json")
    if model_path == "tiny" or not os.path.isfile(config):
        return model_path == "tiny"
    config = json.load(open(config))
    return 0 < config.get("text_config", config).get("vocab_size", 0) <= 1024


CHOICES = dict(sampler=("vllm", "hf"), algo=("grpo", "sft", "mpo"), adv_estimator=("grpo", "rloo"),
               ratio_level=("token", "sequence", "sequence_token"), kl_estimator=("k1", "k2", "k3", "abs"),
               loss_agg=("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"),
               mismatch_correction=("none", "token", "sequence"), master_dtype=("float32", "bfloat16"),
               vllm_dtype=("auto", "float32", "bfloat16", "float16"))
# Sizes that must be at least this; a zero or negative one would fail deep inside a step.
AT_LEAST = dict(num_generations=2, rollout_batch_size=1, global_batch_size=1, micro_batch_size=1,
                max_response_length=1, max_prompt_length=1, max_steps=1, min_pixels=1, vllm_tp=1,
                max_sample_tries=1, sft_batch_size=1, max_bad_steps=1, hf_batch_size=0, val_freq=0, save_freq=0,
                lora_rank=0, vllm_kv_cache_mb=0, val_max_prompts=0, chord_decay_steps=1, chord_warmup_steps=0,
                reward_timeout=1e-3, mismatch_cap=1.0, lr=0.0, kl_coef=0.0, gpu_memory_gib=0.0)


def check_flags(cfg):
    """Every flag checked before anything loads, the flag named in the message (a mistake found
    after a 7B has loaded costs minutes)."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"--{name} must be one of {', '.join(allowed)}, not {getattr(cfg, name)!r}")
    for name, low in AT_LEAST.items():
        if getattr(cfg, name) < low:
            raise SystemExit(f"--{name} must be at least {low}, not {getattr(cfg, name)}")
    if cfg.rollout_batch_size % cfg.global_batch_size:
        raise SystemExit(f"--rollout_batch_size={cfg.rollout_batch_size} must be a multiple of "
                         f"--global_batch_size={cfg.global_batch_size}")
    if cfg.max_pixels < cfg.min_pixels:
        raise SystemExit(f"--max_pixels={cfg.max_pixels} is below --min_pixels={cfg.min_pixels}")
    if cfg.temperature <= 0:  # log-probs are taken at the sampling temperature: logits / 0
        raise SystemExit(f"--temperature must be above 0, not {cfg.temperature} (greedy validation: "
                         "--val_temperature=0)")
    for name in ("top_p", "val_top_p", "vllm_gpu_memory_utilization"):
        if not 0 < getattr(cfg, name) <= 1:
            raise SystemExit(f"--{name} must be above 0 and at most 1, not {getattr(cfg, name)}")
    if not 0 <= cfg.lora_dropout < 1 or cfg.val_temperature < 0:
        raise SystemExit("--lora_dropout must lie in [0, 1) and --val_temperature be at least 0")
    return cfg


# ----------------------------------------------------------------------------- tiny default
def prepare_tiny(cache_dir, *, warm_start_steps, grounded_steps, seed=0, with_model=True):
    """Build the synthetic data and (with_model) the tiny model if absent; returns (model_dir, data_dir),
    model_dir None without the model.

    A random model never writes `\\boxed{}`, so RL would see zero reward forever: a short SFT
    warm-start (see warm_start) teaches the format and leaves accuracy at chance; every point of
    validation accuracy above that is earned by RL.
    """
    data_dir = os.path.join(cache_dir, "data")
    model_dir = os.path.join(cache_dir, f"model-ws{warm_start_steps}-g{grounded_steps}")  # one per warm-start recipe
    if not all(os.path.exists(os.path.join(data_dir, f)) for f in ("sft.parquet", "sft.jsonl", "pref.jsonl")):
        data.make_synthetic(data_dir, seed=seed)
    if not with_model:
        return None, data_dir
    if os.path.exists(os.path.join(model_dir, "config.json")):
        return model_dir, data_dir
    rng = random.Random(seed)
    fmt = data.MATH_FORMAT_PROMPT.replace("{{ content | trim }}", "").strip()
    texts = [q.replace("<image>", "") + " " + fmt for q in data.QUESTIONS]
    texts += [data.synthetic_response(rng.randint(0, 9)) for _ in range(20)]
    texts += ["You are a helpful assistant.", "system user assistant", "Find x. \\frac{1}{2} \\sqrt{3} 60^\\circ"]
    raw_dir = os.path.join(cache_dir, "random")
    modeling.build_tiny_model(raw_dir, texts * 20, seed=seed)
    # Written aside and renamed: an interrupted build never leaves a model folder that looks complete.
    warm_start(raw_dir, data_dir, model_dir + ".tmp", steps=warm_start_steps, grounded_steps=grounded_steps, seed=seed)
    os.replace(model_dir + ".tmp", model_dir)
    return model_dir, data_dir


def warm_start(model_dir, data_dir, out_dir, *, steps, grounded_steps, seed, batch_size=32):
    """Plain single-process SFT of the tiny random model, in two phases (fresh AdamW each):
    `steps` at lr 3e-3 on the answer format with answers drawn at random (the model learns to
    write `<think>...</think> \\boxed{k}` and to ignore the image), then `grounded_steps` at lr 1e-3
    on the true counts, stopped before accuracy moves off chance (measured: it jumps from ~20% to
    ~90% between 50 and 60 such steps)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = AutoProcessor.from_pretrained(model_dir)
    policy = modeling.load_model(model_dir)
    rows = data.load_rows(os.path.join(data_dir, "train.parquet"))
    eos = processor.tokenizer.eos_token_id
    for phase, n, lr in (("format", steps, 3e-3), ("grounded", grounded_steps, 1e-3)):
        opt = torch.optim.AdamW(policy.parameters(), lr=lr)
        for step in range(n):
            samples = []
            for i in rng.sample(range(len(rows)), batch_size):
                prompt = data.build_prompt(rows[i], i, processor, min_pixels=TINY["min_pixels"], max_pixels=TINY["max_pixels"])
                answer = prompt["answer"] if phase == "grounded" else rng.randint(1, 4)
                target = processor.tokenizer.encode(data.synthetic_response(answer)) + [eos]
                samples.append({**data.encode_prompt(prompt, processor), "response_ids": target})
            batch = data.collate(samples, processor.tokenizer.pad_token_id)
            logp = modeling.token_logprobs(policy, batch)
            loss = grpo.aggregate(grpo.sft_loss(logp, batch["response_mask"]), batch["response_mask"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == n - 1:
                print(f"warm-start ({phase}) step {step}: sft loss {loss.item():.4f}", flush=True)
    policy.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- helpers
def process_group_backend(device_type):
    """The backend for init_process_group. A bare "nccl" serves CUDA tensors only (torch maps a
    backend to its own devices, distributed_c10d.py), yet the metrics, counts and checkpoint
    metadata reduced here are host tensors: on GPUs gloo serves the CPU side (verl and torchtitan do
    the same). Moving each metric to the GPU instead would add a copy and a sync per reduction, and
    DCP and the object collectives pick their tensors' device themselves."""
    return "cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo"


def all_reduce(values, op=dist.ReduceOp.SUM):
    """Reduce a dict of floats over all ranks (one collective)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return dict(zip(keys, t.tolist()))


def unpad(values, mask):
    """(B, T) per-token values -> B CPU float tensors, each its row's response tokens only."""
    return [row[:int(n)].detach().float().cpu() for row, n in zip(values, mask.sum(1))]


def micro_batches(samples, size, pad_id, device, share_prompts=False):
    """(samples, padded batch on device) for consecutive slices of `size` samples."""
    for j in range(0, len(samples), size):
        micro = samples[j:j + size]
        batch = data.collate(micro, pad_id, share_prompts=share_prompts)
        yield micro, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def optimizer_step(policy, optimizer, chunk, cfg, *, use_kl, world_size, device, pad_id, banned_ids,
                   sft_chunk=(), mu=0.0):
    """One optimizer step on this rank's share `chunk` of a mini-batch (samples with sampler_logp, adv,
    with use_kl ref_logp, and old_logp unless on-policy: then this forward's own, detached, is kept
    with its entropy in each sample), in micro-batches with gradient accumulation.
    With CHORD (sft_chunk: expert samples), the loss is (1 - mu) * L_rl + mu * L_sft."""
    policy.train()  # back to eval() in clip_and_step
    counts = all_reduce({"tokens": sum(len(s["response_ids"]) for s in chunk), "seqs": len(chunk),
                         "sft_tokens": sum(len(s["response_ids"]) for s in sft_chunk)})
    # Each rank divides by the GLOBAL counts over world_size: FSDP2 averages gradients over ranks,
    # so the summed micro-batch losses have exactly the gradient of one big batch (FIELD-NOTES).
    agg = dict(mode=cfg.loss_agg, num_tokens=counts["tokens"] / world_size, num_seqs=counts["seqs"] / world_size,
               max_len=cfg.max_response_length)
    stats = {"loss/policy": 0.0, "loss/kl": 0.0, "kl": 0.0, "clip_frac": 0.0, "dual_clip_frac": 0.0, "ratio_max": 0.0}

    def batches(samples, rl=True):
        for micro, mb in micro_batches(samples, cfg.micro_batch_size, pad_id, device, cfg.share_prompts):
            fresh = rl and "old_logp" not in mb  # on-policy: the old policy is this one (see main)
            res = modeling.token_logprobs(policy, mb, temperature=cfg.temperature, banned_ids=banned_ids,
                                          with_entropy=fresh)
            logp = res[0] if fresh else res
            if fresh:
                mb["old_logp"] = logp.detach()
                for s, o, e in zip(micro, unpad(logp, mb["response_mask"]), unpad(res[1], mb["response_mask"])):
                    s["old_logp"], s["entropy"] = o, e
            yield micro, mb, logp

    for micro, mb, logp in batches(chunk):
        mask = mb["response_mask"]
        adv = torch.tensor([s["adv"] for s in micro], device=device)
        pg, m = grpo.policy_loss(logp, mb["old_logp"], adv, mask, ratio_level=cfg.ratio_level,
                                 clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
                                 dual_clip=cfg.dual_clip or None)
        if cfg.mismatch_correction != "none":  # vLLM sampled from pi_sampler, not pi_old: reweight
            w, wm = grpo.mismatch_weights(mb["old_logp"], mb["sampler_logp"], mask, level=cfg.mismatch_correction,
                                          cap=cfg.mismatch_cap)
            pg = pg * w
            for k, v in wm.items():
                stats[f"mismatch/{k}"] = stats.get(f"mismatch/{k}", 0.0) + v.item() * mask.sum().item() / agg["num_tokens"]
        loss = grpo.aggregate(pg, mask, **agg)
        stats["loss/policy"] += loss.item()
        if use_kl:
            kl = grpo.kl_penalty(logp, mb["ref_logp"], kind=cfg.kl_estimator)
            kl_loss = grpo.aggregate(kl, mask, **agg)
            loss = loss + cfg.kl_coef * kl_loss
            stats["loss/kl"] += kl_loss.item()
            stats["kl"] += grpo.aggregate(kl.detach(), mask, num_tokens=agg["num_tokens"]).item()
        ((1 - mu) * loss).backward()
        share = mask.sum().item() / agg["num_tokens"]  # this micro-batch's token share, for metric means
        stats["clip_frac"] += m["clip_frac"].item() * share
        stats["dual_clip_frac"] += m["dual_clip_frac"].item() * share
        stats["ratio_max"] = max(stats["ratio_max"], m["ratio_max"].item())
    if sft_chunk:
        stats["loss/sft"], stats["chord/mu"] = 0.0, mu
        for _, mb, logp in batches(list(sft_chunk), rl=False):
            sft = grpo.aggregate(grpo.sft_loss(logp, mb["response_mask"], phi=cfg.chord_phi), mb["response_mask"],
                                 num_tokens=counts["sft_tokens"] / world_size)
            (mu * sft).backward()
            stats["loss/sft"] += sft.item()
    stats["grad_norm"] = clip_and_step(policy, optimizer, cfg.max_grad_norm)
    return stats


def clip_and_step(policy, optimizer, max_grad_norm):
    """Clip the accumulated gradients to max_grad_norm and step; returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if torch.isfinite(grad_norm):  # a non-finite norm would poison Adam's moments (EasyR1 skips the step too)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    policy.eval()
    return grad_norm.item()


def mpo_step(policy, optimizer, pairs, cfg, *, delta, world_size, device, pad_id, banned_ids):
    """One MPO optimizer step on this rank's `pairs` ((chosen, rejected) samples with ref_logp), in
    micro-batches of micro_batch_size sequences (each pair side by side: one prompt forward). The pair terms are
    normalised by the global pair count, the SFT term by the global chosen-token count, as
    optimizer_step does. BCO's shift `delta` is held fixed during the step (grpo.bco_delta)."""
    policy.train()  # back to eval() in clip_and_step
    counts = all_reduce({"pairs": len(pairs), "tokens": sum(len(c["response_ids"]) for c, _ in pairs)})
    n_pairs, n_tokens = counts["pairs"] / world_size, counts["tokens"] / world_size
    weights = tuple(float(w) for w in cfg.mpo_weights.split(","))
    stats, rewards = {}, 0.0
    half = max(1, cfg.micro_batch_size // 2)
    for j in range(0, len(pairs), half):
        micro = pairs[j:j + half]
        k = len(micro)
        _, mb = next(micro_batches([s for pair in micro for s in pair], 2 * k, pad_id, device, cfg.share_prompts))
        mask = mb["response_mask"]
        logp = modeling.token_logprobs(policy, mb, banned_ids=banned_ids)
        logratio = ((logp - mb["ref_logp"]) * mask).sum(-1)  # (2k,): sum_t log pi(y_t) - log pi_ref(y_t)
        loss, m = grpo.mpo_loss(logratio[0::2], logratio[1::2], logp[0::2], mask[0::2], beta=cfg.mpo_beta, delta=delta,
                                weights=weights, num_pairs=n_pairs, num_tokens=n_tokens)
        loss.backward()
        for key, v in m.items():  # loss_* are already shares of the global mean; the others are micro means
            stats[f"mpo/{key}"] = stats.get(f"mpo/{key}", 0.0) + v.item() * (1 if key.startswith("loss_") else k / n_pairs)
        rewards += cfg.mpo_beta * logratio.detach().sum().item()
    stats["grad_norm"] = clip_and_step(policy, optimizer, cfg.max_grad_norm)
    stats["mpo/reward_mean"] = rewards / (2 * n_pairs)  # this rank's share of the mean of r_c and r_r
    return stats


def claim_out_dir(out_dir):
    """One run per out_dir: out_dir/run.lock holds the owner's pid and host; a second run stops here.
    A lock left by a run that died on this host (its pid is gone) is taken over. Rank 0 only."""
    lock, me = os.path.join(out_dir, "run.lock"), f"{os.getpid()} {socket.gethostname()}"
    while True:
        try:
            with open(lock, "x") as f:
                f.write(me)
            return lock
        except FileExistsError:
            pid, _, host = open(lock).read().partition(" ")
            if host != socket.gethostname() or not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
                raise SystemExit(f"{out_dir} is in use by the run with pid {pid} on {host} (lock file "
                                 f"{lock}; delete it if that run is over)")
            os.remove(lock)  # its owner is dead


def checkpoint_steps(ckpt_root):
    """The step numbers of the step_N folders in ckpt_root, oldest first."""
    names = os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else []
    return sorted(int(d[5:]) for d in names if re.fullmatch(r"step_\d+", d))


def find_checkpoint(resume, ckpt_root, world_size, say=print):
    """The folder to resume from ("" = a fresh start): `resume` itself, or for "auto" the newest
    whole checkpoint in ckpt_root, naming each damaged one it skips. A checkpoint of another world
    size is refused: each rank's data position and RNGs are its own."""
    if resume != "auto":
        candidates = [resume]
    else:
        candidates = [os.path.join(ckpt_root, f"step_{n}") for n in reversed(checkpoint_steps(ckpt_root))]
    for path in candidates:
        if problem := modeling.checkpoint_problem(path):
            if resume != "auto":
                raise SystemExit(f"--resume={resume}: {problem}")
            say(f"--resume=auto: skipping {path}: {problem}")
        elif problem := modeling.checkpoint_problem(path, world_size):
            raise SystemExit(f"--resume: {problem}; resume on that many ranks")
        else:
            return path
    return ""


def rewind_out_dir(out_dir, step):
    """Make out_dir's history end at `step` (the resumed step, 0 for a fresh start): metrics.jsonl
    keeps only records up to it, and checkpoints after it (a rollback with --resume=<older step>)
    are deleted, saying so, or the newest-first pruning would keep them and drop the new ones.
    (main refuses a fresh start into an out_dir that has checkpoints before anything loads.)"""
    ckpt_root, metrics = os.path.join(out_dir, "checkpoints"), os.path.join(out_dir, "metrics.jsonl")
    for n in [n for n in checkpoint_steps(ckpt_root) if n > step]:
        print(f"rewinding to step {step}: deleting {ckpt_root}/step_{n}", flush=True)
        shutil.rmtree(os.path.join(ckpt_root, f"step_{n}"))
    if os.path.exists(metrics):
        # A line cut short by a kill mid-write ends with no newline: it is dropped too.
        kept = [line for line in open(metrics) if line.endswith("\n") and json.loads(line)["step"] <= step]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics + ".tmp", metrics)


def on_rank0(fn, *args, rank):
    """fn(*args) on rank 0, its SystemExit raised on every rank (the others would wait forever in
    their next collective for a rank that has gone); returns fn's result on rank 0, None elsewhere."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn(*args)
        except SystemExit as e:
            error = str(e)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise SystemExit(box[0])
    return result


def peak_memory_gb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main(cfg):
    if cfg.algo != "grpo":  # offline losses are log-likelihoods of the data: no sampling temperature
        cfg = dataclasses.replace(cfg, temperature=1.0)

    # --- distributed setup: torchrun's env vars, or a world of one for plain `python train.py` ---
    if "RANK" not in os.environ:  # set what torchrun would, so one code path serves both
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    master_process = rank == 0

    def print0(*args):
        if master_process:
            print(*args, flush=True)

    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # Before vLLM: it builds its groups from this world. The timeout covers rank 0 reading (or
    # downloading) the weights alone while the others wait in the broadcast: NCCL's default is 10 min.
    dist.init_process_group(process_group_backend(device.type), timeout=datetime.timedelta(minutes=60))
    mesh = init_device_mesh(device.type, (world_size,))
    tp = cfg.vllm_tp if cfg.sampler == "vllm" else 1
    for name in ("global_batch_size", "rollout_batch_size"):  # before anything loads (minutes on a 7B)
        if getattr(cfg, name) % world_size:
            raise SystemExit(f"--{name}={getattr(cfg, name)} must be a multiple of the world size {world_size}")
    if world_size % tp:
        raise SystemExit(f"--vllm_tp={tp} must divide the world size {world_size}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    if not os.access(cfg.out_dir, os.W_OK):
        raise SystemExit(f"--out_dir={cfg.out_dir} is not writable")
    lock = on_rank0(claim_out_dir, cfg.out_dir, rank=rank) if not cfg.dry_run else None
    if lock:
        atexit.register(lambda: os.path.exists(lock) and os.remove(lock))
    ckpt_root = os.path.join(cfg.out_dir, "checkpoints")
    resume_from = find_checkpoint(cfg.resume, ckpt_root, world_size, say=print0) if cfg.resume else ""
    if not resume_from and checkpoint_steps(ckpt_root) and not cfg.dry_run:
        raise SystemExit(f"{ckpt_root} holds checkpoints {checkpoint_steps(ckpt_root)}: --resume=auto continues "
                         "from the newest; to start over, use another --out_dir or delete them")

    # --- model, data, sampler ---
    # "tiny" and "synthetic..." name the CPU default, built once (by rank 0) in cache_dir.
    train_data = cfg.train_data  # --algo=sft / mpo on the default data: the synthetic task's own rows
    if train_data == Config.train_data and cfg.algo != "grpo":
        train_data = {"sft": "synthetic/sft.jsonl", "mpo": "synthetic/pref.jsonl"}[cfg.algo]
    specs = {"model": cfg.model_path, "train": train_data, "val": cfg.val_data, "sft": cfg.sft_data}
    if cfg.model_path == "tiny" or any(v.startswith("synthetic") for v in specs.values()):
        tiny = dict(warm_start_steps=cfg.warm_start_steps, grounded_steps=cfg.warm_start_grounded_steps,
                    with_model=cfg.model_path == "tiny")  # a real model on synthetic data: data only
        if master_process:  # cache_dir, like out_dir, must be on a filesystem every node sees
            prepare_tiny(cfg.cache_dir, **tiny)
        dist.barrier()  # the other ranks wait, then take the same (already built) paths
        tiny_model, tiny_data = prepare_tiny(cfg.cache_dir, **tiny)
        specs = {k: tiny_model if v == "tiny" else tiny_data + v[len("synthetic"):] if v.startswith("synthetic") else v
                 for k, v in specs.items()}
    model_path, train_spec, val_spec = specs["model"], specs["train"], specs["val"]
    print0(f"model {model_path} | train {train_spec} | val {val_spec} | world {world_size} on {device.type}")
    if cfg.dry_run or use_cuda and cfg.memory_check:  # from the config alone, before any weights load
        import memplan

        gib = cfg.gpu_memory_gib or (torch.cuda.get_device_properties(device).total_memory / 2**30
                                     if use_cuda else memplan.DEFAULT_GPU_GIB)
        table, fits = memplan.plan_from_config(dataclasses.replace(cfg, model_path=model_path), world_size, gib)
        print0(table)
        if cfg.dry_run:
            dist.destroy_process_group()
            return
        if not fits:
            raise SystemExit("the memory plan above says this run does not fit; change the flags it names "
                             "(--memory_check=false starts it anyway)")
    format_prompt = None if cfg.format_prompt == "none" else data.MATH_FORMAT_PROMPT
    if cfg.format_prompt not in ("none", ""):
        with open(cfg.format_prompt) as f:
            format_prompt = data.check_format_prompt(f.read(), cfg.format_prompt)
    torch.manual_seed(cfg.seed)
    # The run's pixel bounds in the processor too (and in vLLM's, below): data.py resizes into them,
    # and the processor's rounding to 28-px units must then agree on both sides.
    processor = modeling.load_processor(model_path, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    tokenizer = processor.tokenizer
    # Built on the meta device, read by rank 0 only and broadcast; bf16 compute on GPU with fp32
    # gradient reduction, through FSDP2's mixed-precision policy.
    compute_dtype = torch.bfloat16 if use_cuda else torch.float32
    master_dtype = getattr(torch, cfg.master_dtype)
    fsdp = dict(param_dtype=compute_dtype, reduce_dtype=torch.float32, reshard_after_forward=cfg.reshard_after_forward)
    lora = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, seed=cfg.seed,
                targets=tuple(cfg.lora_targets.split(","))) if cfg.lora_rank else None
    policy = modeling.load_fsdp_model(model_path, mesh, rank=rank, master_dtype=master_dtype, cpu_offload=cfg.cpu_offload,
                                      activation_checkpointing=cfg.activation_checkpointing, freeze_vision=cfg.freeze_vision,
                                      freeze_merger=cfg.freeze_merger, freeze_llm=cfg.freeze_llm, lora=lora, **fsdp)
    policy.eval()  # train() only inside the updates: LoRA dropout must not touch old log-probs or sampling
    ref = None
    if cfg.algo == "mpo" or cfg.algo == "grpo" and cfg.kl_coef > 0:  # the KL / MPO anchor; else never built
        # Its shards in the compute dtype: it is never updated and computes in that dtype anyway
        # (bf16 on GPUs: half the memory of float32 shards, the same log-probs).
        ref = modeling.load_fsdp_model(model_path, mesh, rank=rank, master_dtype=compute_dtype,
                                       cpu_offload=cfg.ref_cpu_offload, **fsdp)
        ref.requires_grad_(False)
    # Before any forward: after one, FSDP2's root stays gathered and parameters() would hand the optimizer
    # the gathered copies, which it would update in vain. foreach: CUDA's default; on CPU 2.7 vs 9.5 ms a step.
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, foreach=True)

    def load_prompts(spec, kind="prompt"):
        prompts, summary = data.load_prompts(spec, processor, format_prompt=format_prompt, min_pixels=cfg.min_pixels,
                                             max_pixels=cfg.max_pixels, max_prompt_length=cfg.max_prompt_length,
                                             prompt_key=cfg.prompt_key, answer_key=cfg.answer_key,
                                             image_key=cfg.image_key, kind=kind)
        print0(summary)
        return prompts

    train_prompts = load_prompts(train_spec, {"grpo": "prompt", "sft": "sft", "mpo": "pref"}[cfg.algo])
    val_prompts = load_prompts(val_spec) if val_spec else []
    if cfg.val_max_prompts:
        val_prompts = val_prompts[:cfg.val_max_prompts]
    reward_fn = reward.load_reward(cfg.reward)
    banned = rollout.banned_token_ids(tokenizer)
    image_token_id = policy.config.image_token_id
    # A TP group (tp consecutive ranks, vLLM's layout) samples the same prompts with the same seeds;
    # each of its ranks then trains on its own 1/tp of the groups. dp_rank numbers the TP groups.
    dp_rank, tp_rank = rank // tp, rank % tp
    if cfg.sampler == "vllm":
        vllm_dtype = cfg.vllm_dtype if cfg.vllm_dtype != "auto" else ("bfloat16" if use_cuda else "float32")
        engine = rollout.make_engine(model_path, world_size=world_size, tp=tp, dtype=vllm_dtype, seed=cfg.seed,
                                     max_model_len=cfg.max_prompt_length + cfg.max_response_length,
                                     kv_cache_bytes=cfg.vllm_kv_cache_mb << 20,
                                     gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                                     enforce_eager=cfg.vllm_enforce_eager, sleep_mode=cfg.vllm_sleep_level > 0,
                                     min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                     max_images=max([1] + [len(p["images"]) for p in train_prompts + val_prompts]))

        def sample(prompts, **kw):
            return rollout.generate(engine, prompts, **kw)

        def sync():
            return rollout.sync_weights(engine, policy)
    else:  # hf
        def sample(prompts, **kw):
            batch_size = cfg.hf_batch_size or cfg.micro_batch_size
            return rollout.generate_hf(policy, processor, prompts, batch_size=batch_size, **kw)

        def sync():  # the sampler is the policy itself
            return 0.0
    # vLLM seeds the global RNGs when it starts; re-seed ours so runs are reproducible.
    torch.manual_seed(cfg.seed + rank)
    extra = modeling.load_checkpoint(resume_from, policy, optimizer, rank=rank) if resume_from else None
    if extra:
        print0(f"resumed from {resume_from} (step {extra['step']})")
        saved = {k: optimizer.param_groups[0][k] for k in ("lr", "weight_decay")}
        if saved != {"lr": cfg.lr, "weight_decay": cfg.weight_decay}:
            print0(f"the checkpoint's optimizer had {saved}; this run's --lr={cfg.lr} and "
                   f"--weight_decay={cfg.weight_decay} apply")
        for group in optimizer.param_groups:  # this run's flags win over the checkpoint's
            group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    on_rank0(rewind_out_dir, cfg.out_dir, extra["step"] if extra else 0, rank=rank)
    sync()

    G = cfg.num_generations
    prompts_per_rank = cfg.rollout_batch_size // world_size
    updates_per_step = cfg.rollout_batch_size // cfg.global_batch_size
    metrics_file = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if master_process else None

    def log(record):
        if master_process:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def logprobs(model, samples, with_entropy=False):
        """Per-sample log-prob lists under `model`, computed in micro-batches without gradients."""
        out, ent = [], []
        with torch.no_grad():
            for _, mb in micro_batches(samples, cfg.micro_batch_size, tokenizer.pad_token_id, device, cfg.share_prompts):
                res = modeling.token_logprobs(model, mb, temperature=cfg.temperature, banned_ids=banned,
                                              with_entropy=with_entropy)
                for dest, values in zip((out, ent), res if with_entropy else (res,)):  # log-probs[, entropies]
                    dest += unpad(values, mb["response_mask"])
        return (out, ent) if with_entropy else out

    def mean_scores(scores, prefix):
        """{prefix/key: mean} over every numeric key the reward returned (all ranks); prefix/n the count."""
        keys = sorted(k for k, v in scores[0].items() if isinstance(v, (int, float)))
        scores = [s for s in scores if math.isfinite(s["overall"])]  # a failed reward (counted apart)
        sums = all_reduce({"n": len(scores), **{k: sum(s[k] for s in scores) for k in keys}})
        out = {f"{prefix}/{k}": sums[k] / max(sums["n"], 1) for k in keys}
        out.setdefault(f"{prefix}/accuracy", out[f"{prefix}/overall"])  # custom rewards may give only overall
        return out, int(sums["n"])

    def validate(step, blank_images=False):
        """Validation accuracy at the validation sampling settings (n=1). blank_images replaces every
        image with a white one of the same size: what the model scores without seeing the figure."""
        if not val_prompts:
            return {}
        t0 = time.perf_counter()
        per = math.ceil(len(val_prompts) / (world_size // tp))  # contiguous shards: seeds follow the global index
        mine = val_prompts[dp_rank * per:(dp_rank + 1) * per]
        if blank_images:
            mine = [{**p, "images": [Image.new("RGB", im.size, "white") for im in p["images"]]} for p in mine]
        res = sample(mine, n=1, temperature=cfg.val_temperature, top_p=cfg.val_top_p,
                     max_tokens=cfg.max_response_length, seed=cfg.seed + dp_rank * per, banned_ids=banned)
        mine, res = mine[tp_rank::tp], res[tp_rank::tp]  # a TP group's ranks got the same answers: score each once
        inputs = [{"response": tokenizer.decode(r["samples"][0][0], skip_special_tokens=True),
                   "ground_truth": p["answer"], **p["row"]} for p, r in zip(mine, res)]
        scores, _ = reward.score_batch(reward_fn, inputs, timeout_s=cfg.reward_timeout)
        prefix = "val_blank" if blank_images else "val"
        means, n = mean_scores(scores, prefix)
        record = {"step": step, **means, f"{prefix}/n": n, f"{prefix}/temperature": cfg.val_temperature,
                  f"{prefix}/top_p": cfg.val_top_p, "time/val": time.perf_counter() - t0}
        log(record)
        print0(f"step {step}: {prefix}/accuracy {record[prefix + '/accuracy']:.3f} "
               f"(temperature {cfg.val_temperature}, top_p {cfg.val_top_p}, n={n})")
        return record

    # One shuffled order of the training prompts per epoch, the same on every rank.
    order_rng = random.Random(cfg.seed)
    order, cursor, draws = [], 0, 0

    def next_prompts():
        """This TP group's share of the next rollout_batch_size prompts, and the round's sampling seed.
        Seeds follow the global prompt index, so the samples do not depend on the world size."""
        nonlocal order, cursor, draws
        picked = []
        while len(picked) < cfg.rollout_batch_size:
            if cursor == len(order):
                order, cursor = list(range(len(train_prompts))), 0
                order_rng.shuffle(order)
            picked.append(order[cursor])
            cursor += 1
        draws += 1
        per_group = prompts_per_rank * tp
        seed = (cfg.seed * 1_000_003 + draws) * 4099 + dp_rank * G * per_group
        return [train_prompts[i] for i in picked[dp_rank * per_group:(dp_rank + 1) * per_group]], seed

    def sample_groups(prompts, seed):
        """Rollout + reward for a list of prompts -> one (samples, scores) per group this rank keeps."""
        t = time.perf_counter()
        res = sample(prompts, n=G, temperature=cfg.temperature, top_p=cfg.top_p,
                     max_tokens=cfg.max_response_length, seed=seed, banned_ids=banned)
        prompts, res = prompts[tp_rank::tp], res[tp_rank::tp]  # this rank's 1/tp of its TP group's groups
        samples = []
        for p, r in zip(prompts, res):
            enc = r.get("encoded") or data.encode_prompt(p, processor)  # generate_hf's own, or the trainer's
            if enc["prompt_ids"].tolist() != r["prompt_token_ids"]:
                raise RuntimeError("vLLM's prompt token ids differ from the processor's: the sampler and "
                                   "the trainer would see different prompts (check the chat template)")
            samples += [{**enc, "response_ids": ids, "sampler_logp": torch.tensor(lps), "prompt": p}
                        for ids, lps in r["samples"]]
        timing["time/rollout"] += time.perf_counter() - t
        t = time.perf_counter()
        inputs = [{"response": tokenizer.decode(s["response_ids"], skip_special_tokens=True),
                   "ground_truth": s["prompt"]["answer"], **s["prompt"]["row"]} for s in samples]
        scores, stats = reward.score_batch(reward_fn, inputs, timeout_s=cfg.reward_timeout)
        for k, v in {**stats, "reward/scored": len(inputs)}.items():
            reward_stats[k] = reward_stats.get(k, 0.0) + v
        timing["time/reward"] += time.perf_counter() - t
        return [(samples[i:i + G], scores[i:i + G]) for i in range(0, len(samples), G)]

    sft_rows = data.load_rows(specs["sft"]) if cfg.sft_data else None
    sft_rng = random.Random(cfg.seed + rank)

    def with_response(prompt, text):
        """A trainer sample whose response is a given text (SFT data, preference pairs), not a rollout."""
        return {**data.encode_prompt(prompt, processor),
                "response_ids": tokenizer.encode(text) + [tokenizer.eos_token_id]}

    def sft_samples(n):
        """n expert samples (prompt + its `response` field) for the CHORD SFT term."""
        out = []
        for i in sft_rng.sample(range(len(sft_rows)), n):
            row = sft_rows[i]
            p = data.build_prompt(row, i, processor, format_prompt=format_prompt, min_pixels=cfg.min_pixels,
                                  max_pixels=cfg.max_pixels, source=cfg.sft_data)
            out.append(with_response(p, row["response"]))
        return out

    mpo_state = {"delta": 0.0, "batches": 0}  # BCO's running shift and how many steps are in it

    def offline_step(step):
        """SFT or MPO on the next rollout_batch_size rows (updates_per_step optimizer steps): the batch
        comes from the data, not the sampler. Returns the step's metrics, reduced over ranks."""
        t0 = time.perf_counter()
        rows = next_prompts()[0][tp_rank::tp]
        per_update, updates = len(rows) // updates_per_step, []
        for u in range(updates_per_step):
            chunk = rows[u * per_update:(u + 1) * per_update]
            if cfg.algo == "sft":  # CHORD's SFT term alone: mu = 1, no phi weighting
                stats = optimizer_step(policy, optimizer, [], dataclasses.replace(cfg, chord_phi=False), use_kl=False,
                                       world_size=world_size, device=device, pad_id=tokenizer.pad_token_id,
                                       banned_ids=banned, sft_chunk=[with_response(p, p["response"]) for p in chunk], mu=1.0)
                updates.append({k: stats[k] for k in ("loss/sft", "grad_norm")})
                continue
            pairs = [(with_response(p, p["chosen"]), with_response(p, p["rejected"])) for p in chunk]
            flat = [s for pair in pairs for s in pair]
            for s, r_ in zip(flat, logprobs(ref, flat)):
                s["ref_logp"] = r_
            ref.reshard()
            stats = mpo_step(policy, optimizer, pairs, cfg, delta=mpo_state["delta"], world_size=world_size,
                             device=device, pad_id=tokenizer.pad_token_id, banned_ids=banned)
            mean = all_reduce({"r": stats["mpo/reward_mean"]})["r"] / world_size
            mpo_state["delta"] = grpo.bco_delta(mpo_state["delta"], mpo_state["batches"], [mean])
            mpo_state["batches"] += 1
            updates.append({**stats, "mpo/delta": mpo_state["delta"]})
        record = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
        record = {k: v / world_size for k, v in all_reduce(record).items()}
        record["time/update"] = time.perf_counter() - t0
        record["memory/peak_gb"] = all_reduce({"m": peak_memory_gb()}, op=dist.ReduceOp.MAX)["m"]
        return record

    def save(step):
        """A checkpoint that resumes exactly: weights, Adam state, the data order and position, RNGs."""
        state = {"step": step, "order": order, "cursor": cursor, "draws": draws, "order_rng": order_rng.getstate(),
                 "sft_rng": sft_rng.getstate(), "torch_rng": torch.get_rng_state(), "mpo": dict(mpo_state)}
        modeling.save_checkpoint(os.path.join(ckpt_root, f"step_{step}"), policy, optimizer, state, rank=rank)
        if master_process:
            done = sorted(int(d[5:]) for d in os.listdir(ckpt_root) if re.fullmatch(r"step_\d+", d))
            for old_step in done[:-cfg.save_limit] if cfg.save_limit > 0 else []:
                shutil.rmtree(os.path.join(ckpt_root, f"step_{old_step}"))

    # SIGTERM (a scheduler's notice before preemption) and Ctrl-C end the run after the current step,
    # with a checkpoint; a second signal ends it at once.
    caught = []

    def on_signal(signum, frame):
        caught.append(signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    def checkpoint_or_stop(step, reason=""):
        """The step's checkpoint (every save_freq steps), and the end of the run, with a checkpoint, on
        a signal or a circuit breaker's `reason`. Every rank decides alike (a signal may reach one)."""
        stop = all_reduce({"stop": float(bool(caught or reason))}, op=dist.ReduceOp.MAX)["stop"]
        if stop or cfg.save_freq and step % cfg.save_freq == 0:
            save(step)
        if stop:
            raise SystemExit(f"stopped after step {step}: {reason or ' and '.join(caught) or 'a signal on another rank'}"
                             f"; checkpoint {ckpt_root}/step_{step} (--resume=auto continues from it)")

    start, bad_steps = 1, 0
    if extra:
        start = extra["step"] + 1
        order, cursor, draws = extra["order"], extra["cursor"], extra["draws"]
        order_rng.setstate(extra["order_rng"])
        sft_rng.setstate(extra["sft_rng"])
        torch.set_rng_state(extra["torch_rng"])
        mpo_state.update(extra.get("mpo", {}))
    first_val = validate(0) if start == 1 else {}
    t_start = time.perf_counter()
    for step in tqdm(range(start, cfg.max_steps + 1), disable=not master_process, desc="grpo",
                     initial=start - 1, total=cfg.max_steps):
        if cfg.algo != "grpo":  # SFT / MPO: no rollouts; the sampler gets the weights only to validate
            log({"step": step, **offline_step(step)})
            if cfg.val_freq and step % cfg.val_freq == 0 and step != cfg.max_steps:
                sync()
                validate(step)
            checkpoint_or_stop(step)
            continue
        timing, t0 = {"time/rollout": 0.0, "time/reward": 0.0}, time.perf_counter()
        reward_stats = {}
        # ---------------------------------------------------------------- rollout and reward
        # DAPO dynamic sampling keeps only groups whose accuracy varies (the others have zero
        # advantage) and samples more prompts until the batch is full. It filters on accuracy, not on
        # a score with the format bonus (EasyR1 filters on "overall": all-wrong well-formatted groups
        # pass). Every rank takes part in every round, so FSDP sees the same micro-batch count.
        groups, rounds = [], 0
        while True:
            rounds += 1
            new = sample_groups(*next_prompts())
            if cfg.dynamic_sampling and rounds < cfg.max_sample_tries:
                acc = torch.tensor([s.get("accuracy", s["overall"]) for _, sc in new for s in sc])
                keep = grpo.filter_groups(acc, G, low=cfg.filter_low, high=cfg.filter_high)
                new = [g for g, k in zip(new, keep.tolist()) if k]
            groups += new
            if all_reduce({"short": float(len(groups) < prompts_per_rank)}, op=dist.ReduceOp.MAX)["short"] == 0:
                break
        groups = groups[:prompts_per_rank]
        samples = [s for g, _ in groups for s in g]
        scores = [s for _, sc in groups for s in sc]
        rewards = torch.tensor([s["overall"] for s in scores], dtype=torch.float32)
        if cfg.sampler == "vllm" and cfg.vllm_sleep_level:  # CUDA: vLLM's memory goes to the trainer until the sync
            rollout.sleep(engine, cfg.vllm_sleep_level)
        # ---------------------------------------------------------------- old / ref log-probs
        t = time.perf_counter()
        per_update = len(samples) // updates_per_step  # this rank's sequences per optimizer step
        # The first optimizer step is on-policy: its old log-probs are its own forward's, detached, as in TRL and
        # verl; not with --kl_in_reward (needed before the advantages) or LoRA dropout (noisy in train mode).
        fresh = 0 if cfg.kl_in_reward or cfg.lora_dropout else per_update  # samples[:fresh] skip this forward
        for s, o, e in zip(samples[fresh:], *logprobs(policy, samples[fresh:], with_entropy=True)):
            s["old_logp"], s["entropy"] = o, e
        for s, r_ in zip(samples, logprobs(ref, samples) if ref is not None else []):
            s["ref_logp"] = r_
        if ref is not None:  # FSDP2 leaves a root gathered after a no-grad forward (embed + lm_head)
            ref.reshard()
        timing["time/logprobs"] = time.perf_counter() - t
        # ---------------------------------------------------------------- advantages
        if cfg.kl_in_reward:  # the KL penalty as a cost in the reward (old vs ref), not a loss term
            rewards = rewards - cfg.kl_coef * torch.stack(
                [grpo.kl_penalty(s["old_logp"], s["ref_logp"], kind=cfg.kl_estimator).sum() for s in samples])
        if cfg.adv_estimator == "rloo":
            adv = grpo.rloo_advantages(rewards, G)
        else:
            adv = grpo.group_advantages(rewards, G, std_norm=cfg.adv_std_norm)
        for s, a in zip(samples, adv.tolist()):
            s["adv"] = a
        # ---------------------------------------------------------------- update
        t = time.perf_counter()
        mu = grpo.chord_mu(step, mu_peak=cfg.chord_mu_peak, mu_valley=cfg.chord_mu_valley,
                           warmup_steps=cfg.chord_warmup_steps, decay_steps=cfg.chord_decay_steps) if sft_rows else 0.0
        updates = [optimizer_step(policy, optimizer, samples[u * per_update:(u + 1) * per_update], cfg,
                                  use_kl=ref is not None and not cfg.kl_in_reward, world_size=world_size,
                                  device=device, pad_id=tokenizer.pad_token_id, banned_ids=banned,
                                  sft_chunk=sft_samples(cfg.sft_batch_size // world_size) if sft_rows else (), mu=mu)
                   for u in range(updates_per_step)]
        stats = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
        stats["ratio_max"] = max(u["ratio_max"] for u in updates)
        timing["time/update"] = time.perf_counter() - t
        # ---------------------------------------------------------------- weight sync
        timing["time/sync"] = sync()
        # ---------------------------------------------------------------- log
        timing["time/step"] = time.perf_counter() - t0
        diffs = torch.cat([(s["old_logp"] - s["sampler_logp"]).abs() for s in samples])
        local = {"adv/mean": adv.mean().item(), "adv/std": adv.std().item(),
                 "adv/abs_mean": adv.abs().mean().item(), "adv/zero_std_groups": (adv.view(-1, G) == 0).all(1).float().mean().item(),
                 "response/length": sum(len(s["response_ids"]) for s in samples) / len(samples),
                 "response/entropy": torch.cat([s["entropy"] for s in samples]).mean().item(),
                 "rollout/logp_diff_mean": diffs.mean().item(),
                 **{k: v for k, v in stats.items() if k != "ratio_max"},
                 "rollout/rounds": rounds, **reward_stats, **timing, "memory/peak_gb": peak_memory_gb()}
        # Tokens trained on this step, all ranks (EasyR1's throughput counts prompt + image + response):
        # the prompt ids are processor-expanded, so they include the image's tokens.
        counts = {"tokens/prompt": sum(len(s["prompt_ids"]) for s in samples),
                  "tokens/image": sum(int((s["prompt_ids"] == image_token_id).sum()) for s in samples),
                  "tokens/response": sum(len(s["response_ids"]) for s in samples)}
        local.update(counts)
        record = {k: v / world_size for k, v in all_reduce(local).items()}
        record.update(mean_scores(scores, "reward")[0])
        record.update(all_reduce({"rollout/logp_diff_max": diffs.max().item(), "ratio_max": stats["ratio_max"],
                                  "memory/peak_gb": local["memory/peak_gb"], "time/step": timing["time/step"]},
                                 op=dist.ReduceOp.MAX))
        for k in [*reward_stats, *counts]:  # counts add up over ranks
            record[k] *= world_size
        # A non-finite loss or gradient norm skips an update (clip_and_step): counted, and a circuit breaker.
        record["update/skipped"] = sum(not math.isfinite(u["grad_norm"]) for u in updates)
        bad_steps = bad_steps + 1 if record["update/skipped"] == updates_per_step else 0
        log({"step": step, **record})
        # ---------------------------------------------------------------- eval
        if cfg.val_freq and step % cfg.val_freq == 0 and step != cfg.max_steps:
            validate(step)
        # ---------------------------------------------------------------- checkpoint
        reason = f"{bad_steps} steps in a row skipped every update (non-finite loss or gradient norm)" \
            if bad_steps >= cfg.max_bad_steps else ""
        if record["reward/failed"] + record["reward/timed_out"] >= record["reward/scored"]:
            reason = f"the reward failed or timed out on every sample of step {step} (see the warnings above)"
        checkpoint_or_stop(step, reason)
    if cfg.algo != "grpo":
        sync()
    last_val = validate(cfg.max_steps)
    wall = time.perf_counter() - t_start
    # The same validation with blank images: if the task needs the figure, this falls to chance.
    blank = validate(cfg.max_steps, blank_images=True) \
        if first_val and last_val and any(p["images"] for p in val_prompts) else {}
    # ---------------------------------------------------------------- save
    if cfg.sampler == "vllm":  # CUDA: the save gathers whole tensors; vLLM's memory goes back first
        rollout.sleep(engine, 1)
    if cfg.save_hf:
        modeling.save_hf(policy, processor, os.path.join(cfg.out_dir, "hf"), rank=rank)  # LoRA: merged
        if cfg.lora_rank:  # and the adapters alone, in PEFT's format
            modeling.save_lora_adapter(policy, os.path.join(cfg.out_dir, "adapter"), rank=rank)
    if first_val and last_val:
        print0(f"done: {cfg.max_steps} steps in {wall:.0f}s; val/accuracy {first_val['val/accuracy']:.3f} -> "
               f"{last_val['val/accuracy']:.3f}" + (f" (with blank images: {blank['val_blank/accuracy']:.3f})" if blank else ""))
    dist.barrier()
    # No destroy_process_group: vLLM tears down its groups (built on this world) at exit.


if __name__ == "__main__":
    main(parse_flags(sys.argv[1:]))
