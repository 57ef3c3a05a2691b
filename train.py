"""GRPO for Qwen2.5-VL: setup functions, then one loop in `main`.

    python train.py                                   # tiny model + synthetic data, on the CPU
    torchrun --nproc_per_node 4 train.py --model_path=Qwen/Qwen2.5-VL-7B-Instruct \
        --train_data=hiyouga/geometry3k@train --val_data=hiyouga/geometry3k@test

Each step: every rank samples G responses for its share of the prompts with its own in-process
vLLM engine, scores them, turns the scores into group-relative advantages, computes old and
reference log-probs, takes the clipped-surrogate update(s) through FSDP2, and pushes the new
weights into its engine. Simplifications, on purpose: groups never cross ranks (each rank samples
whole groups), no padding-free packing, synchronous rollouts. SFT and MPO on fixed data:
train_offline.py, which reuses this file's setup.

A sample is one response, a dict (data.collate pads a list of them into a batch):
  prompt_ids     (P,) long    data.encode_prompt: the processor's ids, image pads expanded
  pixel_values   (N, D)       data.encode_prompt, with image_grid_thw (images, 3); absent
                              for a text-only prompt
  prompt         dict         data.build_prompt: text, images, answer, the row's fields
  response_ids   list (R,)    the sampler
  sampler_logp   (R,) float   the sampler: log p of each token under the sampler's weights
  old_logp       (R,) float   main: the policy before this step's updates, and entropy (R,)
  ref_logp       (R,) float   main: the reference model (kl_coef > 0)
The advantages are a (B,) tensor in the samples' order, never stored in them.
"""
import datetime
import math
import os
import random
import resource
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from PIL import Image
from torch.distributed.device_mesh import init_device_mesh
import transformers
from tqdm import tqdm

import checkpoints
import data
import flags
import grpo
import memplan
import model as modeling
import patches
import reward
import rollout
import runlog
import tiny
from runlog import print0


@dataclass
class Config:
    # --- model and data ---
    model_path: str = "tiny"  # hub id or local folder; "tiny" = the CPU default, built in cache_dir
    train_data: str = "synthetic@train"  # name@split, a folder, or .parquet/.json/.jsonl
    val_data: str = "synthetic@test"  # same forms; "" = no validation
    cache_dir: str = ".cache/tiny"  # where the tiny model and the synthetic data are built
    out_dir: str = "out"  # metrics.jsonl, checkpoints/, samples/, curves.png, hf/ (the final model)
    format_prompt: str = ""  # jinja file with {{ content }}; "" = data.MATH_FORMAT_PROMPT; "none"
    min_pixels: int = 262144  # images are resized so that their area is in [min_pixels, max_pixels]
    max_pixels: int = 4194304
    max_prompt_length: int = 2048  # tokens with the image's; longer prompts are skipped, counted
    prompt_key: str = "problem"  # the row fields of the prompt (with <image>), answer and images
    answer_key: str = "answer"
    image_key: str = "images"
    # --- rollout ---
    sampler: str = "vllm"  # vllm (in-process engine) | hf (the trainer's model decodes)
    num_generations: int = 5  # G, responses per prompt
    rollout_batch_size: int = 512  # prompts per step, all ranks together
    max_response_length: int = 2048  # tokens
    temperature: float = 1.0  # sampling temperature; log-probs are taken at the same one
    top_p: float = 1.0
    vllm_gpu_memory_utilization: float = 0.6  # GPU share for vLLM (weights + KV cache)
    vllm_kv_cache_mb: int = 0  # KV cache in MiB (0 = from vllm_gpu_memory_utilization); CPU: set
    vllm_enforce_eager: bool = False  # True disables CUDA graphs
    vllm_tp: int = 1  # tensor parallel: vllm_tp consecutive ranks share one engine's prompts
    vllm_sleep_level: int = 1  # CUDA: free vLLM's memory between rollouts (1 = to host, 2 = drop)
    hf_batch_size: int = 0  # --sampler=hf: sequences decoded together (0 = micro_batch_size)
    # --- algorithm ---
    adv_estimator: str = "grpo"  # grpo | rloo
    adv_std_norm: bool = True  # divide by the group std (False = Dr.GRPO)
    ratio_level: str = "token"  # token | sequence (GSPO) | sequence_token (GSPO-token)
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.3
    dual_clip: float = 3.0  # 0 = no dual clip
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum[_norm]
    kl_coef: float = 1e-2  # 0 = no reference model at all
    kl_estimator: str = "k3"  # k1 | k2 | k3 | abs
    kl_in_reward: bool = False  # subtract kl_coef * sum_t KL(old || ref) from each reward instead
    dynamic_sampling: bool = False  # DAPO: keep only groups whose accuracy is neither 0 nor 1
    max_sample_tries: int = 4  # rollout rounds per step before dynamic sampling takes any group
    mismatch_correction: str = "none"  # none | token | sequence: IS weight old / sampler, truncated
    mismatch_cap: float = 3.0  # the truncation cap of that weight
    sft_data: str = ""  # CHORD: rows with problem/images/response; "" = no SFT term
    sft_batch_size: int = 16  # SFT rows per optimizer step, all ranks together
    chord_mu_peak: float = 0.9  # loss = (1 - mu) L_rl + mu L_sft; mu warms up, then decays
    chord_mu_valley: float = 0.05
    chord_warmup_steps: int = 0
    chord_decay_steps: int = 100
    chord_phi: bool = True  # weight SFT tokens by p (1 - p) (CHORD-phi)
    reward: str = "math"  # math | r1v | choice | random | path/to/file.py:function
    reward_timeout: float = 10.0  # seconds per reward chunk before it is scored 0
    # --- optimisation ---
    lr: float = 1e-6
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    master_dtype: str = "float32"  # sharded weights and AdamW states: float32 | bfloat16
    reshard_after_forward: bool = True  # False: layers stay gathered until backward (more memory)
    cpu_offload: bool = False  # FSDP2 keeps params, grads and AdamW states in host RAM
    activation_checkpointing: bool = False  # recompute each decoder layer / vision block
    freeze: str = ""  # parts not trained, comma-separated: vision, merger, llm (with lm_head)
    ref_cpu_offload: bool = False  # the frozen reference model's shards in host RAM
    lora_rank: int = 0  # > 0: LoRA on the language model's linears (merged into vLLM at each sync)
    lora_alpha: float = 32.0  # the adapters' scale is lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    global_batch_size: int = 128  # prompts per optimizer step (rollout_batch_size / it updates)
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    max_tokens_per_micro_batch: int = 0  # > 0: a micro-batch's padded tokens, not micro_batch_size
    share_prompts: bool = True  # a micro-batch runs each group's prompt once
    max_steps: int = 60
    seed: int = 1
    # --- validation and output ---
    val_freq: int = 5  # validate every val_freq steps, and always first and last (0 = only those)
    val_temperature: float = 0.6  # 0 = greedy
    val_top_p: float = 0.95
    val_max_prompts: int = 0  # 0 = the whole validation set
    save_hf: bool = True  # write out_dir/hf at the end
    save_freq: int = 0  # checkpoint (model, optimizer, data position, RNG) every save_freq steps
    save_limit: int = 2  # keep the newest save_limit checkpoints; <= 0 = keep all
    resume: str = ""  # "auto" = the newest checkpoint in out_dir/checkpoints, or a folder
    max_bad_steps: int = 3  # stop (with a checkpoint) after this many steps in a row without update
    verbose: bool = False  # show every library's logging (vLLM's, progress bars)
    wandb_project: str = ""  # log to Weights & Biases too ("" = no wandb)
    wandb_name: str = ""  # the wandb run's name ("" = wandb's)
    # --- memory plan (memplan.py) ---
    dry_run: bool = False  # print the memory plan per rank and phase, then exit: nothing loads
    gpu_memory_gib: float = 0.0  # the GPU size the plan assumes; 0 = the visible GPU's, else 79.2
    memory_check: bool = True  # CUDA: refuse to start when the plan says the run does not fit


