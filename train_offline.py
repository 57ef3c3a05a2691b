"""SFT and MPO on fixed data, with train.py's setup (nanochat's chat_sft.py beside chat_rl.py).

    python train_offline.py --algo=sft --train_data=rows.jsonl   # ms-swift's or TRL's SFT rows
    python train_offline.py --algo=mpo --train_data=pairs.jsonl  # chosen / rejected pairs
    python train.py --model_path=out/hf                          # then GRPO from the result

SFT is the NLL of the response tokens. MPO (InternVL's Mixed Preference Optimization) is DPO's
sigmoid loss + BCO's pair loss + SFT on the chosen response, against the starting model as the
reference. Each step trains on the next rollout_batch_size rows in global_batch_size optimizer
steps; validation samples with train.py's sampler. The flags are train.py's and the three below;
the rollout and GRPO ones are unused.
"""
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from tqdm import tqdm

import checkpoints
import grpo
import memplan
import model as modeling
import reward
import rollout
import runlog
import train


@dataclass
class OfflineConfig(train.Config):
    train_data: str = ""  # rows (sft) or pairs (mpo); "" = the synthetic task's own
    algo: str = "sft"  # sft | mpo
    mpo_beta: float = 0.1  # the DPO / BCO temperature on sum_t log(pi / pi_ref)
    mpo_weights: str = "0.8,0.2,1.0"  # the DPO, BCO and SFT terms' weights (the MPO paper's)


# ----------------------------------------------------------------------------- MPO's losses
# MPO (arXiv 2411.10442) learns from (chosen, rejected) pairs: 0.8 DPO + 0.2 BCO + 1.0 SFT, on each
# response's logratio = sum_t (logp_t - ref_logp_t) = log pi(y|x) - log pi_ref(y|x).
def dpo_loss(chosen_logratio, rejected_logratio, beta=0.1):
    """DPO's sigmoid loss per pair (arXiv 2305.18290): -log sigmoid(beta (c - r)), log 2 where
    c = r. (B,) -> (loss (B,), metrics): the share of pairs with beta c > beta r (a tie misses, as
    in TRL), the mean beta (c - r)."""
    m = beta * (chosen_logratio - rejected_logratio)
    d = m.detach()
    loss = -F.logsigmoid(m)
    return loss, {"reward_accuracy": (d > 0).to(d.dtype).mean(), "reward_margin": d.mean()}


def bco_pair_loss(chosen_logratio, rejected_logratio, beta=0.1, delta=0.0):
    """BCO (arXiv 2404.04656) on pairs, MPO's quality loss: each response is classified alone, good
    or bad, by its reward r = beta * logratio against the shift delta (bco_delta; no gradient).
    (B,) -> (loss (B,), metrics): -log sigmoid(r_c - delta) - log sigmoid(-(r_r - delta))."""
    r_c, r_r, delta = beta * chosen_logratio, beta * rejected_logratio, float(delta)
    loss = -F.logsigmoid(r_c - delta) - F.logsigmoid(delta - r_r)
    return loss, {"reward_chosen": r_c.detach().mean(), "reward_rejected": r_r.detach().mean()}


def bco_delta(delta, num_batches, rewards):
    """BCO's shift after one more batch (rewards: its r_c and r_r), a float: the running mean of
    batch means, as MPO's code keeps it; num_batches counts those already in delta. Updated once
    per optimizer step, it is one value for all ranks."""
    return delta + (float(torch.as_tensor(rewards).detach().mean()) - delta) / (num_batches + 1)


def mpo_loss(chosen_logratio, rejected_logratio, chosen_logp, chosen_mask, *, beta=0.1, delta=0.0,
             weights=(0.8, 0.2, 1.0), num_pairs=None, num_tokens=None):
    """MPO: w_dpo L_dpo + w_bco L_bco + w_sft L_sft -> (scalar loss, metrics); weights the paper's
    (TRL's loss_weights for sigmoid, bco_pair, sft). L_sft: the token-mean NLL of chosen_logp (B, T)
    under chosen_mask, like TRL's nll_loss. Pair terms are summed / num_pairs, L_sft / num_tokens:
    for micro-batches pass the whole batch's counts and sum the results (see aggregate)."""
    dpo, metrics = dpo_loss(chosen_logratio, rejected_logratio, beta)
    bco, bco_metrics = bco_pair_loss(chosen_logratio, rejected_logratio, beta, delta)
    n = chosen_logratio.numel() if num_pairs is None else num_pairs
    parts = {"dpo": dpo.sum() / n, "bco": bco.sum() / n}
    nll = grpo.sft_loss(chosen_logp, chosen_mask)
    parts["sft"] = grpo.aggregate(nll, chosen_mask, num_tokens=num_tokens)
    loss = sum(w * parts[k] for w, k in zip(weights, ("dpo", "bco", "sft"), strict=True))
    return loss, metrics | bco_metrics | {f"loss_{k}": v.detach() for k, v in parts.items()}



