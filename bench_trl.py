"""TRL's GRPOTrainer on our tiny default workload, timed per step of ours (issue 6).

    bash scripts/setup_trl.sh        # .venv-trl: TRL 1.16.0, transformers 5.19.0, torch 2.13.0+cpu
    .venv-trl/bin/python bench_trl.py --steps 4 --model_dir .cache/tiny/model-ws150-g30 --data_dir .cache/tiny/data

The last line of stdout is one JSON object (bench.py reads it); progress and checks go to stderr.
The model folder is the one `python train.py` builds; without training, build it with .venv:
    .venv/bin/python -c "import tiny; tiny.prepare('.cache/tiny')"

The workload is read from train.py itself (`train.parse_flags([])`: the dataclass plus tiny.TINY's
overrides), so this side follows the defaults that our trainer runs. One step of ours:
32 prompts x G=5 = 160 completions of at most 24 tokens (temperature 1, top_p 1), then
32 / 16 = 2 optimizer steps of 80 completions each, in micro-batches of 40 (gradient accumulation
2), one pass, k3 KL at 0.01 against a reference model, clip 0.2 / 0.3, AdamW lr 1e-3 with no weight
decay, grad clip 1.0, float32.

How that maps onto TRL (read from trl/trainer/grpo_trainer.py and grpo_config.py at 1.16.0):
  TRL counts batches in completions, not prompts, and one dataloader batch is a whole generation
  batch: RepeatSampler yields generation_batch_size / G distinct prompts, each G times in a row,
  and repeats that batch steps_per_generation * num_iterations times. `_prepare_inputs` generates
  and scores once per generation batch, shuffles the completions, splits them into
  steps_per_generation slices of per_device_train_batch_size, and hands one slice to each micro-step;
  the optimizer steps every gradient_accumulation_steps micro-steps. So:
    per_device_train_batch_size = micro_batch_size = 40         completions per forward/backward
    generation_batch_size = rollout_batch_size * G = 160         -> steps_per_generation = 160 / 40 = 4
    gradient_accumulation_steps = global_batch_size * G / 40 = 2 -> 80 completions per optimizer step
    num_iterations = 1, so 4 / 2 = 2 optimizer steps (TRL "global steps") per generation batch:
    one step of ours = one generation batch = 2 global steps; max_steps = 2 * (warm-up + steps).
  Because gradient_accumulation_steps (2) is not a multiple of steps_per_generation * num_iterations
  (4), TRL computes old log-probs after generating (the second optimizer step is off-policy), as our
  trainer does; beta > 0 makes it also compute reference log-probs. Both run in chunks of
  per_device_train_batch_size = 40, like our micro-batches.
  num_generations=5, max_completion_length=24, temperature=1.0, top_p=1.0, top_k=0 (off),
  beta=0.01 (TRL's KL is k3), use_bias_correction_kl=False (our KL term is plain k3, not multiplied by
  the ratio), epsilon=0.2, epsilon_high=0.3, delta=3.0 (INTELLECT-2's cap on the unclipped ratio:
  with delta > 1 + epsilon_high it is exactly our dual clip, c=3), loss_type="dapo" (the sum over
  tokens divided by the token count of the optimizer step: our token_mean), scale_rewards="group",
  learning_rate=1e-3 with lr_scheduler_type="constant" (we have no schedule; TRL's default is
  linear decay), optim="adamw_torch" (torch.optim.AdamW, as ours; the default is the fused one),
  weight_decay=0, max_grad_norm=1.0, bf16=False and fp16=False (float32; TRL defaults to bf16),
  use_cpu=True, gradient_checkpointing=False (TRL defaults to True; we do not recompute
  activations), use_vllm=False, seed=1, report_to="none", save_strategy="no", no evaluation,
  dataloader_num_workers=0, logging_steps=2 (one log per step of ours: it holds exactly one
  generation batch's metrics). generation_kwargs suppress_tokens = the four vision tokens that our
  sampler bans (rollout.BANNED_TOKENS; TRL by default suppresses only <|image_pad|>).
  TRL 1.16 has no max_prompt_length: prompts are never truncated (our longest is far under 512).

Prompts, images and reward are the project's own: data.build_prompt resizes each image into
[min_pixels, max_pixels] and renders the chat text; the same user turn is given to TRL as chat
messages, and every row's rendered text is checked to equal build_prompt's, and the first rows'
token ids and pixel_values as TRL tokenizes them to equal data.encode_prompt's. The reward is
reward.math_score (math-verify; 0.9 accuracy + 0.1 format), imported from the repo root.

Timing: wall clock between the ends of every second optimizer step (a TrainerCallback), so a step
includes data loading, generation, scoring, the two updates and logging; the first step of ours is
a warm-up and is not counted. Phases, by wrapping the trainer's methods on the instance:
  rollout  = _generate: chat template + processor on the 160 prompts, model.generate, decoding
  reward   = _calculate_rewards
  logprobs = the rest of _generate_and_score_completions: the processor again on the images,
             old log-probs (policy) and reference log-probs, advantages
  update   = the rest of the step: 4 forward/backward micro-batches, 2 clip + AdamW steps, and
             TRL's own plumbing (the dataloader decoding the batch's images, logging)
Checks, from hooks and TRL's state, fail the run when the mapping is off: the optimizer-step count,
160 completions per generation and 80 per optimizer step in micro-batches of 40, the images the
vision tower sees per step (160 each when sampling, for the old and the reference log-probs, and in
the update), and that the vision tower's weights change (the images are in the gradient).

Where the two trainers differ (the comparison measures these on purpose or they cost ~nothing):
  - Sampling: TRL without vLLM calls transformers `generate` on one left-padded batch of all 160
    sequences (the policy's own weights, so no weight sync); ours samples with an in-process vLLM
    engine and then syncs the weights into it.
  - TRL runs the image processor on all 160 rows twice per step (for generation, then for the
    log-prob passes); ours once per prompt for the trainer, besides vLLM's own preprocessing. TRL
    computes log-probs through its fused (chunked) LM head, and the per-token entropy in the update
    pass; ours computes entropy in the old-log-prob pass.
  - Loss details with no real cost: TRL's "dapo" divides by half the generation batch's tokens
    rather than the exact tokens of the optimizer step; its advantage eps is 1e-4 (ours 1e-6);
    TRL's training log-probs do not carry the -100 bias on vision tokens (they are suppressed only
    when sampling).
  - The reward runs in-process in TRL; ours runs it in worker processes with a time bound.
  - The prompts of a step differ (TRL's RepeatSampler order vs our shuffle), so completion lengths
    differ: compare gen_tokens_per_step too, not only seconds.
"""
import argparse
import collections
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