def parse_flags(argv, config=Config):
    """`config` from --name=value flags, every value checked before anything loads: flags.py."""
    return flags.parse(argv, config)


# ----------------------------------------------------------------------------- setup
def init_distributed():
    """torchrun's env vars, or a world of one for plain `python train.py`: (rank, world_size,
    device, mesh). Before vLLM starts: it builds its own groups from this world."""
    if "RANK" not in os.environ:  # set what torchrun would, so one code path serves both
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # 60 minutes, not NCCL's 10: rank 0 may read (or download) a 7B alone while the others wait.
    dist.init_process_group(process_group_backend(device.type),
                            timeout=datetime.timedelta(minutes=60))
    return rank, world_size, device, init_device_mesh(device.type, (world_size,))


def process_group_backend(device_type):
    """A bare "nccl" serves CUDA tensors only (torch maps a backend to its devices,
    distributed_c10d.py), yet the metrics, counts and checkpoint metadata reduced here are host
    tensors: gloo serves the CPU side, as in verl and torchtitan. Moving each metric to the GPU
    would add a copy and a sync per reduction."""
    return "cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo"


def all_reduce(values, op=dist.ReduceOp.SUM):
    """Reduce a dict of floats over all ranks (one collective)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return dict(zip(keys, t.tolist()))


def prepare_out_dir(cfg, rank, world_size):
    """Checks that need no model, then out_dir claimed for this run and the checkpoint to resume
    from ("" = a fresh start): checkpoints.claim."""
    tp = tp_size(cfg)
    for name in ("global_batch_size", "rollout_batch_size"):
        if getattr(cfg, name) % world_size:
            raise SystemExit(f"--{name}={getattr(cfg, name)} must be a multiple of the world "
                             f"size {world_size}")
    if world_size % tp:
        raise SystemExit(f"--vllm_tp={tp} must divide the world size {world_size}")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out_dir={cfg.out_dir} cannot be made: {e.strerror}")
    if not os.access(cfg.out_dir, os.W_OK):
        raise SystemExit(f"--out_dir={cfg.out_dir} is not writable")
    return "" if cfg.dry_run else checkpoints.claim(cfg.out_dir, cfg.resume, rank, world_size)


def resolve_paths(cfg, rank, train_data):
    """{model, train, val, sft} as paths: "tiny" and "synthetic..." name the CPU default, built
    once by rank 0 in cache_dir (like out_dir, on a filesystem every node sees)."""
    paths = {"model": cfg.model_path, "train": train_data, "val": cfg.val_data,
             "sft": cfg.sft_data}
    if rank == 0:
        tiny.resolve(paths, cfg.cache_dir)
    dist.barrier()  # the other ranks wait, then find the same (already built) paths
    return tiny.resolve(paths, cfg.cache_dir)


def load_models(cfg, model_path, mesh, device, *, with_ref):
    """(processor, policy, ref or None, optimizer). Built on the meta device, read by rank 0 only
    and broadcast; bf16 compute on GPU with fp32 gradient reduction (FSDP2 mixed precision)."""
    torch.manual_seed(cfg.seed)  # LoRA's initial A
    # The run's pixel bounds in the processor too (and in vLLM's): data.py resizes into them,
    # and the processor's rounding to 28-px units must then agree on both sides.
    processor = patches.load_processor(
        model_path, size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels})
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fsdp = dict(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                reshard_after_forward=cfg.reshard_after_forward)
    lora = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, seed=cfg.seed,
                targets=tuple(cfg.lora_targets.split(","))) if cfg.lora_rank else None
    freeze = cfg.freeze.split(",")
    policy = modeling.load_fsdp_model(
        model_path, mesh, rank=mesh.get_rank(), master_dtype=getattr(torch, cfg.master_dtype),
        cpu_offload=cfg.cpu_offload, activation_checkpointing=cfg.activation_checkpointing,
        freeze_vision="vision" in freeze, freeze_merger="merger" in freeze,
        freeze_llm="llm" in freeze, lora=lora, **fsdp)
    policy.eval()  # train() only inside updates: LoRA dropout must not touch sampling or old_logp
    ref = None
    if with_ref:  # in the compute dtype: never updated, so bf16 shards give the same log-probs
        ref = modeling.load_fsdp_model(model_path, mesh, rank=mesh.get_rank(),
                                       master_dtype=compute_dtype,
                                       cpu_offload=cfg.ref_cpu_offload, **fsdp)
        ref.requires_grad_(False)
    # Before any forward: after one, FSDP2's root stays gathered and parameters() would hand the
    # optimizer the gathered copies. foreach: CUDA's default; on CPU 2.7 vs 9.5 ms a step.
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, foreach=True)
    return processor, policy, ref, optimizer


def read_format_prompt(cfg):
    if cfg.format_prompt in ("none", ""):
        return None if cfg.format_prompt == "none" else data.MATH_FORMAT_PROMPT
    with open(cfg.format_prompt) as f:
        return data.check_format_prompt(f.read(), cfg.format_prompt)


def load_prompts(cfg, spec, processor, kind="prompt"):
    """data.load_prompts with the run's format prompt, pixel bounds and row keys."""
    prompts, summary = data.load_prompts(
        spec, processor, format_prompt=read_format_prompt(cfg), min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels, max_prompt_length=cfg.max_prompt_length,
        prompt_key=cfg.prompt_key, answer_key=cfg.answer_key, image_key=cfg.image_key, kind=kind)
    print0(summary)
    return prompts