def sft_step(policy, optimizer, samples, cfg, **batching):
    """One optimizer step of SFT on this rank's samples (tokens normalised over all ranks)."""
    policy.train()  # back to eval() in clip_and_step
    tokens = train.all_reduce({"tokens": sum(len(s["response_ids"]) for s in samples)})["tokens"]
    loss = train.sft_backward(policy, samples, cfg, weight=1.0, phi=False,
                              num_tokens=tokens / dist.get_world_size(), **batching)
    return {"loss/sft": loss, "grad_norm": train.clip_and_step(policy, optimizer,
                                                                cfg.max_grad_norm)}


def mpo_step(policy, optimizer, pairs, cfg, *, delta, pad_id, device, banned_ids):
    """One MPO optimizer step on this rank's `pairs` ((chosen, rejected) samples with ref_logp), in
    micro-batches of micro_batch_size sequences (a pair side by side: one prompt forward). The
    pair terms are normalised by the global pair count, the SFT term by the global chosen-token
    count. BCO's shift `delta` is held fixed during the step (bco_delta)."""
    policy.train()  # back to eval() in clip_and_step
    world_size = dist.get_world_size()
    counts = train.all_reduce({"pairs": len(pairs),
                               "tokens": sum(len(c["response_ids"]) for c, _ in pairs)})
    n_pairs, n_tokens = counts["pairs"] / world_size, counts["tokens"] / world_size
    weights = tuple(float(w) for w in cfg.mpo_weights.split(","))
    stats, rewards = {}, 0.0
    pairs_per_micro = max(1, cfg.micro_batch_size // 2)
    for j in range(0, len(pairs), pairs_per_micro):
        micro = pairs[j:j + pairs_per_micro]
        k = len(micro)
        _, mb = next(train.micro_batches([s for pair in micro for s in pair], cfg, pad_id, device,
                                         size=2 * k))
        mask = mb["response_mask"]
        logp = modeling.token_logprobs(policy, mb, banned_ids=banned_ids)
        logratio = ((logp - mb["ref_logp"]) * mask).sum(-1)  # (2k,): sum_t log pi / pi_ref
        loss, m = mpo_loss(logratio[0::2], logratio[1::2], logp[0::2], mask[0::2],
                                beta=cfg.mpo_beta, delta=delta, weights=weights,
                                num_pairs=n_pairs, num_tokens=n_tokens)
        loss.backward()
        for key, v in m.items():  # loss_* are shares of the global mean; the others micro means
            share = 1 if key.startswith("loss_") else k / n_pairs
            stats[f"mpo/{key}"] = stats.get(f"mpo/{key}", 0.0) + v.item() * share
        rewards += cfg.mpo_beta * logratio.detach().sum().item()
    stats["grad_norm"] = train.clip_and_step(policy, optimizer, cfg.max_grad_norm)
    stats["mpo/reward_mean"] = rewards / (2 * n_pairs)  # this rank's share of mean(r_c, r_r)
    return stats


def main(cfg):
    if cfg.temperature != 1.0:
        raise SystemExit("--temperature is GRPO's sampling temperature: SFT and MPO score the data "
                         "at temperature 1 (validation samples at --val_temperature)")
    if not cfg.verbose:  # as train.main
        transformers.utils.logging.disable_progress_bar()
    rank, world_size, device, mesh = train.init_distributed()
    resume_from = train.prepare_out_dir(cfg, rank, world_size)
    synthetic = {"sft": "synthetic/sft.jsonl", "mpo": "synthetic/pref.jsonl"}[cfg.algo]
    paths = train.resolve_paths(cfg, rank, cfg.train_data or synthetic)
    train.print0(f"{cfg.algo}: model {paths['model']} | train {paths['train']} | val "
                 f"{paths['val']} | world {world_size} on {device.type}")
    if memplan.check(cfg, paths["model"], world_size, device):
        dist.destroy_process_group()
        return
    processor, policy, ref, optimizer = train.load_models(cfg, paths["model"], mesh, device,
                                                          with_ref=cfg.algo == "mpo")
    tokenizer, tp = processor.tokenizer, train.tp_size(cfg)
    kind = {"sft": "sft", "mpo": "pref"}[cfg.algo]
    rows = train.load_prompts(cfg, paths["train"], processor, kind)
    val_prompts = train.load_prompts(cfg, paths["val"], processor) if paths["val"] else []
    val_prompts = val_prompts[:cfg.val_max_prompts or None]
    reward_fn = reward.load_reward(cfg.reward)
    max_images = max([1] + [len(p["images"]) for p in rows + val_prompts])
    sample, sync, sleep = train.make_sampler(cfg, paths["model"], policy, processor, world_size,
                                             max_images)
    torch.manual_seed(cfg.seed + rank)  # vLLM seeds the global RNGs when it starts: ours again
    pos, order_rng = {"order": [], "cursor": 0, "draws": 0}, random.Random(cfg.seed)
    mpo = {"delta": 0.0, "batches": 0}  # BCO's running shift and how many steps are in it
    saved = checkpoints.resume(resume_from, policy, optimizer, pos, order_rng, lr=cfg.lr,
                          weight_decay=cfg.weight_decay, out_dir=cfg.out_dir)
    if saved:
        mpo.update(saved["mpo"])
    sync()
    batching = dict(pad_id=tokenizer.pad_token_id, device=device,
                    banned_ids=rollout.banned_token_ids(tokenizer))
    updates_per_step = cfg.rollout_batch_size // cfg.global_batch_size
    run_log, start = runlog.RunLog(cfg), saved["step"] + 1 if saved else 1
    first_val = {}
    if start == 1 and val_prompts:
        first_val = train.validate(sample, val_prompts, 0, cfg, tokenizer, reward_fn)
        run_log.validation(*first_val)
    t_start = time.perf_counter()
    for step in tqdm(range(start, cfg.max_steps + 1), disable=rank != 0, desc=cfg.algo,
                     initial=start - 1, total=cfg.max_steps, dynamic_ncols=True):
        t0 = time.perf_counter()
        batch = train.next_prompts(rows, pos, order_rng, cfg, rank // tp, world_size // tp)[0]
        batch = batch[rank % tp::tp]
        per_update, updates = len(batch) // updates_per_step, []
        for u in range(updates_per_step):
            chunk = batch[u * per_update:(u + 1) * per_update]
            if cfg.algo == "sft":
                samples = [train.with_response(p, p["response"], processor) for p in chunk]
                updates.append(sft_step(policy, optimizer, samples, cfg, **batching))
                continue
            pairs = [(train.with_response(p, p["chosen"], processor),
                      train.with_response(p, p["rejected"], processor)) for p in chunk]
            flat = [s for pair in pairs for s in pair]
            for s, ref_logp in zip(flat, train.logprobs(ref, flat, cfg, **batching,
                                                        temperature=1.0)):
                s["ref_logp"] = ref_logp
            ref.reshard()
            stats = mpo_step(policy, optimizer, pairs, cfg, delta=mpo["delta"], **batching)
            mean = train.all_reduce({"r": stats["mpo/reward_mean"]})["r"] / world_size
            mpo["delta"] = bco_delta(mpo["delta"], mpo["batches"], [mean])
            mpo["batches"] += 1
            updates.append({**stats, "mpo/delta": mpo["delta"]})
        record = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
        record = {k: v / world_size for k, v in train.all_reduce(record).items()}
        record["time/update"] = time.perf_counter() - t0
        record["memory/peak_gb"] = train.all_reduce({"m": train.peak_memory_gb()},
                                                    op=dist.ReduceOp.MAX)["m"]
        run_log.log({"step": step, **record})
        if cfg.val_freq and step % cfg.val_freq == 0 and step != cfg.max_steps and val_prompts:
            sync()
            run_log.validation(*train.validate(sample, val_prompts, step, cfg, tokenizer,
                                               reward_fn))
        state = {**pos, "order_rng": order_rng.getstate(), "mpo": dict(mpo)}
        checkpoints.checkpoint_or_stop(cfg.out_dir, step, policy, optimizer, state,
                                       save_freq=cfg.save_freq, save_limit=cfg.save_limit)
    sync()
    train.finish(cfg, sample, sleep, policy, processor, val_prompts, first_val, run_log, tokenizer,
                 reward_fn, wall=time.perf_counter() - t_start)


if __name__ == "__main__":
    main(train.parse_flags(sys.argv[1:], OfflineConfig))
