"""Run under torchrun: optimizer_steps of train.py on a fixed global batch, FSDP2 over the world; the
global batch is split across ranks. Rank 0 writes what the tests compare.

modes: "plain" / "unshared" (full rows, no shared prompt forward) / "mixed" (the second half of the
rows text-only): one step, the loss metrics and the full updated state. "variants": load_fsdp_model checked against a plain load, then one step for
each of VARIANTS (stats, gradients, updated state); the activation-checkpointed run also writes a
checkpoint (out_path.ckpt) and save_hf's folder (out_path.hf), and its log-probs after the step
and (rank 0) those of that folder loaded back as a plain model.
"lora": lora_step below.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import data  # noqa: E402
import lora  # noqa: E402
import model as modeling  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402

VARIANTS = {  # name -> load_fsdp_model options; "base" is the default wrap
    "base": {},
    "checkpointing": dict(activation_checkpointing=True),
    "no_reshard": dict(reshard_after_forward=False),
    "cpu_offload": dict(cpu_offload=True),
    "freeze_vision": dict(freeze_vision=True),
    "freeze_merger_llm": dict(freeze_merger=True, freeze_llm=True),
    "bf16_master": dict(master_dtype=torch.bfloat16, param_dtype=torch.bfloat16),
}


def make_samples(processor, data_dir, mixed):
    rows = data.load_rows(f"{data_dir}@train")
    g = torch.Generator().manual_seed(0)
    n_plain = len(processor.tokenizer) - len(tiny.SPECIAL_TOKENS)
    samples = []  # the same 8 samples on every rank: 4 prompts x 2 responses of different lengths
    for i in range(8):
        if i % 2 == 0:  # a group's rows share the prompt, as rollouts do (collate's share_prompts)
            prompt = data.build_prompt(rows[i], i, processor, min_pixels=56 * 56, max_pixels=112 * 112)
            if mixed and i >= 4:  # the second half text-only: on 2 ranks, rank 1 sees no image at all
                prompt = data.build_prompt({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}, i, processor)
            enc = data.encode_prompt(prompt, processor)
        length = 2 + (5 * i) % 11
        samples.append({**enc, "adv": float(torch.randn(1, generator=g)),
                        "response_ids": torch.randint(0, n_plain, (length,), generator=g).tolist()})
    return samples, g


def full_state(policy):
    return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def step(policy, samples, rank, world, share_prompts=True, chunk=None, on_policy=False):
    """One optimizer_step on this rank's share; returns (optimizer, stats, gradients, updated state).
    Micro-batches of 2 rows are one group each: with share_prompts its prompt runs once."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.01)
    grads = {}

    def keep_grads(opt, args, kwargs):  # the gradients the step uses (after clipping), gathered
        grads.update({n.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor()
                      for n, p in policy.named_parameters() if p.grad is not None})

    optimizer.register_step_pre_hook(keep_grads)
    cfg = train.Config(micro_batch_size=2, max_response_length=12, clip_eps_low=0.2, clip_eps_high=0.3,
                       share_prompts=share_prompts)
    share = len(samples) // world
    chunk = samples[rank * share:(rank + 1) * share] if chunk is None else chunk  # this rank's rows
    adv = torch.tensor([s["adv"] for s in chunk])
    stats, fresh = train.optimizer_step(policy, optimizer, chunk, adv, cfg, on_policy=on_policy,
                                        use_kl=True, device=torch.device("cpu"), pad_id=0,
                                        banned_ids=[])
    for s, old, ent in zip(chunk, *fresh) if fresh else ():  # as train.main keeps them
        s["old_logp"], s["entropy"] = old, ent
    stats = {k: v / world for k, v in train.all_reduce(stats).items()}  # what train.py logs
    names = [n for n, _ in policy.named_parameters()]
    return optimizer, {"stats": stats, "grads": grads, "state": full_state(policy), "names": names}


LORA = dict(rank=4, alpha=8)  # scale 2


def lora_step(policy, samples, processor, out_path, rank, world):
    """load_fsdp_model(lora=LORA) with activation checkpointing (wrapped names): the state right after
    the load, one step, then what vLLM and the savers get from the sharded model: merge_lora over
    rollout.full_weights and over the gathered state, the log-probs, save_hf (out_path.hf),
    save_lora_adapter (out_path.adapter) and a checkpoint (out_path.ckpt)."""
    import rollout

    loaded = full_state(policy)
    optimizer, out = step(policy, samples, rank, world)
    merged = lora.merge_lora(rollout.full_weights(policy), scale=LORA["alpha"] / LORA["rank"])
    out["merged"] = {n.replace("_checkpoint_wrapped_module.", ""): w for n, w in merged}
    # The gathered state merged in this process too (B @ A is float arithmetic): the two merges
    # then run the same kernels with the same thread count, and the test can ask for the same bits.
    out["state_merged"] = lora.hf_state_dict(policy, out["state"])
    out["batch"] = data.collate(samples, 0)
    with torch.no_grad():
        out["logp"] = modeling.token_logprobs(policy, out["batch"])
    modeling.save_hf(policy, processor, out_path + ".hf", rank=rank)
    modeling.save_lora_adapter(policy, out_path + ".adapter", rank=rank)
    checkpoints.save_checkpoint(out_path + ".ckpt", policy, optimizer, {}, rank=rank)
    return {"loaded": loaded, **out}