def make_sampler(cfg, model_path, policy, processor, world_size, max_images):
    """(sample, sync, sleep). sample(prompts, n, temperature, top_p, seed) returns this rank's
    (prompts, results): a TP group (vllm_tp consecutive ranks, vLLM's layout) samples the same
    prompts with the same seeds, and each of its ranks keeps its own 1/tp of them. sync() pushes
    the policy's weights into the sampler (seconds it took); sleep(level) frees vLLM's memory."""
    rank, tp = dist.get_rank(), tp_size(cfg)
    banned = rollout.banned_token_ids(processor.tokenizer)
    if cfg.sampler == "hf":  # the sampler is the policy itself: nothing to sync
        def sample(prompts, **kw):
            return prompts, rollout.generate_hf(policy, processor, prompts, banned_ids=banned,
                                                batch_size=cfg.hf_batch_size or
                                                cfg.micro_batch_size, **kw)

        return sample, lambda: 0.0, lambda level: None
    engine = rollout.make_engine(
        model_path, world_size=world_size, tp=tp, seed=cfg.seed, verbose=cfg.verbose,
        dtype="bfloat16" if torch.cuda.is_available() else "float32",
        max_model_len=cfg.max_prompt_length + cfg.max_response_length,
        kv_cache_bytes=cfg.vllm_kv_cache_mb << 20,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        enforce_eager=cfg.vllm_enforce_eager, sleep_mode=cfg.vllm_sleep_level > 0,
        min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, max_images=max_images)

    def sample(prompts, **kw):
        results = rollout.generate(engine, prompts, banned_ids=banned, **kw)
        return prompts[rank % tp::tp], results[rank % tp::tp]

    return (sample, lambda: rollout.sync_weights(engine, policy),
            lambda level: rollout.sleep(engine, level))


# ----------------------------------------------------------------------------- the step's parts
def next_prompts(train_prompts, pos, order_rng, cfg, dp_rank, n_dp):
    """This TP group's share of the next rollout_batch_size prompts of one shuffled order per epoch
    (the same on every rank), and its sampling seed. pos (order, cursor, draws) moves on."""
    picked = []
    while len(picked) < cfg.rollout_batch_size:
        if pos["cursor"] == len(pos["order"]):
            pos["order"], pos["cursor"] = list(range(len(train_prompts))), 0
            order_rng.shuffle(pos["order"])
        picked.append(pos["order"][pos["cursor"]])
        pos["cursor"] += 1
    pos["draws"] += 1
    share = cfg.rollout_batch_size // n_dp
    # rollout.generate seeds request i with seed + G * i: offsetting by the share's first global
    # index makes a sample's seed depend on its prompt's place in the batch, not on the world
    # size. The primes space the runs (seeds) and the draws apart.
    seed = (cfg.seed * 1_000_003 + pos["draws"]) * 4099 + dp_rank * cfg.num_generations * share
    return [train_prompts[i] for i in picked[dp_rank * share:(dp_rank + 1) * share]], seed


