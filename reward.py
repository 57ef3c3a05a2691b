"""Rewards: strings in, scores out. No torch.

A reward function scores a batch, one dict per sample:

    fn(inputs: list[dict]) -> list[dict]
    in:  {"response": str, "ground_truth": str, ...the dataset row's other fields}
    out: {"overall": float, ...}  overall is the reward GRPO optimises; every other numeric key is
                                  a metric only, logged as reward/<key> (format, accuracy, ...)

load_reward(spec) returns one: "math" (default), "r1v", "choice", "random", or your own as
"path/to/file.py:function". The built-ins follow EasyR1's examples/reward_function/{math,r1v}.py:
spaces around < > / are dropped first, overall = (1 - w) * accuracy + w * format.

Grading is math-verify's with its timeouts off: they use signal.alarm, which raises outside the
main thread, and scored every sample 0 in verl and TRL (Math-Verify #50, #55). score_batch bounds
time instead, in worker processes it can kill (reward_pool.py): a sample that hangs scores 0.
"""
import functools
import importlib.util
import logging
import math
import os
import pickle
import random
import re

from math_verify import parse, verify

import reward_pool

log = logging.getLogger(__name__)
HALF_WIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)} | {0x3000: " "}  # full-width -> ASCII


# ----------------------------------------------------------------------------- reading and grading
def _normalize(response):
    return re.sub(r"\s*(<|>|/)\s*", r"\1", response)  # "< think >" -> "<think>", as Qwen2.5-VL-32B


def has_boxed_format(text):
    """re.fullmatch(r"<think>.*</think>.*\\\\boxed\\{.*\\}.*", text, re.DOTALL), in linear time.

    That regex backtracks cubically ("</think>\\boxed{" * 6000 took 6 minutes). The earliest
    occurrence of each piece leaves the most room for the next, so this decides the same match."""
    i = text.find("</think>", len("<think>")) if text.startswith("<think>") else -1
    j = text.find("\\boxed{", i + len("</think>")) if i >= 0 else -1
    return j >= 0 and text.find("}", j + len("\\boxed{")) >= 0


def extract_boxed(text):
    """Content of the last \\boxed{...}, braces matched by depth; None if absent or unclosed."""
    start = text.rfind("\\boxed{")
    depth = 0
    for k in range(start + len("\\boxed"), len(text) if start >= 0 else 0):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[start + len("\\boxed{") : k]
    return None


def grade(answer, ground_truth, *, box=True):
    """1.0 if math-verify finds `answer` equal to `ground_truth`, else 0.0 (None answer: 0.0).

    math-verify reads gold from LaTeX, so a bare ground truth ("3", "\\frac{1}{2}", "60^\\circ") is
    boxed first; so is the answer, unless box=False (free text: "The answer is $3$"). Units and
    degrees are dropped ("5 cm" == 5, "60^\\circ" == 60), 0.5 == \\frac{1}{2}, floats are rounded to
    6 digits. Full-width forms (CJK input methods) read as ASCII: \\boxed{４８} is 48; not through
    NFKC, which would also flatten superscripts ("3²" -> "32")."""
    gt = str(ground_truth).translate(HALF_WIDTH).strip()
    if answer is None or not gt:
        return 0.0
    gold = gt if "\\boxed" in gt or "$" in gt else "\\boxed{" + gt + "}"
    gold = parse(gold, parsing_timeout=None)
    answer = answer.translate(HALF_WIDTH).replace("°", "^{\\circ}")  # else "60°" stays a string
    pred = parse("\\boxed{" + answer + "}" if box else answer, parsing_timeout=None)
    return float(verify(gold, pred, timeout_seconds=None))


def as_letter(text):
    """ "A", "(A)", "A.", "A)", "A:", "\\text{A}", "\\textbf{(A)}", "$A$" -> "A"; else None.

    Capitals only: a lone "a" or "x" is more likely a variable than an option."""
    text = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", text)
    text = text.strip().strip("$").strip()
    m = re.fullmatch(r"\(?([A-Z])[).:]?", text)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------- built-in rewards
