"""The six modules stay near 2,000 lines: growing one past its budget should be a decision (raise the
number here in the same commit, with the reason), not an accident."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Raised, with the reason:
# model.py 300 -> 465: meta-device init with rank-0 broadcast, the FSDP2 memory options and freezing, the
#   checkpoint export and its CLI (issue 7); hand-written LoRA, merged for vLLM and the savers through one
#   hf_named, PEFT adapter files (issue 5). Half of it docstrings.
# data.py 300 -> 355 (issue 5): offline rows, SFT and preference pairs in ms-swift's and TRL's forms, through
#   load_prompts(kind=...), and the synthetic sft.jsonl / pref.jsonl.
# rollout.py 200 -> 250 (issue 8): the transformers sampler (a decoding loop on the trainer's model that
#   keeps FSDP ranks in step), FSDP-unit weight gathering, CUDA sleep/wake.
# train.py 650 -> 780 (issues 5, 7, 8): the memory and LoRA flags, --sampler, --vllm_tp, --algo=sft|mpo as a
#   branch of the same loop (offline_step, mpo_step, a shared clip_and_step), the per-step token counts.
# Total 2200 -> 2510 for these: over the design's ~2,000, a decision to revisit by trimming.
# Issue 6 (speed): the shared-prompt forward (model.shared_prompt_logits, collate(share_prompts)), two flags
#   and the on-policy first update without its own old-log-prob forward: model.py 465 -> 500, data.py
#   355 -> 365, train.py 780 -> 790; grpo.py and reward.py trimmed by 29 lines (budgets lowered to 305 /
#   340), so the total rose 2510 -> 2540. rollout.py 250 -> 255: generate_hf gathers each FSDP unit once per
#   generation instead of once per decoded token (total 2550).
# model.py 500 -> 540 (issues 6, 7): grouped_sdpa (attention without a copy of the KV cache per query head
#   under a padding mask) and linear_patch_embed (the vision patch Conv3d as a matmul; torch 2.9+ lost cuDNN's
#   kernel for it): step 0.78-0.84 -> 0.67 s on CPU (total 2590).
# Issues 14-16 (GPU readiness, the real tokenizer, nothing silent), total 2590 -> 3025: train.py +205 (flags
#   checked at parse time, the out_dir lock, resume that skips damaged checkpoints and rewinds, SIGTERM and
#   circuit breakers with a checkpoint, the process-group backend, the memory plan at start); model.py +130
#   (checkpoints that fsync, replace, describe their damage and load no pickle; log-probs in chunks; no
#   empty attention rows; the generation config and processor loading; the tied tiny model); data.py +55
#   (transparency, 16-bit images, special tokens in text, format-prompt and empty-file checks); rollout.py
#   +25 (vLLM's image budget, the tied head's second name). Over the design's 2,200: issue 17 moves the tiny
#   world out and splits train.py.
BUDGET = {"grpo.py": 310, "model.py": 675, "rollout.py": 280, "reward.py": 350, "data.py": 420, "train.py": 995}


def test_modules_within_budget():
    sizes = {name: sum(1 for _ in open(os.path.join(ROOT, name))) for name in BUDGET}
    over = {name: (n, BUDGET[name]) for name, n in sizes.items() if n > BUDGET[name]}
    assert not over, f"over budget (lines, budget): {over}"
    assert sum(sizes.values()) <= 3025, sizes
