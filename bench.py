"""Seconds per GRPO step, split by phase, for our trainer (vLLM and transformers samplers) and TRL's
GRPOTrainer on the same work, side by side, with the ratios.

    bash scripts/setup_cpu.sh && bash scripts/setup_trl.sh   # .venv, and .venv-trl for TRL alone
    .venv/bin/python bench.py --steps 5                       # vllm, hf and trl; ~5 min on 2 cores

Our side is train.py itself, run in a subprocess on the tiny default workload (32 prompts x 5
responses of <= 24 tokens, 2 optimizer steps of 80 sequences in micro-batches of 40, k3 KL against a
reference model, float32) with validation off; the numbers are read from its metrics.jsonl. TRL's
side is bench_trl.py in .venv-trl (its docstring maps the same work onto GRPOConfig). The first
step of each is a warm-up and is not counted; medians over the rest.

A second mode, for GPUs (issue 7), times the trainer alone on Qwen2.5-VL-3B- or 7B-shaped models
with random weights built from the real configs (no download), FSDP2 on one device:

    python bench.py --model=7b --master_dtype=bfloat16 [--activation_checkpointing] [--cpu_offload]

It prints update tokens/s and log-prob tokens/s (forward without gradients), the update's MFU and
peak memory, on micro-batches of --seqs sequences, each one image (--image_px square, 4 patches per
merged token) plus --text_len prompt tokens and --response_len response tokens. With --group=G the
sequences are G responses per prompt and each prompt runs once (train.py's --share_prompts): tokens/s
still counts every sequence's tokens (what is trained), MFU only the FLOPs computed.

A third mode times the trainer's log-prob pass and update on a Geometry3K-like mix of lengths
(LENGTH_MIX, scaled to the tiny model), micro-batches by token budget against micro-batches of 4
rows, and ends with the real-token share and seconds per step of each:

    .venv/bin/python bench.py --workload=lengths [--steps 5] [--cache_dir=...]

Printed per implementation (first mode): seconds per step and per phase (rollout, reward, old/ref log-probs,
update, weight sync), tokens/s (prompt + image + response tokens trained per step over the step
time, EasyR1's definition; prompt tokens are processor-expanded so they include the image's),
generated tokens/s (response tokens over the rollout phase), peak memory, and on a GPU the update's
MFU: 6 N FLOPs per token for the language model's N parameters, plus 6 N_vision per vision patch
(4 patches per image token after the 2x2 merge), over the update time and the GPU's peak.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
PHASES = ("rollout", "reward", "logprobs", "update", "sync")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def run_ours(sampler, steps, threads, out_dir, extra):
    """train.py with one warm-up step, then `steps` timed ones; returns the per-step records."""
    out = os.path.join(out_dir, sampler)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--sampler={sampler}", f"--max_steps={steps + 1}",
           "--val_data=", "--save_hf=false", f"--out_dir={out}", *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in records if "time/step" in r][1:]


def summarise_ours(records, model_dir):
    med = lambda key: statistics.median(r[key] for r in records)  # noqa: E731
    tokens = med("tokens/prompt") + med("tokens/response")
    row = {"sec_per_step": med("time/step"), **{p: med(f"time/{p}") for p in PHASES},
           "tokens_per_s": statistics.median((r["tokens/prompt"] + r["tokens/response"]) / r["time/step"] for r in records),
           "gen_tokens_per_s": statistics.median(r["tokens/response"] / r["time/rollout"] for r in records),
           "gen_tokens_per_step": med("tokens/response"), "peak_gb": max(r["memory/peak_gb"] for r in records)}
    import torch

    if torch.cuda.is_available():  # MFU of the update phase (forward + backward of every trained token)
        from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(model_dir))
        row["update_mfu"] = update_mfu(model, tokens, 4 * med("tokens/image"), med("time/update"))
    return row


# The language model and vision tower of Qwen2.5-VL-3B/7B-Instruct (their config.json files).
SHAPES = {"3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                     num_key_value_heads=2, vocab_size=151936, tie=True),
          "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie=False)}
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])


def update_mfu(model, tokens, patches, seconds):
    """Model FLOPs utilisation of forward + backward over `seconds`, None off a known GPU. FLOPs: 6 N
    per token for the N parameters the tokens pass through (the language model: every parameter but
    the vision tower, the input embedding counted too as the usual approximation, attention's
    quadratic term left out) and 6 N_vision per vision patch."""
    import torch

    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    n_text = sum(p.numel() for p in model.parameters()) - n_vision
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return (6 * n_text * tokens + 6 * n_vision * patches) / seconds / peak if peak else None


def model_bench(args):
    """Update and log-prob throughput of one FSDP2 rank on a 3B/7B-shaped Qwen2.5-VL (issue 7)."""
    import time

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, ROOT)
    import model as modeling
    import patches

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    import train

    dist.init_process_group(train.process_group_backend(device.type), rank=0, world_size=1)
    text = dict(SHAPES[args.model])
    tie = text.pop("tie")
    if args.layers:  # fewer layers, for a quick check on a small machine
        text["num_hidden_layers"] = args.layers
    vision = {**VISION, "out_hidden_size": text["hidden_size"], **({"depth": args.layers} if args.layers else {})}
    config = Qwen2_5_VLConfig(text_config={**text, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                                       "mrope_section": [16, 24, 24]}},
                              vision_config=vision, tie_word_embeddings=tie, image_token_id=151655)
    master = getattr(torch, args.master_dtype)
    with torch.device(device):  # random init on the device: fast, and the rotary buffers are computed
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=master,
                                                                attn_implementation=patches.attention_implementation())
    patches.linear_patch_embed(model)
    modeling.apply_fsdp(model, init_device_mesh(device.type, (1,)), param_dtype=torch.bfloat16 if cuda else torch.float32,
                        activation_checkpointing=args.activation_checkpointing, cpu_offload=args.cpu_offload)
    if args.cpu_offload:
        model.to("cpu")
        for buf in model.buffers():
            buf.data = buf.data.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    # One micro-batch: per prompt one image of g x g patches (g/2 x g/2 merged tokens), then text; --group
    # responses per prompt. With a group > 1 each prompt runs once (train.py's --share_prompts).
    g, G = args.image_px // 14, args.group
    if args.seqs % G:
        sys.exit("--seqs must be a multiple of --group")
    U, n_img, P, T = args.seqs // G, (g // 2) ** 2, args.text_len + (g // 2) ** 2 + 2, args.response_len
    prompts, responses = torch.randint(0, 150000, (U, P)), torch.randint(0, 150000, (args.seqs, T))
    prompts[:, 1:1 + n_img] = config.image_token_id
    batch = {"input_ids": prompts, "attention_mask": torch.ones(U, P, dtype=torch.long), "response_ids": responses,
             "response_mask": torch.ones(args.seqs, T), "image_grid_thw": torch.tensor([[1, g, g]] * U),
             "pixel_values": torch.randn(U * g * g, 3 * 2 * 14 * 14), "prompt_index": torch.arange(U).repeat_interleave(G)}
    if G == 1:  # full rows, one forward
        batch["input_ids"] = torch.cat([prompts, responses], 1)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        del batch["prompt_index"]
    batch = {k: v.to(device) for k, v in batch.items()}
    tokens = args.seqs * (P + T)  # trained tokens (EasyR1's count); computed: each prompt once
    computed, patches = U * P + args.seqs * T, U * g * g

    def timed(fn):
        fn()  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / args.steps

    def update():
        modeling.token_logprobs(model, batch).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def logprobs():
        with torch.no_grad():
            modeling.token_logprobs(model, batch)

    t_update, t_logp = timed(update), timed(logprobs)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    mfu = update_mfu(model, computed, patches, t_update)
    print(f"| {args.model} ({config.text_config.num_hidden_layers} layers) | {name} | {args.master_dtype} | "
          f"ac={args.activation_checkpointing} offload={args.cpu_offload} group={G} | {tokens / t_update:.0f} | "
          f"{tokens / t_logp:.0f} | " + (f"{mfu:.1%}" if mfu else "n/a") + f" | {peak:.1f} GiB |")
    dist.destroy_process_group()


# Geometry3K with Qwen2.5-VL-7B: a prompt of ~385 tokens with its image, responses long-tailed with
# mean ~340 and max 2,048 (lognormal: median 247, sigma 0.8, capped), G = 5; 32 prompts per
# optimizer step (a rank's share of 128 in the README's 4-GPU command), one optimizer step a step
# (the recipe takes 4), micro-batches of 4 rows (train.py's default).
LENGTH_MIX = dict(prompt=385, median=247, sigma=0.8, cap=2048, G=5, prompts=32, updates=1, rows=4)


def lengths_bench(args, flags):
    """The trainer's log-prob pass and update on the length mix, budget on and off in turn on the
    same rows. Scaled to the tiny model: its prompts (with their image) stand for Geometry3K's and
    responses shrink by the same factor; random tokens, no sampling. Off: micro-batches of 4 rows;
    on: a budget of 4 x (longest prompt + longest response), the same worst case."""
    import dataclasses
    import math
    import random
    import time

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoProcessor

    sys.path.insert(0, ROOT)
    import data
    import model as modeling
    import tiny
    import train

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29534"))
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg, m = train.parse_flags(flags), LENGTH_MIX
    model_dir, data_dir = tiny.prepare(cfg.cache_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    policy = modeling.load_fsdp_model(model_dir, init_device_mesh("cpu", (1,)), rank=0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, foreach=True)
    rows, per_step = data.load_rows(f"{data_dir}@train"), m["prompts"] * m["updates"]
    pixels = dict(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    prompts = [data.encode_prompt(data.build_prompt(rows[i], i, processor, **pixels), processor)
               for i in range(per_step * (args.steps + 1))]
    P = max(len(p["prompt_ids"]) for p in prompts)
    scale = sum(len(p["prompt_ids"]) for p in prompts) / len(prompts) / m["prompt"]
    T = math.ceil(m["cap"] * scale)
    budget, rng = m["rows"] * (P + T), random.Random(0)
    n_plain = len(processor.tokenizer) - len(tiny.SPECIAL_TOKENS)
    batching = dict(pad_id=processor.tokenizer.pad_token_id, device=torch.device("cpu"),
                    banned_ids=[])
    runs = {f"on ({budget} tokens)": budget, f"off ({m['rows']} rows)": 0}
    seen = {mode: {"seconds": [], "logprobs": [], "update": [], "share": [],
                   "tokens": {"real": 0, "computed": 0}} for mode in runs}
    for step in range(args.steps + 1):  # the first is a warm-up
        samples = []
        for p in prompts[step * per_step:(step + 1) * per_step]:
            for _ in range(m["G"]):
                r = min(m["cap"], rng.lognormvariate(math.log(m["median"]), m["sigma"]))
                ids = [rng.randrange(n_plain) for _ in range(max(1, round(r * scale)))]
                samples.append({**p, "response_ids": ids})
        adv = torch.randn(len(samples), generator=torch.Generator().manual_seed(step))
        n = len(samples) // m["updates"]
        for mode, limit in runs.items():
            c = dataclasses.replace(cfg, micro_batch_size=m["rows"], max_response_length=T,
                                    max_tokens_per_micro_batch=limit)
            tally = seen[mode]["tokens"] if step else {"real": 0, "computed": 0}
            t0 = time.perf_counter()
            logp = train.logprobs(policy, samples, c, **batching, temperature=1.0, tokens=tally)
            for s, lp in zip(samples, logp):
                s["old_logp"] = s["ref_logp"] = lp
            t1 = time.perf_counter()
            shares = [train.optimizer_step(policy, optimizer, samples[u * n:(u + 1) * n],
                                           adv[u * n:(u + 1) * n], c, on_policy=False, use_kl=True,
                                           **batching)[0]["update/real_token_share"]
                      for u in range(m["updates"])]
            if step:
                seen[mode]["seconds"].append(time.perf_counter() - t0)
                seen[mode]["logprobs"].append(t1 - t0)
                seen[mode]["update"].append(time.perf_counter() - t1)
                seen[mode]["share"] += shares
    dist.destroy_process_group()
    print(f"length mix: prompts of {scale * m['prompt']:.0f} tokens on average (at most {P}), "
          f"{scale:.3f} of Geometry3K's; responses of at most {T}; {len(samples)} rows a step, "
          f"{m['updates']} optimizer step(s); medians of {args.steps} steps after a warm-up")
    print("| micro-batches | s / step | log-prob pass | update | real-token share: log-prob pass "
          "| update | tokens computed / pass |\n|---|---|---|---|---|---|---|")
    out = {}
    for mode, r in seen.items():
        out[mode] = (statistics.mean(r["share"]), statistics.median(r["seconds"]))
        print(f"| {mode} | {out[mode][1]:.3f} | {statistics.median(r['logprobs']):.3f} | "
              f"{statistics.median(r['update']):.3f} | "
              f"{r['tokens']['real'] / r['tokens']['computed']:.3f} | {out[mode][0]:.3f} | "
              f"{r['tokens']['computed'] / args.steps:.0f} |")
    (on_share, on_s), (off_share, off_s) = out.values()
    print(f"real-token share: budget on {on_share:.3f}, off {off_share:.3f}; "
          f"seconds per step: on {on_s:.3f}, off {off_s:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation, after one warm-up step")
    ap.add_argument("--impls", default="vllm,hf,trl", help="comma-separated: vllm, hf (ours), trl")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every implementation")
    ap.add_argument("--out_dir", default="out-bench")
    ap.add_argument("--model", default="", help="3b or 7b: the GPU trainer benchmark instead (see the docstring)")
    ap.add_argument("--master_dtype", default="bfloat16")
    ap.add_argument("--activation_checkpointing", action="store_true")
    ap.add_argument("--cpu_offload", action="store_true")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (0 = the real model's)")
    ap.add_argument("--seqs", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--image_px", type=int, default=448)
    ap.add_argument("--text_len", type=int, default=200)
    ap.add_argument("--response_len", type=int, default=1024)
    ap.add_argument("--group", type=int, default=1, help="responses per prompt in a micro-batch (>1: each prompt runs once)")
    ap.add_argument("--workload", default="", help="lengths: the length mix instead (LENGTH_MIX)")
    args, flags = ap.parse_known_args()  # the rest are train.py flags for our runs, e.g. --model_path=...
    if args.workload == "lengths":
        return lengths_bench(args, flags)
    if args.model:
        print("| model | device | master | memory options | update tok/s | log-prob tok/s | update MFU | peak |")
        return model_bench(args)
    sys.path.insert(0, ROOT)
    import tiny
    import train

    cfg = train.parse_flags(flags)
    if cfg.model_path == "tiny":  # build (or find) the tiny default, as train.py would
        model_dir, data_dir = tiny.prepare(cfg.cache_dir)
    else:
        model_dir, data_dir = cfg.model_path, None
    rows = {}
    for impl in args.impls.split(","):
        print(f"bench: running {impl} ({args.steps} + 1 steps)...", file=sys.stderr, flush=True)
        if impl == "trl":
            py = os.path.join(ROOT, ".venv-trl", "bin", "python")
            if not os.path.exists(py) or data_dir is None:
                sys.exit("trl needs .venv-trl (bash scripts/setup_trl.sh) and the tiny default workload")
            res = subprocess.run([py, os.path.join(ROOT, "bench_trl.py"), "--steps", str(args.steps), "--model_dir",
                                  model_dir, "--data_dir", data_dir, "--threads", str(args.threads)], cwd=ROOT,
                                 capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if res.returncode:
                sys.exit(f"bench_trl.py failed:\n{res.stderr[-3000:]}")
            trl = json.loads(res.stdout.strip().splitlines()[-1])
            rows["trl"] = {"sec_per_step": trl["sec_per_step_median"], **trl["phases"], "sync": 0.0,
                           "gen_tokens_per_step": trl["gen_tokens_per_step"],
                           "gen_tokens_per_s": trl["gen_tokens_per_step"] / trl["phases"]["rollout"],
                           "tokens_per_s": trl.get("tokens_per_step", float("nan")) / trl["sec_per_step_median"],
                           "peak_gb": trl.get("peak_gb", float("nan")), "version": trl.get("trl_version")}
        else:
            rows[impl] = summarise_ours(run_ours(impl, args.steps, args.threads, args.out_dir, flags), model_dir)
    # ------------------------------------------------------------------------- table
    cols = ("sec_per_step", *PHASES, "tokens_per_s", "gen_tokens_per_s", "gen_tokens_per_step", "peak_gb")
    print("| impl | " + " | ".join(cols) + (" | update_mfu |" if any("update_mfu" in r for r in rows.values()) else " |"))
    print("|---" * (len(cols) + 1) + "|")
    for impl, r in rows.items():
        mfu = f" {r['update_mfu']:.1%} |" if r.get("update_mfu") else ""
        print(f"| {impl} | " + " | ".join(f"{r[c]:.3g}" for c in cols) + " |" + mfu)
    if "trl" in rows:
        for impl in rows.keys() - {"trl"}:
            ratio = rows[impl]["sec_per_step"] / rows["trl"]["sec_per_step"]
            print(f"ours ({impl}) / TRL seconds per step: {ratio:.3f} ({'within' if ratio <= 0.5 else 'above'} the 0.5 goal)")
    with open(os.path.join(args.out_dir, "bench.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