def _score(acc, fmt, w):
    return {"overall": (1 - w) * acc + w * fmt, "format": fmt, "accuracy": acc}


def math_score(inputs, format_weight=0.1):
    """The reward of EasyR1's Geometry3K recipe: format = `<think>...</think>` then anything then
    `\\boxed{...}`; accuracy grades the last \\boxed{} (unclosed: no answer, 0)."""
    scores = []
    for x in inputs:
        response = _normalize(x["response"])
        fmt = float(has_boxed_format(response))
        acc = grade(extract_boxed(response), x["ground_truth"])
        scores.append(_score(acc, fmt, format_weight))
    return scores


def _answer_block(text):
    start = text.rfind("<answer>")
    end = text.find("</answer>", start)
    return text[start + len("<answer>") : end] if 0 <= start < end else None


def r1v_score(inputs, format_weight=0.5):
    """R1-V: format = fullmatch `<think>.*?</think>\\s*<answer>.*?</answer>` (DOTALL); accuracy
    grades the last <answer> block's free text (none: 0); R1-V's gold "<answer> 3 </answer>" too."""
    scores = []
    for x in inputs:
        response = _normalize(x["response"])
        # no backtracking: the first "</think> <answer>" must end before the final "</answer>"
        m = re.compile(r"</think>\s*<answer>").search(response, len("<think>"))
        fmt = float(response.startswith("<think>") and response.endswith("</answer>")
                    and m is not None and m.end() <= len(response) - len("</answer>"))
        gt = str(x["ground_truth"])
        acc = grade(_answer_block(response), _answer_block(_normalize(gt)) or gt, box=False)
        scores.append(_score(acc, fmt, format_weight))
    return scores


def choice_score(inputs, format_weight=0.1):
    """Multiple choice; Geometry3K rows have `choices` (4 options, letters A-D). Format as "math".

    Gold letter G = as_letter(ground_truth); gold value V = option G if G is a letter (none if the
    row has no option G), else the ground truth. A boxed letter P (see as_letter) is right if
    P == G or option P grades equal to V (gold "6", choices ["3", "6", ...] accepts "B"). Any other
    boxed answer is right if it grades equal to V (gold "B" accepts "6"); with no V, it is wrong."""
    scores = []
    for x in inputs:
        response = _normalize(x["response"])
        options = {chr(ord("A") + k): o for k, o in enumerate(x.get("choices") or [])}
        gold_letter = as_letter(str(x["ground_truth"]))
        gold_value = options.get(gold_letter) if gold_letter else x["ground_truth"]
        answer = extract_boxed(response)
        letter = as_letter(answer) if answer is not None else None
        if letter is None:
            acc = grade(answer, gold_value) if gold_value is not None else 0.0
        else:
            acc = float(letter == gold_letter or (letter in options and gold_value is not None
                                                  and grade(options[letter], gold_value) == 1.0))
        fmt = float(has_boxed_format(response))
        scores.append(_score(acc, fmt, format_weight))
    return scores


def random_score(inputs, seed=2):
    """Debug reward: overall = accuracy = a fair coin, format as in "math".

    Each coin is seeded by (seed, response, ground_truth), not by position, so a sample scores the
    same in any batch, chunk or retry (a str seed goes through sha512: stable across processes)."""
    scores = []
    for x in inputs:
        rng = random.Random(f"{seed}\0{x['response']}\0{x['ground_truth']}")
        acc = float(rng.random() < 0.5)
        fmt = float(has_boxed_format(_normalize(x["response"])))
        scores.append({"overall": acc, "format": fmt, "accuracy": acc})
    return scores


BUILTIN = {"math": math_score, "r1v": r1v_score, "choice": choice_score, "random": random_score}