# Everything is local (the model and data are folders): never wait on a hub that cannot be reached.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import datasets
import jinja2
import torch
import transformers
import trl
from transformers import PrinterCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import prepare_multimodal_messages

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
import data  # noqa: E402  the project's own modules: the same prompts, images, reward and banned tokens
import reward  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402


def to_messages(problem):
    """A row's problem as the one user turn that data.build_prompt renders, as chat messages (TRL
    applies the chat template itself): the format prompt around it, an image item per <image>."""
    text = jinja2.Template(data.MATH_FORMAT_PROMPT).render(content=problem)
    content = []
    for i, chunk in enumerate(text.split("<image>")):
        content += [{"type": "image"}] if i > 0 else []
        content += [{"type": "text", "text": chunk}] if chunk.strip() else []
    return [{"role": "user", "content": content}]


def build_dataset(data_dir, processor, cfg):
    """train.parquet -> a Dataset of (prompt messages, [resized image], answer), each row's chat text
    checked against build_prompt's. Rows that build_prompt skips are skipped (none in the synthetic
    data); load_prompts' duplicate and length filters are not applied."""
    rows = data.load_rows(os.path.join(data_dir, "train.parquet"))
    rows = rows.cast_column("images", datasets.List(datasets.Image(decode=False)))  # decoded by build_prompt
    out = {"prompt": [], "images": [], "answer": []}
    for i in range(len(rows)):
        try:
            p = data.build_prompt(rows[i], i, processor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        except data.SkipRow:
            continue
        messages = to_messages(rows[i]["problem"])
        if processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) != p["text"]:
            raise SystemExit(f"row {i}: the chat messages render differently from data.build_prompt")
        out["prompt"].append(messages)
        out["images"].append(p["images"])  # stored as PNG, lossless: the same pixels come back
        out["answer"].append(p["answer"])
    return datasets.Dataset.from_dict(out)


