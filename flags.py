"""train.py's flags: a Config dataclass (train.Config, train_offline.OfflineConfig) from the
command line, and every value checked before anything loads (a mistake found after a 7B has loaded
costs minutes), the flag named in the message. nanoGPT's configurator.py beside its train.py."""
import dataclasses
import sys

import data
import reward
import tiny


def parse(argv, config):
    """--name=value or --name value, exact field names, strict booleans; unknown flags are errors.
    The tiny model's own defaults (tiny.TINY) fill the flags not given when it is the model."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    if "--help" in argv or "-h" in argv:
        print("flags (default; the tiny default in brackets):")
        for f in fields.values():
            tiny_default = f" [{tiny.TINY[f.name]}]" if f.name in tiny.TINY else ""
            print(f"  --{f.name}={f.default}{tiny_default}")
        sys.exit(0)
    given, i = {}, 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if not name.startswith("--"):
            raise SystemExit(f"unexpected argument {argv[i]!r}; flags look like --name=value")
        name = name[2:]
        if not eq:
            if i + 1 >= len(argv):
                raise SystemExit(f"flag --{name} needs a value")
            value, i = argv[i + 1], i + 1
        if name not in fields:
            raise SystemExit(f"unknown flag --{name}; see --help")
        kind = type(fields[name].default)
        if kind is bool and value not in ("true", "false", "True", "False", "1", "0"):
            raise SystemExit(f"--{name} takes true or false, not {value!r}")
        try:
            given[name] = value in ("true", "True", "1") if kind is bool else kind(value)
        except ValueError:
            raise SystemExit(f"--{name} takes a {kind.__name__}, not {value!r}")
        i += 1
    if tiny.is_tiny(given.get("model_path", config.model_path)):
        given = {**{k: v for k, v in tiny.TINY.items() if k in fields}, **given}
    return check(config(**given))


CHOICES = dict(sampler=("vllm", "hf"), adv_estimator=("grpo", "rloo"),
               ratio_level=("token", "sequence", "sequence_token"),
               kl_estimator=("k1", "k2", "k3", "abs"),
               loss_agg=("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                         "seq_mean_token_sum_norm"),
               mismatch_correction=("none", "token", "sequence"),
               master_dtype=("float32", "bfloat16"), algo=("sft", "mpo"))
# Sizes that must be at least this: a zero or negative one would fail deep inside a step.
AT_LEAST = dict(num_generations=2, rollout_batch_size=1, global_batch_size=1, micro_batch_size=1,
                max_response_length=1, max_prompt_length=1, max_steps=1, min_pixels=1, vllm_tp=1,
                max_sample_tries=1, sft_batch_size=1, max_bad_steps=1, hf_batch_size=0,
                val_freq=0, save_freq=0, lora_rank=0, vllm_kv_cache_mb=0,
                val_max_prompts=0, chord_decay_steps=1, chord_warmup_steps=0,
                reward_timeout=1e-3, mismatch_cap=1.0, lr=0.0, kl_coef=0.0, gpu_memory_gib=0.0,
                max_tokens_per_micro_batch=0)
FREEZABLE = ("vision", "merger", "llm")


def check(cfg):
    """Every flag checked before anything loads (a mistake found after a 7B has loaded costs
    minutes), the flag named in the message."""
    for name, allowed in CHOICES.items():
        if hasattr(cfg, name) and getattr(cfg, name) not in allowed:
            raise SystemExit(f"--{name} must be one of {', '.join(allowed)}, "
                             f"not {getattr(cfg, name)!r}")
    for name, low in AT_LEAST.items():
        if getattr(cfg, name) < low:
            raise SystemExit(f"--{name} must be at least {low}, not {getattr(cfg, name)}")
    if cfg.rollout_batch_size % cfg.global_batch_size:
        raise SystemExit(f"--rollout_batch_size={cfg.rollout_batch_size} must be a multiple of "
                         f"--global_batch_size={cfg.global_batch_size}")
    if cfg.max_pixels < cfg.min_pixels:
        raise SystemExit(f"--max_pixels={cfg.max_pixels} is below --min_pixels={cfg.min_pixels}")
    if cfg.temperature <= 0:  # log-probs are taken at the sampling temperature: logits / 0
        raise SystemExit(f"--temperature must be above 0, not {cfg.temperature} "
                         "(greedy validation: --val_temperature=0)")
    for name in ("top_p", "val_top_p", "vllm_gpu_memory_utilization"):
        if not 0 < getattr(cfg, name) <= 1:
            raise SystemExit(f"--{name} must be above 0 and at most 1, not {getattr(cfg, name)}")
    if not 0 <= cfg.lora_dropout < 1:
        raise SystemExit(f"--lora_dropout must lie in [0, 1), not {cfg.lora_dropout}")
    if cfg.val_temperature < 0:
        raise SystemExit(f"--val_temperature must be at least 0, not {cfg.val_temperature}")
    if unknown := set(filter(None, cfg.freeze.split(","))) - set(FREEZABLE):
        raise SystemExit(f"--freeze takes {', '.join(FREEZABLE)}, not {', '.join(unknown)}")
    # The files flags name, read now: found bad after a 7B has loaded, they cost minutes.
    try:
        reward.load_reward(cfg.reward)
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise SystemExit(f"--reward={cfg.reward}: {e}") from e
    try:
        if cfg.format_prompt not in ("", "none"):
            with open(cfg.format_prompt) as f:
                data.check_format_prompt(f.read(), cfg.format_prompt)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--format_prompt: {e}") from e
    return cfg