def main(model_dir, data_dir, out_path, mode="plain"):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    samples, g = make_samples(processor, data_dir, mode == "mixed")
    plain = modeling.load_model(model_dir)
    with torch.no_grad():  # old/ref log-probs near the current ones, so ratios and KL are not trivial
        for s in samples:
            lp = modeling.token_logprobs(plain, data.collate([s], 0))[0]
            s["old_logp"] = lp + 0.3 * torch.randn(lp.shape, generator=g)
            s["ref_logp"] = lp + 0.2 * torch.randn(lp.shape, generator=g)
    torch.manual_seed(0)
    if mode == "lora":
        torch.manual_seed(rank)  # a different global RNG on each rank: the adapters must not depend on it
        policy = modeling.load_fsdp_model(model_dir, mesh, rank=rank, lora=LORA, activation_checkpointing=True)
        out = lora_step(policy, samples, processor, out_path, rank, world)
    elif mode != "variants":  # "unshared": full rows, the reference for the shared-prompt forwards
        _, out = step(modeling.load_fsdp_model(model_dir, mesh, rank=rank), samples, rank, world, mode != "unshared")
    else:
        batch = data.collate(samples, 0)  # the whole batch on every rank, for log-probs
        policy = modeling.load_fsdp_model(model_dir, mesh, rank=rank)
        with torch.no_grad():  # each rank's buffers and log-probs: only rank 0 read the weights
            # The plain model's log-probs on every rank too: each pair is computed in one process,
            # with the same kernels and thread count, so the test can ask for the same bits.
            mine = {"logp": modeling.token_logprobs(policy, batch), "buffers": dict(policy.named_buffers())}
            mine["plain_logp"] = modeling.token_logprobs(plain, batch)
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
        out = {"load": {"state": full_state(policy), "ranks": ranks,
                        "plain_buffers": dict(plain.named_buffers())}}
        for name, options in VARIANTS.items():
            # A fresh model each time: after a no-grad forward the root stays gathered (FSDP2 never
            # reshards it after forward), and an optimizer built then would hold the gathered copies.
            policy = modeling.load_fsdp_model(model_dir, mesh, rank=rank, **options)
            optimizer, out[name] = step(policy, samples, rank, world)
            out[name]["optim_dtypes"] = {v.dtype for s in optimizer.state.values() for v in s.values() if v.dim()}
            if name == "checkpointing":  # wrapped names inside: a checkpoint, an HF folder, their log-probs
                checkpoints.save_checkpoint(out_path + ".ckpt", policy, optimizer, {}, rank=rank)
                modeling.save_hf(policy, processor, out_path + ".hf", rank=rank)
                with torch.no_grad():
                    out[name]["logp"] = modeling.token_logprobs(policy, batch)
                    if rank == 0:  # save_hf's folder read back here: same kernels and thread count
                        hf = modeling.load_model(out_path + ".hf")
                        out[name]["hf_logp"] = modeling.token_logprobs(hf, batch)
        # On-policy: the update takes its own forward's log-probs, detached, as old_logp (train.main
        # skips that forward for the first optimizer step); the reference computes them in a
        # no-grad pass first, as train.py does for the later updates.
        share = len(samples) // world
        mine = [{k: v for k, v in s.items() if k != "old_logp"} for s in samples[rank * share:(rank + 1) * share]]
        for name, fresh in (("on_policy_ref", False), ("on_policy", True)):
            todo = [dict(s) for s in mine]
            if not fresh:  # on a model of its own (after a no-grad forward the root stays gathered, see below)
                with torch.no_grad():
                    old = modeling.load_fsdp_model(model_dir, mesh, rank=rank)
                    cfg = train.Config(micro_batch_size=2, share_prompts=True)
                    for idx, mb in train.micro_batches(todo, cfg, 0, torch.device("cpu")):
                        for s, lp in zip([todo[i] for i in idx], modeling.token_logprobs(old, mb)):
                            s["old_logp"] = lp[:len(s["response_ids"])]
            policy = modeling.load_fsdp_model(model_dir, mesh, rank=rank)
            _, out[name] = step(policy, samples, rank, world, chunk=todo, on_policy=fresh)
            out[name]["old_logp"] = [None] * world
            dist.all_gather_object(out[name]["old_logp"], [(s["old_logp"], s.get("entropy")) for s in todo])
        out["batch"] = batch
    if rank == 0:
        torch.save(out, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
