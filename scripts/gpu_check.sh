#!/usr/bin/env bash
# The GPU checks, in one script, for the day a CUDA machine is at hand (issue 14). Under 8 minutes on
# one H100/H200. Expects torch and transformers there; vLLM, flash-attn and datasets may be missing:
#   - vLLM: the tiny run uses --sampler=hf (the trainer's own model decodes);
#   - datasets and math-verify (the data loader and the reward): installed from ./wheels if absent
#     (make it here with `pip download -d wheels datasets 'math-verify[antlr4_13_2]'` and carry it).
# Prints one table: what the run measured next to what memplan.py predicts for the same work.
#   bash scripts/gpu_check.sh            (from the repository root)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-python}
OUT=${OUT:-out-gpu-check}
mkdir -p "$OUT"
for mod in datasets math_verify; do
    if ! $PY -c "import $mod" 2>/dev/null && [ -d wheels ]; then
        $PY -m pip install -q --no-index --find-links wheels "$mod" 2>&1 | tail -1
    fi
done
$PY - <<'PY'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB)")
PY

# 1. The tiny model on CUDA in bf16, --sampler=hf, a few steps: the sampler/trainer log-prob gap in bf16
#    and skipped updates (non-finite loss or gradient norm).
timeout 240 $PY train.py --sampler=hf --max_steps=6 --val_freq=0 --val_max_prompts=64 --save_hf=false \
    --out_dir="$OUT/tiny" --cache_dir="$OUT/cache" --memory_check=false > "$OUT/tiny.log" 2>&1
echo "tiny run exit code $? (log: $OUT/tiny.log)"
$PY - "$OUT/tiny/metrics.jsonl" <<'PY'
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
steps = [r for r in rows if "rollout/logp_diff_max" in r]
if steps:
    print(f"tiny bf16: {len(steps)} steps, logp_diff_max {max(r['rollout/logp_diff_max'] for r in steps):.3g}, "
          f"logp_diff_mean {max(r['rollout/logp_diff_mean'] for r in steps):.3g}, skipped updates "
          f"{sum(r.get('update/skipped', 0) for r in steps)}, peak {max(r['memory/peak_gb'] for r in steps):.2f} GiB")
PY

# 2. The trainer alone on a 7B-shaped model, one GPU, activation checkpointing (bench.py --model=7b):
#    update and log-prob tokens/s, MFU, peak memory; then the memory plan for the same micro-batch.
timeout 300 $PY bench.py --model=7b --activation_checkpointing --seqs=4 --group=1 --text_len=200 \
    --image_px=448 --response_len=1024 --steps=3 2>&1 | tee "$OUT/bench7b.log" | grep '^|'
timeout 120 $PY memplan.py --model_path=Qwen/Qwen2.5-VL-7B-Instruct --world_size=1 --gpu_memory_gib=0 \
    --micro_batch_size=4 --max_prompt_length=458 --max_response_length=1024 --activation_checkpointing=true \
    --kl_coef=0 --sampler=hf --master_dtype=bfloat16 --min_pixels=200704 --max_pixels=200704 2>&1 | tee "$OUT/plan7b.log" | tail -12
echo "compare: bench.py's peak (measured) with the plan's update phase (predicted) above"