def score(samples, reward_fn, tokenizer, timeout_s):
    """reward.score_batch on decoded responses after data.assistant_opening: (scores, stats)."""
    inputs = [{"response": data.assistant_opening(s["prompt"]["text"])
               + tokenizer.decode(s["response_ids"], skip_special_tokens=True),
               "ground_truth": s["prompt"]["answer"], **s["prompt"]["row"]} for s in samples]
    return reward.score_batch(reward_fn, inputs, timeout_s=timeout_s)


def sample_groups(sample, prompts, seed, cfg, processor, reward_fn):
    """Rollout and reward: (groups, stats), a group being (G samples, their G scores)."""
    t = time.perf_counter()
    prompts, results = sample(prompts, n=cfg.num_generations, temperature=cfg.temperature,
                              top_p=cfg.top_p, max_tokens=cfg.max_response_length, seed=seed)
    samples = []
    for p, r in zip(prompts, results):
        enc = r.get("encoded") or data.encode_prompt(p, processor)  # generate_hf's own, or ours
        if enc["prompt_ids"].tolist() != r["prompt_token_ids"]:
            raise RuntimeError("vLLM's prompt token ids differ from the processor's: the sampler "
                               "and the trainer would see different prompts (check the template)")
        samples += [{**enc, "response_ids": ids, "sampler_logp": torch.tensor(lps), "prompt": p}
                    for ids, lps in r["samples"]]
    stats = {"time/rollout": time.perf_counter() - t}
    t = time.perf_counter()
    scores, reward_stats = score(samples, reward_fn, processor.tokenizer, cfg.reward_timeout)
    stats.update(reward_stats, **{"reward/scored": len(samples),
                                  "time/reward": time.perf_counter() - t})
    G = cfg.num_generations
    return [(samples[i:i + G], scores[i:i + G]) for i in range(0, len(samples), G)], stats


def mean_scores(scores, prefix):
    """{prefix/key: mean over all ranks} for every numeric key of the reward, and the count.
    A failed reward (NaN, counted apart) is left out."""
    keys = sorted(k for k, v in scores[0].items() if isinstance(v, (int, float)))
    scores = [s for s in scores if math.isfinite(s["overall"])]
    sums = all_reduce({"n": len(scores), **{k: sum(s[k] for s in scores) for k in keys}})
    out = {f"{prefix}/{k}": sums[k] / max(sums["n"], 1) for k in keys}
    out.setdefault(f"{prefix}/accuracy", out[f"{prefix}/overall"])  # a custom reward's overall
    return out, int(sums["n"])


def unpad(values, mask):
    """(B, T) per-token values -> B CPU float tensors, each its row's response tokens only."""
    return [row[:int(n)].detach().float().cpu() for row, n in zip(values, mask.sum(1))]


def micro_batches(samples, cfg, pad_id, device, size=None, tokens=None):
    """(indices, padded batch on device): consecutive runs of `size` (micro_batch_size) samples, or
    without `size` and with max_tokens_per_micro_batch, data.token_budget_batches'. Ranks may then
    hold different counts, but every FSDP forward is collective: a rank with fewer repeats its last
    micro-batch, with indices [] (discard it). `tokens` sums the real and computed tokens."""
    n = size or cfg.micro_batch_size
    parts = [list(range(j, min(j + n, len(samples)))) for j in range(0, len(samples), n)]
    real = len(parts)
    if cfg.max_tokens_per_micro_batch and not size:
        parts = data.token_budget_batches(
            [(len(s["prompt_ids"]), len(s["response_ids"])) for s in samples],
            cfg.max_tokens_per_micro_batch)
        real = len(parts)
        parts += parts[-1:] * int(all_reduce({"n": real}, op=dist.ReduceOp.MAX)["n"] - real)
    for k, idx in enumerate(parts):
        batch = data.collate([samples[i] for i in idx], pad_id, share_prompts=cfg.share_prompts)
        if tokens is not None:  # with shared prompts, attention_mask covers the prompts alone
            runs = [batch["attention_mask"]] + [batch["response_mask"]] * cfg.share_prompts
            tokens["real"] += sum(m.sum().item() for m in runs) * (k < real)
            tokens["computed"] += sum(m.numel() for m in runs)
        yield (idx if k < real else []), {name: v.to(device) if torch.is_tensor(v) else v
                                          for name, v in batch.items()}


def logprobs(model, samples, cfg, pad_id, device, banned_ids, temperature, with_entropy=False,
             tokens=None):
    """Per-sample log-prob tensors under `model` (and entropies), no gradients, in micro-batches."""
    out, ent = [None] * len(samples), [None] * len(samples)
    with torch.no_grad():
        for idx, mb in micro_batches(samples, cfg, pad_id, device, tokens=tokens):
            res = modeling.token_logprobs(model, mb, temperature=temperature, banned_ids=banned_ids,
                                          with_entropy=with_entropy)
            for dest, values in zip((out, ent), res if with_entropy else (res,)):
                for i, v in zip(idx, unpad(values, mb["response_mask"])):
                    dest[i] = v
    return (out, ent) if with_entropy else out