def seed_math_reward(completions, answer, **kwargs):
    """reward.math_score (the reward our trainer uses by default) in TRL's signature."""
    inputs = [{"response": c[0]["content"], "ground_truth": a} for c, a in zip(completions, answer)]
    return [s["overall"] for s in reward.math_score(inputs)]


def check_prompt_encoding(trainer, dataset, processor, n=8):
    """TRL's prompt token ids and pixel_values for the first n rows (after the dataset round trip)
    equal what our trainer feeds its model (data.encode_prompt)."""
    for i in range(n):
        row = dataset[i]
        messages = prepare_multimodal_messages(row["prompt"], images=row["images"])
        prompt_ids, _, mm = trainer._tokenize_prompts([messages])
        text = processor.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        ours = data.encode_prompt({"text": text, "images": row["images"]}, processor)
        if list(prompt_ids[0]) != ours["prompt_ids"].tolist():
            raise SystemExit(f"row {i}: TRL's prompt token ids differ from data.encode_prompt's")
        if not all(torch.equal(mm[k], ours[k]) for k in ("pixel_values", "image_grid_thw")):
            raise SystemExit(f"row {i}: TRL's pixel_values differ from data.encode_prompt's")
    return n


class StepClock(TrainerCallback):
    """perf_counter at the start of training and at the end of every optimizer step; TRL's logs."""

    def __init__(self):
        self.marks, self.logs = [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="steps of ours to time, after the warm-up")
    ap.add_argument("--warmup", type=int, default=1, help="steps of ours run first and not timed")
    ap.add_argument("--model_dir", default=".cache/tiny/model-ws150-g30")
    ap.add_argument("--data_dir", default=".cache/tiny/data")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()  # stderr is for this script's progress lines
    transformers.utils.logging.disable_progress_bar()
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        raise SystemExit(f"no model in {args.model_dir}; build it with .venv (see this file's docstring)")

    # ------------------------------------------------------------------ workload = our tiny default
    cfg = train.parse_flags([])
    # The mapping below assumes the defaults it was written for; refuse anything else.
    assumed = dict(loss_agg="token_mean", ratio_level="token", kl_estimator="k3", adv_estimator="grpo",
                   adv_std_norm=True, kl_in_reward=False, dynamic_sampling=False, sft_data="",
                   mismatch_correction="none", reward="math")
    if changed := {k: getattr(cfg, k) for k, v in assumed.items() if getattr(cfg, k) != v}:
        raise SystemExit(f"train.py's defaults changed ({changed}): update bench_trl.py's mapping")
    G, micro = cfg.num_generations, cfg.micro_batch_size
    gen_batch = cfg.rollout_batch_size * G  # completions per step of ours
    per_update = cfg.global_batch_size * G  # completions per optimizer step
    if gen_batch % per_update or per_update % micro:
        raise SystemExit("the step does not split into whole optimizer steps and micro-batches")
    updates = gen_batch // per_update  # optimizer steps per step of ours

    processor = transformers.AutoProcessor.from_pretrained(args.model_dir)
    dataset = build_dataset(args.data_dir, processor, cfg)
    banned = rollout.banned_token_ids(processor.tokenizer)
    out_dir = tempfile.mkdtemp(prefix="bench-trl-")  # TRL needs one; nothing is saved in it
    config = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, seed=cfg.seed,
        # transformers' own SDPA: TRL as users run it (ours runs patches.grouped_sdpa, the same attention)
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        # batch layout (see the docstring)
        per_device_train_batch_size=micro, gradient_accumulation_steps=per_update // micro,
        generation_batch_size=gen_batch, num_generations=G, num_iterations=1,
        max_steps=updates * (args.warmup + args.steps),
        # sampling
        use_vllm=False, max_completion_length=cfg.max_response_length, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=0, generation_kwargs={"suppress_tokens": banned},
        # loss
        beta=cfg.kl_coef, use_bias_correction_kl=False, epsilon=cfg.clip_eps_low, epsilon_high=cfg.clip_eps_high,
        delta=cfg.dual_clip or None, loss_type="dapo", scale_rewards="group",
        # optimizer
        learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, gradient_checkpointing=False,
        # plumbing
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=updates, disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, remove_unused_columns=False,
    )
    clock = StepClock()
    trainer = GRPOTrainer(model=args.model_dir, reward_funcs=seed_math_reward, args=config,
                          train_dataset=dataset, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # TRL's log dicts would go to stdout, whose last line is ours
    checked = check_prompt_encoding(trainer, dataset, processor)
    a = trainer.args
    print(f"bench_trl: {len(dataset)} prompts | TRL generation_batch_size {a.generation_batch_size}, "
          f"steps_per_generation {a.steps_per_generation}, gradient_accumulation_steps "
          f"{a.gradient_accumulation_steps}, per_device_train_batch_size {a.per_device_train_batch_size}, "
          f"num_generations {trainer.num_generations}, max_steps {a.max_steps} | prompt ids and pixels "
          f"of {checked} rows equal data.encode_prompt's | threads {torch.get_num_threads()}", file=sys.stderr)

    # ------------------------------------------------------------------ instrumentation
    # Seconds per phase, generated tokens and the images the vision tower sees, summed per optimizer
    # step (on_step_end closes each record). Wrapping instance attributes leaves TRL's classes as
    # they are; `inside` names the wrapped call running now, so each image is counted where it is seen.
    current, records, inside = collections.Counter(), [], []

    def timed(name, fn, count=None):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            inside.append(name)
            try:
                out = fn(*a, **kw)
            finally:
                inside.pop()
            current[f"time/{name}"] += time.perf_counter() - t
            if count:
                count(a, out)
            return out
        return wrapper

    def count_generation(a, out):
        completion_ids = out[1]  # _generate returns (prompt_ids, completion_ids, ...) in TRL 1.16
        current["completions"] += len(completion_ids)
        current["gen_tokens"] += sum(len(c) for c in completion_ids)

    def count_micro_batch(a, out):
        n = a[1]["completion_ids"].shape[0]  # compute_loss(model, inputs): inputs is one micro-batch
        current["trained"] += n
        current[f"micro_batch_of_{n}"] += 1

    def count_images(model_name):
        def hook(module, a, kw):
            grid = kw["grid_thw"] if "grid_thw" in kw else a[1]  # (num_images, 3)
            current[f"images/{model_name}/{inside[-1] if inside else 'elsewhere'}"] += grid.shape[0]
        return hook

    trainer._generate = timed("rollout", trainer._generate, count_generation)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("score", trainer._generate_and_score_completions)
    trainer.compute_loss = timed("loss", trainer.compute_loss, count_micro_batch)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    policy.model.visual.register_forward_pre_hook(count_images("policy"), with_kwargs=True)
    trainer.ref_model.model.visual.register_forward_pre_hook(count_images("ref"), with_kwargs=True)

    class CloseRecord(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            records.append(dict(current))
            current.clear()

    trainer.add_callback(CloseRecord)

    # ------------------------------------------------------------------ run
    # Gradients reach the vision tower only if the images are in the loss's forward: its weights move.
    vision_before = [p.detach().clone() for p in policy.model.visual.parameters()]
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    shutil.rmtree(out_dir, ignore_errors=True)

    # ------------------------------------------------------------------ per step of ours, checked
    total = args.warmup + args.steps
    if trainer.state.global_step != updates * total or len(records) != updates * total:
        raise SystemExit(f"TRL took {trainer.state.global_step} optimizer steps, expected {updates * total}")
    # Per step of ours: the vision tower sees every image when sampling (policy, inside _generate), for
    # the old log-probs (policy) and the reference log-probs (ref) inside the scoring, and when training.
    want_images = {"images/policy/rollout": gen_batch, "images/policy/score": gen_batch,
                   "images/ref/score": gen_batch, "images/policy/loss": gen_batch}
    steps = []
    for k in range(total):
        recs = records[k * updates:(k + 1) * updates]
        s = sum((collections.Counter(r) for r in recs), collections.Counter())
        seconds = clock.marks[(k + 1) * updates] - clock.marks[k * updates]
        phases = {"rollout": s["time/rollout"], "reward": s["time/reward"],
                  "logprobs": s["time/score"] - s["time/rollout"] - s["time/reward"],
                  "update": seconds - s["time/score"]}
        steps.append({"seconds": seconds, "gen_tokens": s["gen_tokens"], **phases})
        print(f"bench_trl: step {k + 1}/{total}{' (warm-up)' if k < args.warmup else ''}: {seconds:.2f} s ("
              + ", ".join(f"{p} {v:.2f}" for p, v in phases.items())
              + f"); {s['completions']} completions, {s['gen_tokens']} tokens", file=sys.stderr)
        # The work must be the mapping's, or the timing compares different things.
        problems = []
        if s["completions"] != gen_batch:
            problems.append(f"{s['completions']} completions generated, expected {gen_batch}")
        if (trained := [r.get("trained", 0) for r in recs]) != [per_update] * updates:
            problems.append(f"completions per optimizer step {trained}, expected {per_update}")
        if (sizes := {key for key in s if key.startswith("micro_batch_of_")}) != {f"micro_batch_of_{micro}"}:
            problems.append(f"micro-batches {sorted(sizes)}, expected {micro} completions each")
        if (images := {key: v for key, v in s.items() if key.startswith("images/")}) != want_images:
            problems.append(f"the vision tower saw {images}, expected {want_images}")
        if problems:
            raise SystemExit(f"bench_trl: step {k + 1}: " + "; ".join(problems))

    vision_moved = any(not torch.equal(a, b) for a, b in zip(vision_before, policy.model.visual.parameters()))
    if not vision_moved:
        raise SystemExit("bench_trl: the vision tower's weights did not change: the images are not trained on")

    timed_steps = steps[args.warmup:]
    logs = [log for log in clock.logs if "completions/mean_length" in log]  # one per step of ours
    secs = [s["seconds"] for s in timed_steps]
    result = {
        "impl": "trl", "trl_version": trl.__version__, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "steps": args.steps, "warmup_steps": args.warmup,
        "sec_per_step_median": statistics.median(secs), "sec_per_step_mean": statistics.mean(secs),
        "sec_per_step": [round(x, 4) for x in secs],
        "gen_tokens_per_step": statistics.mean(s["gen_tokens"] for s in timed_steps),
        # TRL's own count, a cross-check of the one above: its logged mean length x completions
        "gen_tokens_per_step_trl_log": statistics.mean(log["completions/mean_length"] for log in logs[args.warmup:])
        * gen_batch,
        "completions_per_step": gen_batch, "optimizer_steps_per_step": updates, "micro_batch_size": micro,
        "phases": {p: statistics.median(s[p] for s in timed_steps)  # median seconds per step
                   for p in ("rollout", "reward", "logprobs", "update")},
        # TRL's cumulative num_tokens (prompt, image tokens included, + completion), differenced per step
        "tokens_per_step": statistics.median(logs[k]["num_tokens"] - logs[k - 1]["num_tokens"]
                                             for k in range(max(args.warmup, 1), len(logs))),
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux reports KiB
        "reward_per_step": [round(log["reward"], 4) for log in logs],  # warm-up included, as a sanity check
        "threads": torch.get_num_threads(), "seed": cfg.seed, "wall_s": round(wall, 2),
        "checks": {"prompt_rows_checked": checked, "images_per_step": want_images,
                   "optimizer_steps": trainer.state.global_step, "vision_weights_updated": vision_moved},
    }
    print(json.dumps(result))

if __name__ == "__main__":
    main()
