"""Run under torchrun with 2 ranks: generate_hf on an FSDP2 model where rank 0 holds 3 image
prompts (3 chunks of 2 rows) and rank 1 one text prompt (1 chunk, no image). Without matching chunk
counts and a vision forward at every prefill, the ranks' collectives would not pair up and the run
would hang. Writes each rank's max |sampler - trainer| log-prob and sample counts."""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import model as modeling  # noqa: E402
import rollout  # noqa: E402


def main(model_dir, data_dir, out_path):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    rows = data.load_rows(f"{data_dir}@train")
    if rank == 0:
        prompts = [data.build_prompt(rows[i], i, processor, min_pixels=56 * 56,
                                     max_pixels=112 * 112) for i in range(3)]
    else:
        prompts = [data.build_prompt({"problem": "What is 2 + 3?", "answer": "5"}, 0, processor)]
    policy = modeling.apply_fsdp(modeling.load_model(model_dir), init_device_mesh("cpu", (2,)))
    banned = rollout.banned_token_ids(processor.tokenizer)
    n = 2 if rank == 0 else 1
    res = rollout.generate_hf(policy, processor, prompts, n=n, temperature=1.0, max_tokens=12,
                              seed=rank, banned_ids=banned, batch_size=2)
    # Each unit gathered for the whole generation (one all-gather, not one per token), sharded
    # again after it (the root's own parameters stay gathered after any forward, as FSDP2 does).
    sharded = all(isinstance(p, DTensor) for m in policy.modules()
                  if isinstance(m, FSDPModule) and m is not policy for p in m.parameters())
    samples = [{**data.encode_prompt(p, processor), "response_ids": ids, "sampler_logp": lps}
               for p, r in zip(prompts, res) for ids, lps in r["samples"]]
    batch = data.collate(samples, processor.tokenizer.pad_token_id)
    with torch.no_grad():  # collective too: rank 1's text-only batch runs the dummy vision forward
        logp = modeling.token_logprobs(policy, batch, banned_ids=banned)
    diff = ((logp - batch["sampler_logp"]).abs() * batch["response_mask"]).max().item()
    counts = [len(r["samples"]) for r in res]
    torch.save({"diff": diff, "counts": counts, "sharded": sharded}, f"{out_path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