def optimizer_step(policy, optimizer, chunk, adv, cfg, *, on_policy, use_kl, pad_id, device,
                   banned_ids, sft_chunk=(), mu=0.0):
    """One optimizer step on this rank's share `chunk` of a mini-batch, in micro-batches with
    gradient accumulation: the clipped surrogate with advantages `adv` (len(chunk),), plus
    kl_coef * KL to ref_logp with use_kl, plus CHORD's mu * L_sft on `sft_chunk` (the RL loss is
    then weighted 1 - mu). on_policy: the old policy is this one, so this forward's log-probs,
    detached, are old_logp (TRL, verl): no separate pass. Returns (stats, fresh) where fresh is
    (old_logp, entropy) per sample when on_policy, else None."""
    policy.train()  # back to eval() in clip_and_step
    world_size = dist.get_world_size()
    counts = all_reduce({"tokens": sum(len(s["response_ids"]) for s in chunk),
                         "seqs": len(chunk),
                         "sft_tokens": sum(len(s["response_ids"]) for s in sft_chunk)})
    # Each rank divides by the GLOBAL counts over world_size: FSDP2 averages gradients over
    # ranks, so the summed micro-batch losses have the gradient of one big batch (FIELD-NOTES).
    agg = dict(mode=cfg.loss_agg, num_tokens=counts["tokens"] / world_size,
               num_seqs=counts["seqs"] / world_size, max_len=cfg.max_response_length)
    stats = {"loss/policy": 0.0, "loss/kl": 0.0, "kl": 0.0, "clip_frac": 0.0,
             "dual_clip_frac": 0.0, "ratio_max": 0.0}
    fresh = ([None] * len(chunk), [None] * len(chunk)) if on_policy else None
    tokens = {"real": 0, "computed": 0}
    for idx, mb in micro_batches(chunk, cfg, pad_id, device, tokens=tokens):
        mask = mb["response_mask"]
        logp = modeling.token_logprobs(policy, mb, temperature=cfg.temperature,
                                       banned_ids=banned_ids, with_entropy=on_policy)
        if on_policy:
            logp, entropy = logp
            mb["old_logp"] = logp.detach()
            for i, old, ent in zip(idx, unpad(logp, mask), unpad(entropy, mask)):
                fresh[0][i], fresh[1][i] = old, ent
        if not idx:  # another rank's extra micro-batch: the same collectives, a zero gradient
            (0.0 * logp.sum()).backward()
            continue
        pg, m = grpo.policy_loss(logp, mb["old_logp"], adv[idx].to(device), mask,
                                 ratio_level=cfg.ratio_level, clip_eps_low=cfg.clip_eps_low,
                                 clip_eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip or None)
        share = mask.sum().item() / agg["num_tokens"]  # this micro-batch's token share
        if cfg.mismatch_correction != "none":  # vLLM sampled from pi_sampler, not pi_old
            w, w_stats = grpo.mismatch_weights(mb["old_logp"], mb["sampler_logp"], mask,
                                               level=cfg.mismatch_correction, cap=cfg.mismatch_cap)
            pg = pg * w
            for k, v in w_stats.items():
                stats[f"mismatch/{k}"] = stats.get(f"mismatch/{k}", 0.0) + v.item() * share
        loss = grpo.aggregate(pg, mask, **agg)
        stats["loss/policy"] += loss.item()
        if use_kl:
            kl = grpo.kl_penalty(logp, mb["ref_logp"], kind=cfg.kl_estimator)
            kl_loss = grpo.aggregate(kl, mask, **agg)
            loss = loss + cfg.kl_coef * kl_loss
            stats["loss/kl"] += kl_loss.item()
            stats["kl"] += grpo.aggregate(kl.detach(), mask, num_tokens=agg["num_tokens"]).item()
        ((1 - mu) * loss).backward()
        stats["clip_frac"] += m["clip_frac"].item() * share
        stats["dual_clip_frac"] += m["dual_clip_frac"].item() * share
        stats["ratio_max"] = max(stats["ratio_max"], m["ratio_max"].item())
    if sft_chunk:
        stats["loss/sft"] = sft_backward(policy, sft_chunk, cfg, weight=mu, phi=cfg.chord_phi,
                                         num_tokens=counts["sft_tokens"] / world_size,
                                         pad_id=pad_id, device=device, banned_ids=banned_ids,
                                         temperature=cfg.temperature)
        stats["chord/mu"] = mu
    stats["update/real_token_share"] = tokens["real"] / tokens["computed"]
    stats["grad_norm"] = clip_and_step(policy, optimizer, cfg.max_grad_norm)
    return stats, fresh


def sft_backward(policy, samples, cfg, *, weight, phi, num_tokens, pad_id, device, banned_ids,
                 temperature=1.0):
    """Backward of weight * the SFT loss (the response tokens' NLL, normalised by the global
    `num_tokens` per rank; CHORD-phi weights each token by p (1 - p)); returns the loss."""
    total = 0.0
    for idx, mb in micro_batches(list(samples), cfg, pad_id, device):
        logp = modeling.token_logprobs(policy, mb, temperature=temperature, banned_ids=banned_ids)
        loss = grpo.aggregate(grpo.sft_loss(logp, mb["response_mask"], phi=phi),
                              mb["response_mask"], num_tokens=num_tokens)
        if not idx:  # another rank's extra micro-batch (micro_batches): a zero gradient
            loss = 0.0 * loss
        (weight * loss).backward()
        total += loss.item()
    return total


