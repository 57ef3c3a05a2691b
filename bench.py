"""Seconds per GRPO step, split by phase, for our trainer (vLLM and transformers samplers) and TRL's
GRPOTrainer on the same work, side by side, with the ratios.

    bash scripts/setup_cpu.sh && bash scripts/setup_trl.sh   # .venv, and .venv-trl for TRL alone
    .venv/bin/python bench.py --steps 5                       # vllm, hf and trl; ~5 min on 2 cores

Our side is train.py itself, run in a subprocess on the tiny default workload (32 prompts x 5
responses of <= 24 tokens, 2 optimizer steps of 80 sequences in micro-batches of 40, k3 KL against a
reference model, float32) with validation off; the numbers are read from its metrics.jsonl. TRL's
side is bench_trl.py in .venv-trl (its docstring maps the same work onto GRPOConfig). The first
step of each is a warm-up and is not counted; medians over the rest.

Printed per implementation: seconds per step and per phase (rollout, reward, old/ref log-probs,
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
        n_vision = sum(p.numel() for p in model.model.visual.parameters())
        n_text = sum(p.numel() for p in model.parameters()) - n_vision
        flops = 6 * n_text * tokens + 6 * n_vision * 4 * med("tokens/image")
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        row["update_mfu"] = flops / med("time/update") / peak if peak else None
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation, after one warm-up step")
    ap.add_argument("--impls", default="vllm,hf,trl", help="comma-separated: vllm, hf (ours), trl")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every implementation")
    ap.add_argument("--out_dir", default="out-bench")
    args, flags = ap.parse_known_args()  # the rest are train.py flags for our runs, e.g. --model_path=...
    sys.path.insert(0, ROOT)
    import train

    cfg = train.parse_flags(flags)
    if cfg.model_path == "tiny":  # build (or find) the tiny default, as train.py would
        model_dir, data_dir = train.prepare_tiny(cfg.cache_dir, warm_start_steps=cfg.warm_start_steps,
                                                 grounded_steps=cfg.warm_start_grounded_steps)
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
