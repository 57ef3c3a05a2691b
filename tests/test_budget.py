"""The six modules stay near 2,000 lines: growing one past its budget should be a decision (raise the
number here in the same commit, with the reason), not an accident."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# model.py 300 -> 360 (issue 7): meta-device init with rank-0 broadcast, the FSDP2 memory options and
# freezing, and the checkpoint export with its CLI; about 100 lines, half of them docstrings.
# data.py 300 -> 355 (issue 5): offline rows, SFT and preference pairs in ms-swift's and TRL's forms, through
# load_prompts(kind=...), and the synthetic sft.jsonl / pref.jsonl; about 50 lines, a third of them docstrings.
# rollout.py 200 -> 240 (issue 8): the transformers sampler (a 40-line decoding loop on the trainer's
# model), FSDP-unit weight gathering and CUDA sleep/wake. train.py 650 -> 690 (issues 7, 8): the memory
# flags, --sampler, --vllm_tp; 240 -> 250: the hf sampler keeps FSDP ranks in step with uneven shards. train.py 690 -> 770 (issue 5): --algo=sft|mpo as a branch of the same loop
# (offline_step, mpo_step, a shared clip_and_step), the per-step token counts; 770 -> 780 the LoRA flags. Total 2200 -> 2380.
# model.py 360 -> 460 (issue 5): hand-written LoRA, merged for vLLM/save_hf/export, PEFT adapter files. Total 2500.
BUDGET = {"grpo.py": 330, "model.py": 460, "rollout.py": 250, "reward.py": 360, "data.py": 355, "train.py": 780}


def test_modules_within_budget():
    sizes = {name: sum(1 for _ in open(os.path.join(ROOT, name))) for name in BUDGET}
    over = {name: (n, BUDGET[name]) for name, n in sizes.items() if n > BUDGET[name]}
    assert not over, f"over budget (lines, budget): {over}"
    assert sum(sizes.values()) <= 2510, sizes
