"""Run under torchrun (2 ranks) on a tiny model with tied embeddings, Qwen2.5-VL-3B's layout:
lm_head and embed_tokens share one Parameter. Rank 0 writes what tests/test_tied.py compares:
- "load": load_fsdp_model's full state; on each rank whether embed_tokens and lm_head still hold
  one tensor (sharded after the load, gathered after a forward, sharded after a step) and its
  log-probs; the plain model's.
- "step": fsdp_worker.step on the samples of fsdp_worker's modes (stats, gradients, state).
- "hf": generate_hf on the sharded model after that step: each rank's max |sampler - trainer|.
- after the step, a checkpoint (out_path.ckpt) and save_hf's folder (out_path.hf), the log-probs
  there ("trained_logp"); then a second step by the same model ("second") and by a fresh model
  restored from the checkpoint ("resumed").
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import data  # noqa: E402
import fsdp_worker  # noqa: E402
import model as modeling  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402


def tie(model):
    """(embed_tokens and lm_head hold one tensor, it is a DTensor shard, not a gathered copy)."""
    embed, head = model.model.language_model.embed_tokens.weight, model.lm_head.weight
    return embed is head, isinstance(embed, DTensor)


def second_step(policy, optimizer, samples, rank, world):
    """fsdp_worker.step's optimizer step again, with an optimizer that already holds state."""
    cfg = train.Config(micro_batch_size=2, max_response_length=12, clip_eps_low=0.2,
                       clip_eps_high=0.3)
    share = len(samples) // world
    chunk = samples[rank * share:(rank + 1) * share]
    stats, _ = train.optimizer_step(policy, optimizer, chunk, torch.tensor([s["adv"] for s in chunk]),
                                    cfg, on_policy=False, use_kl=True, device=torch.device("cpu"),
                                    pad_id=0, banned_ids=[])
    stats = {k: v / world for k, v in train.all_reduce(stats).items()}
    return {"stats": stats, "state": fsdp_worker.full_state(policy)}


def hf_sampler_gap(policy, processor, data_dir, rank):
    """generate_hf on the FSDP model (rank 0 an image prompt, rank 1 a text prompt, 2 rows each):
    max |its log-probs - token_logprobs of the same rows|."""
    rows = data.load_rows(f"{data_dir}@train")
    row = rows[0] if rank == 0 else {"problem": "What is 2 + 3?", "answer": "5"}
    prompt = data.build_prompt(row, 0, processor, min_pixels=56 * 56, max_pixels=112 * 112)
    banned = rollout.banned_token_ids(processor.tokenizer)
    res = rollout.generate_hf(policy, processor, [prompt], n=2, temperature=1.0, max_tokens=12,
                              seed=rank, banned_ids=banned, batch_size=2)[0]
    batch = data.collate([{**res["encoded"], "response_ids": ids, "sampler_logp": lps}
                          for ids, lps in res["samples"]], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logp = modeling.token_logprobs(policy, batch, banned_ids=banned)
    return ((logp - batch["sampler_logp"]).abs() * batch["response_mask"]).max().item()


def main(model_dir, data_dir, out_path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    samples, g = fsdp_worker.make_samples(processor, data_dir, False)
    plain = modeling.load_model(model_dir)
    with torch.no_grad():  # drawn as fsdp_worker.main draws them
        for s in samples:
            lp = modeling.token_logprobs(plain, data.collate([s], 0))[0]
            s["old_logp"] = lp + 0.3 * torch.randn(lp.shape, generator=g)
            s["ref_logp"] = lp + 0.2 * torch.randn(lp.shape, generator=g)
    batch = data.collate(samples, 0)
    torch.manual_seed(0)
    policy = modeling.load_fsdp_model(model_dir, mesh, rank=rank)
    loaded, sharded = fsdp_worker.full_state(policy), tie(policy)
    with torch.no_grad():  # the root unit (embeddings, lm_head) stays gathered after this forward
        mine = {"sharded": sharded, "logp": modeling.token_logprobs(policy, batch),
                "gathered": tie(policy)}
    policy.reshard()  # so the optimizer built in step() holds the shards, not the gathered copies
    optimizer, step = fsdp_worker.step(policy, samples, rank, world)
    step["grads"] = dict(step["grads"])  # the optimizer's hook refills the original at step two
    mine["stepped"] = tie(policy)
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    out = {"load": {"state": loaded, "ranks": ranks, "plain_tie": tie(plain),
                    "plain_logp": modeling.token_logprobs(plain, batch).detach()},
           "step": step, "batch": batch, "hf": [None] * world}
    dist.all_gather_object(out["hf"], hf_sampler_gap(policy, processor, data_dir, rank))

    checkpoints.save_checkpoint(out_path + ".ckpt", policy, optimizer, {}, rank=rank)
    modeling.save_hf(policy, processor, out_path + ".hf", rank=rank)
    with torch.no_grad():
        out["trained_logp"] = modeling.token_logprobs(policy, batch)
    out["second"] = second_step(policy, optimizer, samples, rank, world)
    fresh = modeling.load_fsdp_model(model_dir, mesh, rank=rank)
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3, weight_decay=0.01)  # as step()'s
    checkpoints.load_checkpoint(out_path + ".ckpt", fresh, optimizer, rank=rank)
    out["resumed"] = second_step(fresh, optimizer, samples, rank, world)
    out["resumed"]["tie"] = tie(fresh)
    if rank == 0:
        torch.save(out, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