def clip_and_step(policy, optimizer, max_grad_norm):
    """Clip the accumulated gradients to max_grad_norm and step; returns the norm before clipping.
    A non-finite norm skips the step (it would poison Adam's moments; EasyR1 skips it too)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if torch.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    policy.eval()
    return grad_norm.item()


def validate(sample, val_prompts, step, cfg, tokenizer, reward_fn, blank_images=False):
    """Accuracy at the validation sampling settings (n=1): (record, rows), rows being each
    prompt's response and score. blank_images replaces every image with a white one of the same
    size: what the model scores without seeing the figure."""
    t0, tp = time.perf_counter(), tp_size(cfg)
    dp_rank, n_dp = dist.get_rank() // tp, dist.get_world_size() // tp
    per = math.ceil(len(val_prompts) / n_dp)  # contiguous shards: seeds follow the global index
    mine = val_prompts[dp_rank * per:(dp_rank + 1) * per]
    if blank_images:
        mine = [{**p, "images": [Image.new("RGB", im.size, "white") for im in p["images"]]}
                for p in mine]
    mine, results = sample(mine, n=1, temperature=cfg.val_temperature, top_p=cfg.val_top_p,
                           max_tokens=cfg.max_response_length, seed=cfg.seed + dp_rank * per)
    samples = [{"response_ids": r["samples"][0][0], "prompt": p} for p, r in zip(mine, results)]
    scores, _ = score(samples, reward_fn, tokenizer, cfg.reward_timeout)
    prefix = "val_blank" if blank_images else "val"
    means, n = mean_scores(scores, prefix)
    record = {"step": step, **means, f"{prefix}/n": n, f"{prefix}/temperature": cfg.val_temperature,
              f"{prefix}/top_p": cfg.val_top_p, "time/val": time.perf_counter() - t0}
    rows = [{"step": step, "prompt": p["text"], "response": tokenizer.decode(s["response_ids"]),
             "ground_truth": p["answer"], **sc} for p, s, sc in zip(mine, samples, scores)]
    return record, rows


def peak_memory_gb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main(cfg):
    # ------------------------------------------------------------------------ setup
    if not cfg.verbose:  # loading and saving bars: one line each per rank, and noise at any size
        transformers.utils.logging.disable_progress_bar()
    rank, world_size, device, mesh = init_distributed()
    resume_from = prepare_out_dir(cfg, rank, world_size)
    paths = resolve_paths(cfg, rank, cfg.train_data)
    print0(f"model {paths['model']} | train {paths['train']} | val {paths['val']} | "
           f"world {world_size} on {device.type} | sampler {cfg.sampler} | G {cfg.num_generations}"
           f" | {cfg.rollout_batch_size} prompts a step, {cfg.global_batch_size} an update")
    if memplan.check(cfg, paths["model"], world_size, device):
        dist.destroy_process_group()
        return
    processor, policy, ref, optimizer = load_models(cfg, paths["model"], mesh, device,
                                                    with_ref=cfg.kl_coef > 0)
    tokenizer, banned = processor.tokenizer, rollout.banned_token_ids(processor.tokenizer)
    train_prompts = load_prompts(cfg, paths["train"], processor)
    val_prompts = load_prompts(cfg, paths["val"], processor) if paths["val"] else []
    val_prompts = val_prompts[:cfg.val_max_prompts or None]
    sft_rows = data.load_rows(paths["sft"]) if cfg.sft_data else None
    reward_fn = reward.load_reward(cfg.reward)
    max_images = max([1] + [len(p["images"]) for p in train_prompts + val_prompts])
    sample, sync, sleep = make_sampler(cfg, paths["model"], policy, processor, world_size,
                                       max_images)
    torch.manual_seed(cfg.seed + rank)  # vLLM seeds the global RNGs when it starts: ours again
    pos, order_rng = {"order": [], "cursor": 0, "draws": 0}, random.Random(cfg.seed)
    sft_rng = random.Random(cfg.seed + rank)  # CHORD's expert rows
    saved = checkpoints.resume(resume_from, policy, optimizer, pos, order_rng, lr=cfg.lr,
                          weight_decay=cfg.weight_decay, out_dir=cfg.out_dir)
    if saved:
        sft_rng.setstate(saved["sft_rng"])
    sync()
    G, tp = cfg.num_generations, tp_size(cfg)
    dp_rank, n_dp = rank // tp, world_size // tp
    prompts_per_rank = cfg.rollout_batch_size // world_size
    updates_per_step = cfg.rollout_batch_size // cfg.global_batch_size
    per_update = prompts_per_rank * G // updates_per_step  # this rank's sequences per update
    batching = dict(cfg=cfg, pad_id=tokenizer.pad_token_id, device=device, banned_ids=banned)
    run_log, start, bad_steps = runlog.RunLog(cfg), saved["step"] + 1 if saved else 1, 0
    first_val = {}
    if start == 1 and val_prompts:
        first_val = validate(sample, val_prompts, 0, cfg, tokenizer, reward_fn)
        run_log.validation(*first_val)
    t_start = time.perf_counter()
    bar = tqdm(range(start, cfg.max_steps + 1), disable=rank != 0, desc="grpo",
               initial=start - 1, total=cfg.max_steps, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        # -------------------------------------------------------------------- rollout and reward
        # DAPO dynamic sampling keeps only the groups whose accuracy varies (the others have zero
        # advantage) and samples more prompts until the batch is full; filtered on accuracy, not
        # on the score with its format bonus (grpo.filter_groups). Every rank takes part in every
        # round, so FSDP sees the same number of micro-batches.
        groups, stats, rounds = [], {}, 0
        while True:
            rounds += 1
            new, round_stats = sample_groups(
                sample, *next_prompts(train_prompts, pos, order_rng, cfg, dp_rank, n_dp),
                cfg, processor, reward_fn)
            stats = {k: stats.get(k, 0.0) + v for k, v in round_stats.items()}
            if cfg.dynamic_sampling and rounds < cfg.max_sample_tries:
                acc = torch.tensor([s.get("accuracy", s["overall"]) for _, sc in new for s in sc])
                new = [g for g, keep in zip(new, grpo.filter_groups(acc, G).tolist()) if keep]
            groups += new
            short = float(len(groups) < prompts_per_rank)
            if all_reduce({"short": short}, op=dist.ReduceOp.MAX)["short"] == 0:
                break
        groups = groups[:prompts_per_rank]
        samples = [s for g, _ in groups for s in g]
        scores = [s for _, sc in groups for s in sc]
        rewards = torch.tensor([s["overall"] for s in scores], dtype=torch.float32)
        if cfg.vllm_sleep_level:  # CUDA: vLLM's memory goes to the trainer until the sync
            sleep(cfg.vllm_sleep_level)
        # -------------------------------------------------------------------- old / ref log-probs
        t = time.perf_counter()
        # The first update is on-policy: it takes its own forward, detached, as old_logp. Not with
        # --kl_in_reward (needed before the advantages) or LoRA dropout (noisy in train mode).
        on_policy = not (cfg.kl_in_reward or cfg.lora_dropout)
        later = samples[per_update:] if on_policy else samples
        tokens = {"real": 0, "computed": 0}  # the passes below: tokens not padding, and all
        for s, old, ent in zip(later, *logprobs(policy, later, **batching, tokens=tokens,
                                                temperature=cfg.temperature, with_entropy=True)):
            s["old_logp"], s["entropy"] = old, ent
        if ref is not None:
            for s, ref_logp in zip(samples, logprobs(ref, samples, **batching, tokens=tokens,
                                                     temperature=cfg.temperature)):
                s["ref_logp"] = ref_logp
            ref.reshard()  # FSDP2 leaves a root gathered after a no-grad forward
        if tokens["computed"]:  # else no pass ran (on-policy, one update, no reference model)
            stats["logprobs/real_token_share"] = tokens["real"] / tokens["computed"]
        stats["time/logprobs"] = time.perf_counter() - t
        # -------------------------------------------------------------------- advantages
        if cfg.kl_in_reward:  # the KL penalty as a cost in the reward (old vs ref)
            rewards = rewards - cfg.kl_coef * torch.stack(
                [grpo.kl_penalty(s["old_logp"], s["ref_logp"], kind=cfg.kl_estimator).sum()
                 for s in samples])
        if cfg.adv_estimator == "rloo":
            adv = grpo.rloo_advantages(rewards, G)
        else:
            adv = grpo.group_advantages(rewards, G, std_norm=cfg.adv_std_norm)
        # -------------------------------------------------------------------- update
        t = time.perf_counter()
        mu = grpo.chord_mu(step, mu_peak=cfg.chord_mu_peak, mu_valley=cfg.chord_mu_valley,
                           warmup_steps=cfg.chord_warmup_steps,
                           decay_steps=cfg.chord_decay_steps) if sft_rows else 0.0
        updates = []
        for u in range(updates_per_step):
            chunk = slice(u * per_update, (u + 1) * per_update)
            expert = expert_samples(sft_rows, sft_rng, cfg.sft_batch_size // world_size, cfg,
                                    processor) if sft_rows else ()
            update, fresh = optimizer_step(
                policy, optimizer, samples[chunk], adv[chunk], on_policy=on_policy and u == 0,
                use_kl=ref is not None and not cfg.kl_in_reward, sft_chunk=expert, mu=mu,
                **batching)
            for s, old, ent in zip(samples[chunk], *fresh) if fresh else ():
                s["old_logp"], s["entropy"] = old, ent
            updates.append(update)
        stats["time/update"] = time.perf_counter() - t
        # -------------------------------------------------------------------- weight sync
        stats["time/sync"] = sync()
        # -------------------------------------------------------------------- log
        stats["time/step"] = time.perf_counter() - t0
        record = step_metrics(step, samples, scores, adv, updates, stats, rounds, G,
                              image_token_id=policy.config.image_token_id)
        bad_steps = bad_steps + 1 if record["update/skipped"] == updates_per_step else 0
        run_log.log(record)
        bar.set_postfix_str(f"reward {record['reward/overall']:.3f} acc "
                            f"{record['reward/accuracy']:.3f} kl {record['kl']:.2g} "
                            f"{record['time/step']:.1f}s/step")
        # -------------------------------------------------------------------- eval
        if cfg.val_freq and step % cfg.val_freq == 0 and step != cfg.max_steps and val_prompts:
            run_log.validation(*validate(sample, val_prompts, step, cfg, tokenizer, reward_fn))
        # -------------------------------------------------------------------- checkpoint
        reason = ""
        if bad_steps >= cfg.max_bad_steps:
            reason = f"{bad_steps} steps in a row skipped every update (non-finite loss or norm)"
        if record["reward/failed"] + record["reward/timed_out"] >= record["reward/scored"]:
            reason = f"the reward failed or timed out on every sample of step {step} (see above)"
        state = {**pos, "order_rng": order_rng.getstate(), "sft_rng": sft_rng.getstate()}
        checkpoints.checkpoint_or_stop(cfg.out_dir, step, policy, optimizer, state, reason=reason,
                                       save_freq=cfg.save_freq, save_limit=cfg.save_limit)
    bar.close()
    finish(cfg, sample, sleep, policy, processor, val_prompts, first_val, run_log, tokenizer,
           reward_fn, wall=time.perf_counter() - t_start)


def tp_size(cfg):
    return cfg.vllm_tp if cfg.sampler == "vllm" else 1


def with_response(prompt, text, processor):
    """A trainer sample whose response is a given text (SFT data, preference pairs)."""
    tokenizer, text = processor.tokenizer, data.strip_opening(prompt["text"], text)
    return {**data.encode_prompt(prompt, processor), "prompt": prompt,
            "response_ids": tokenizer.encode(text) + [tokenizer.eos_token_id]}


def expert_samples(rows, rng, n, cfg, processor):
    """n expert samples (a row's prompt and its `response`) for CHORD's SFT term."""
    out, format_prompt = [], read_format_prompt(cfg)  # read once, not once per row
    for i in rng.sample(range(len(rows)), n):
        prompt = data.build_prompt(rows[i], i, processor, format_prompt=format_prompt,
                                   min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                   source=cfg.sft_data)
        out.append(with_response(prompt, rows[i]["response"], processor))
    return out


def step_metrics(step, samples, scores, adv, updates, stats, rounds, G, image_token_id):
    """The step's record over all ranks: means of the ranks' means, sums of counts, maxima."""
    world_size = dist.get_world_size()
    diffs = torch.cat([(s["old_logp"] - s["sampler_logp"]).abs() for s in samples])
    means = {"adv/mean": adv.mean().item(), "adv/std": adv.std().item(),
             "adv/abs_mean": adv.abs().mean().item(),
             "adv/zero_std_groups": (adv.view(-1, G) == 0).all(1).float().mean().item(),
             "response/length": sum(len(s["response_ids"]) for s in samples) / len(samples),
             "response/entropy": torch.cat([s["entropy"] for s in samples]).mean().item(),
             "rollout/logp_diff_mean": diffs.mean().item(), "rollout/rounds": rounds,
             "memory/peak_gb": peak_memory_gb(),
             **{k: sum(u[k] for u in updates) / len(updates) for k in updates[0]
                if k != "ratio_max"},
             **{k: v for k, v in stats.items() if k.startswith(("time/", "logprobs/"))}}
    # Tokens trained on (EasyR1's throughput counts prompt + image + response): the prompt ids
    # are processor-expanded, so they include the image's tokens.
    sums = {"tokens/prompt": sum(len(s["prompt_ids"]) for s in samples),
            "tokens/image": sum(int((s["prompt_ids"] == image_token_id).sum()) for s in samples),
            "tokens/response": sum(len(s["response_ids"]) for s in samples),
            **{k: v for k, v in stats.items() if k.startswith("reward/")}}
    record = {"step": step, **{k: v / world_size for k, v in all_reduce(means).items()},
              **all_reduce(sums), **mean_scores(scores, "reward")[0]}
    record.update(all_reduce({"rollout/logp_diff_max": diffs.max().item(),
                              "ratio_max": max(u["ratio_max"] for u in updates),
                              "memory/peak_gb": means["memory/peak_gb"],
                              "time/step": stats["time/step"]}, op=dist.ReduceOp.MAX))
    # A non-finite loss or gradient norm skips an update (clip_and_step): counted here.
    record["update/skipped"] = sum(not math.isfinite(u["grad_norm"]) for u in updates)
    return record


def finish(cfg, sample, sleep, policy, processor, val_prompts, first_val, run_log, tokenizer,
           reward_fn, wall):
    """The last validation (and the same with blank images: if the task needs the figure, that
    falls to chance), the final model, a summary line."""
    last_val = blank = None
    if val_prompts:
        last_val = validate(sample, val_prompts, cfg.max_steps, cfg, tokenizer, reward_fn)
        run_log.validation(*last_val)
    if first_val and last_val and any(p["images"] for p in val_prompts):
        blank = validate(sample, val_prompts, cfg.max_steps, cfg, tokenizer, reward_fn, True)
        run_log.validation(*blank)
    run_log.close()
    sleep(1)  # CUDA: the save gathers whole tensors; vLLM's memory goes back first
    if cfg.save_hf:
        modeling.save_hf(policy, processor, os.path.join(cfg.out_dir, "hf"), rank=dist.get_rank())
        if cfg.lora_rank:  # and the adapters alone, in PEFT's format
            modeling.save_lora_adapter(policy, os.path.join(cfg.out_dir, "adapter"),
                                       rank=dist.get_rank())
    if first_val and last_val:
        line = (f"done: {cfg.max_steps} steps in {wall:.0f}s; val/accuracy "
                f"{first_val[0]['val/accuracy']:.3f} -> {last_val[0]['val/accuracy']:.3f}")
        print0(line + (f" (with blank images: {blank[0]['val_blank/accuracy']:.3f})"
                       if blank else ""))
    dist.barrier()
    # No destroy_process_group: vLLM tears down its groups (built on this world) at exit.


if __name__ == "__main__":
    main(parse_flags(sys.argv[1:]))