def load_reward(spec="math"):
    """A built-in name or "path/to/file.py:function" -> a batch reward function.

    A file is loaded and checked here, so a bad spec fails at startup; what comes back is a partial
    naming the file, which pickles: each worker process loads the file again."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise ValueError(f"reward {spec!r}: expected one of {sorted(BUILTIN)} "
                         "or 'path/to/file.py:function'")
    _load_file_fn(os.path.abspath(path), name)
    return _FileReward(_call_file, os.path.abspath(path), name)


@functools.lru_cache(maxsize=None)
def _load_file_fn(path, name):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reward file {path} does not exist")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise AttributeError(f"reward file {path} has no function {name!r}")
    fn = getattr(module, name)
    if not callable(fn):
        raise TypeError(f"{path}:{name} is a {type(fn).__name__}, not a function")
    return fn


def _call_file(path, name, inputs):
    return _load_file_fn(path, name)(inputs)


class _FileReward(functools.partial):
    def __setstate__(self, state):  # a worker loads the file as it unpickles, before the clock
        super().__setstate__(state)
        _load_file_fn(*self.args)


def _fn_name(fn):
    if isinstance(fn, functools.partial):
        return f"{fn.args[0]}:{fn.args[1]}" if fn.func is _call_file else _fn_name(fn.func)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


# ----------------------------------------------------------------------------- scoring a batch
def score_batch(reward_fn, inputs, *, timeout_s=10.0, num_workers=None):
    """Score `inputs` with `reward_fn` in worker processes (reward_pool.run) -> (scores, stats).

    A sample whose reward raises, dies or runs past timeout_s (alone) scores 0 in every key, is
    logged once per distinct error, and counts in stats["reward/failed"] (raised or died) or
    stats["reward/timed_out"]. If the samples tried alone first (reward_pool.PROBES) all time out,
    the rest are not tried (reward_pool.run): 0, counted as failed. A NaN or inf "overall" counts
    as failed too: 0 in every key but "overall", which is NaN, so that grpo.group_advantages leaves
    it out of its group. stats holds only these counts, which add up over ranks. Scores of the
    wrong length or without a numeric "overall" are a bug in the reward, not a bad sample:
    ValueError. num_workers: min(8, CPUs)."""
    name = _fn_name(reward_fn)
    try:
        pickle.dumps(reward_fn)
    except Exception as e:
        raise TypeError(f"{name} runs in worker processes, so it must pickle: "
                        "use a module-level function or load_reward()") from e
    n, num_workers = len(inputs), num_workers or min(8, os.cpu_count() or 1)
    scores, errors, timed_out, untried = reward_pool.run(
        reward_fn, inputs, timeout_s=timeout_s, num_workers=num_workers,
        check=functools.partial(_check_scores, name))
    keys = list(dict.fromkeys(k for s in scores if s is not None for k in s)) or ["overall"]
    nonfinite = [i for i, s in enumerate(scores) if s and not math.isfinite(s["overall"])]
    for i in nonfinite:
        scores[i] = {**dict.fromkeys(keys, 0.0), "overall": math.nan}
    scores = [dict.fromkeys(keys, 0.0) if s is None else s for s in scores]
    for text, idx in errors.items():
        log.warning("reward %s raised on %d of %d samples, scored 0: %s", name, len(idx), n, text)
    if nonfinite:
        log.warning("reward %s gave a NaN or inf overall on %d of %d samples: counted as failed, "
                    "left out of the advantages", name, len(nonfinite), n)
    if untried:
        log.warning("reward %s ran over %.1f s on each of the %d samples tried alone first: "
                    "the other %d of %d samples were not tried, counted as failed", name,
                    timeout_s, len(timed_out), len(untried), n)
    elif timed_out:
        log.warning("reward %s ran over %.1f s on %d of %d samples, scored 0", name, timeout_s,
                    len(timed_out), n)
    failed = sum(map(len, errors.values())) + len(nonfinite) + len(untried)
    return scores, {"reward/failed": float(failed), "reward/timed_out": float(len(timed_out))}


def _check_scores(name, n, scores):
    is_list = isinstance(scores, (list, tuple))
    if not is_list or len(scores) != n:
        got = f"{len(scores)} scores" if is_list else f"a {type(scores).__name__}"
        raise ValueError(f"reward function {name} returned {got} for {n} inputs, expected a list "
                         f"of {n} dicts")
    for s in scores:
        if not isinstance(s, dict) or not isinstance(s.get("overall"), (int, float)):
            raise ValueError(f"reward function {name} returned {s!r:.200} without a numeric "
                             "'overall'")
