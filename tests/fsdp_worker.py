"""Run under torchrun: one optimizer_step of train.py on a fixed global batch, FSDP2 over the
world; the global batch is split across ranks. Writes the loss metrics and the full updated state."""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import model as modeling  # noqa: E402
import train  # noqa: E402



def main(model_dir, data_dir, out_path, mixed="plain"):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    rows = data.load_rows(f"{data_dir}@train")
    g = torch.Generator().manual_seed(0)
    n_plain = len(processor.tokenizer) - len(modeling.SPECIAL_TOKENS)
    samples = []  # the same 8 samples on every rank, responses of different lengths
    for i in range(8):
        prompt = data.build_prompt(rows[i], i, processor, min_pixels=56 * 56, max_pixels=112 * 112)
        if mixed == "mixed" and i >= 4:  # the second half text-only: on 2 ranks, rank 1 sees no image at all
            prompt = data.build_prompt({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}, i, processor)
        length = 2 + (5 * i) % 11
        samples.append({**data.encode_prompt(prompt, processor), "adv": float(torch.randn(1, generator=g)),
                        "response_ids": torch.randint(0, n_plain, (length,), generator=g).tolist()})
    plain = modeling.load_model(model_dir)
    with torch.no_grad():  # old/ref log-probs near the current ones, so ratios and KL are not trivial
        for s in samples:
            lp = modeling.token_logprobs(plain, data.collate([s], 0))[0]
            s["old_logp"] = lp + 0.3 * torch.randn(lp.shape, generator=g)
            s["ref_logp"] = lp + 0.2 * torch.randn(lp.shape, generator=g)
    torch.manual_seed(0)
    policy = modeling.apply_fsdp(modeling.load_model(model_dir), init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.01)
    cfg = train.Config(micro_batch_size=2, max_response_length=12, clip_eps_low=0.2, clip_eps_high=0.3)
    share = len(samples) // world
    stats = train.optimizer_step(policy, optimizer, samples[rank * share:(rank + 1) * share], cfg, use_kl=True,
                                 world_size=world, device=torch.device("cpu"), pad_id=0, banned_ids=[])
    stats = {k: v / world for k, v in train.all_reduce(stats).items()}  # what train.py logs
    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"stats": stats, "state": state}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
