"""Dataset rows -> prompts and images for the sampler; rollouts -> padded tensors for the trainer.

Rows: Geometry3K's `problem` (one `<image>` per image), `answer`, `images` (bytes, paths, PIL or
{"bytes", "path"}), keys renamable as in EasyR1; ms-swift's `messages`/`solution`. Offline rows add
responses: SFT (ms-swift's query/response or `messages` ending in the assistant turn), preference
pairs (ms-swift's `messages` + `rejected_response`, TRL's prompt/chosen/rejected). The sampler gets
the chat text with ONE <|image_pad|> per image plus PIL images (vLLM expands it); the trainer gets
the processor's expanded ids with pixel_values and image_grid_thw. Expanded ids given to vLLM
silently corrupt prompts (TRL #6401), so the two are kept apart.
"""
import collections
import contextlib
import hashlib
import os
import re

import datasets
import jinja2
import jinja2.meta
import pyarrow.parquet as pq
import torch
from transformers.utils import logging as hf_logging

import images

# EasyR1's examples/format_prompt/math.jinja, verbatim in meaning.
MATH_FORMAT_PROMPT = (
    "{{ content | trim }} You FIRST think about the reasoning process as an internal monologue and "
    "then provide the final answer. The reasoning process MUST BE enclosed within <think> </think> "
    "tags. The final answer MUST BE put in \\boxed{}."
)


def check_format_prompt(text, path):
    """A format prompt file's text, checked: jinja that uses {{ content }} (without it the problem
    and its <image> are dropped, and the forward fails much later). Returns the text."""
    try:
        names = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(text))
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"format prompt {path}: line {e.lineno}: {e.message}") from e
    if "content" not in names:
        raise ValueError(f"format prompt {path} has no {{{{ content }}}}: where the problem goes")
    return text


# ----------------------------------------------------------------------------- loading
@contextlib.contextmanager
def quiet_progress():
    """datasets' and transformers' progress bars off inside (as they were, after): for a local
    file or a tiny model they are noise, a bar per split generated, parquet written, model saved."""
    on = not datasets.are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if on[0]:
            datasets.enable_progress_bars()
        if on[1]:
            hf_logging.enable_progress_bar()


def load_rows(spec):
    """`name@split` (hub id or local folder, through datasets.load_dataset) or a local
    .parquet/.json/.jsonl file (optionally `file@split`, the split is ignored). Returns a Dataset.
    Only a download shows progress bars."""
    path, _, split = spec.partition("@")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".parquet", ".json", ".jsonl"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        builder = "parquet" if ext == ".parquet" else "json"
        if not _has_rows(path, builder):
            raise ValueError(f"{spec}: the file has no rows")
        try:
            with quiet_progress():
                return datasets.load_dataset(builder, data_files=path, split="train")
        except Exception as e:  # arrow/json errors, some in a DatasetGenerationError saying nothing
            raise ValueError(f"{spec}: cannot be read as {builder}: {e.__cause__ or e}") from e
    if os.path.isfile(path):
        raise ValueError(f"{spec}: unknown data file type {ext!r}; use .parquet, .json or .jsonl")
    with quiet_progress() if os.path.isdir(path) else contextlib.nullcontext():  # else a hub id
        return datasets.load_dataset(path, split=split or "train")


def _has_rows(path, builder):
    """False for a file with no rows (empty, blank lines, a parquet of 0 rows), for which datasets
    says "BatchSize must be greater than 0" or nothing at all; True when unsure."""
    try:
        if builder == "parquet":
            return pq.ParquetFile(path).metadata.num_rows > 0
        with open(path, "rb") as f:
            return bool(f.read(1 << 20).strip(b" \t\r\n[]"))
    except Exception:  # unreadable: load_dataset says why
        return os.path.getsize(path) > 0


class SkipRow(ValueError):
    """A defect of one row, not of the dataset's format: load_prompts skips and counts it."""
    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def swift_turns(messages, where, reply=False):
    """ms-swift's `messages` -> (user text, system text or None, assistant text or None): [system,]
    user, then with `reply` one assistant turn. Multi-turn is refused, not guessed at."""
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
    roles, tail = [m.get("role") for m in messages] if ok else None, ["assistant"] * reply
    if roles not in (["user"] + tail, ["system", "user"] + tail):
        raise ValueError(f"{where} 'messages' must be [system,] user{', assistant' * reply} turns "
                         f"with string content, got roles {roles}")
    texts = [m["content"] for m in messages] + [None] * (not reply)  # ..., user, assistant or None
    return texts[-2], texts[0] if roles[0] == "system" else None, texts[-1]


def text_field(value, key, where, reason, tokens=()):
    """A field that must hold text: not a string is a format error, missing or blank the row's
    (SkipRow), and so is one of `tokens` typed in it: the tokenizer reads "<|image_pad|>" or
    "<|im_end|>" in text as the token itself, which breaks the image count or the chat turns."""
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where} '{key}' is a {type(value).__name__}, not a string")
    if not value or not value.strip():
        raise SkipRow(f"{where} '{key}' is missing or empty", reason)
    if typed := [t for t in tokens if t in value]:
        raise SkipRow(f"{where} '{key}' has the special token {typed[0]} in its text",
                      "special token in text")
    return value


# The texts an offline row adds to its prompt, by kind: name -> the fields that may hold it, the
# first found wins. "messages" is the assistant turn of ms-swift's `messages` (response or chosen).
RESPONSES = {"prompt": {}, "sft": {"response": ("response", "messages")},
             "pref": {"chosen": ("chosen", "messages"),
                      "rejected": ("rejected", "rejected_response")}}


def build_prompt(row, index, processor, *, format_prompt=MATH_FORMAT_PROMPT, min_pixels=3136,
                 max_pixels=4194304, source="data", prompt_key="problem", answer_key="answer",
                 image_key="images", root=None, kind="prompt"):
    """One dataset row -> {"text", "images", "answer"}: the chat text with one image pad per image
    (what vLLM takes) and the resized PIL images. A row without `prompt_key` but with `messages` is
    ms-swift's (answer in `solution` unless `answer_key` is there). kind "sft" / "pref" adds
    RESPONSES' texts, takes the prompt from `query` or `prompt` too, and makes the answer optional
    (None). A row's own defect raises SkipRow, a format error a ValueError naming row and field."""
    where, system, reply, problem = f"{source}: row {index}: field", None, None, row.get(prompt_key)
    if problem is None and kind != "prompt":  # ms-swift's SFT `query`, TRL's preference `prompt`
        prompt_key = next((k for k in ("query", "prompt") if row.get(k) is not None), prompt_key)
        problem = row.get(prompt_key)
    if problem is None and row.get("messages") is not None:
        problem, system, reply = swift_turns(row["messages"], where, kind != "prompt")
        prompt_key, answer_key = "messages", answer_key if answer_key in row else "solution"
    tokens = [t.content for t in processor.tokenizer.added_tokens_decoder.values() if t.special]
    problem = text_field(problem, prompt_key, where, "empty problem", tokens)
    if system:
        text_field(system, "messages", where, "empty system turn", tokens)
    answer = row.get(answer_key)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):  # 3.0 -> "3", NaN -> None
        answer = (None if answer != answer else str(int(answer)) if float(answer).is_integer()
                  else str(answer))
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"{where} '{answer_key}' is a {type(answer).__name__}, "
                         "not a string or a number")
    answer = (answer or "").strip() or None  # offline rows may have none; an RL prompt must
    if answer is None and kind == "prompt":
        raise SkipRow(f"{where} '{answer_key}' is missing or empty", "missing or empty answer")
    texts, fields = {}, {**row, "messages": reply}
    for name, keys in RESPONSES[kind].items():  # the first key set, else the first present
        key = max(keys, key=lambda k: (fields.get(k) is not None, k in fields))
        texts[name] = text_field(fields.get(key), key, where, f"missing or empty {name}", tokens)
    if kind == "pref" and texts["rejected"] == texts["chosen"]:
        raise SkipRow(f"{where} '{key}' is the chosen response", "rejected same as chosen")
    given = row.get(image_key)
    given = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
    if problem.count("<image>") != len(given):
        raise SkipRow(f"{where} '{prompt_key}' has {problem.count('<image>')} <image> placeholders "
                      f"but field '{image_key}' has {len(given)} images", "<image> count mismatch")
    pil = []
    for k, im in enumerate(given):
        try:
            img = images.to_pil(im, root)
            if max(img.size) <= 200 * min(img.size):  # the image's own ratio: resize_image keeps it
                pil.append(images.resize_image(img, min_pixels, max_pixels))
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
            missing = isinstance(e, FileNotFoundError)
            reason = "missing image file" if missing else "unreadable image"
            raise SkipRow(f"{where} '{image_key}': image {k}: {e}", reason) from e
        if len(pil) == k:
            raise SkipRow(f"{where} '{image_key}': image {k} is {img.width}x{img.height}, aspect "
                          "ratio over 200", "image aspect ratio over 200")
    if format_prompt:
        problem = jinja2.Template(format_prompt).render(content=problem)
    content = []
    for i, chunk in enumerate(problem.split("<image>")):
        content += [{"type": "image"}] if i > 0 else []
        content += [{"type": "text", "text": chunk}] if chunk.strip() else []
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return {"text": text, "images": pil, "answer": answer, **texts}


def assistant_opening(prompt_text):
    """What the chat template wrote of the assistant's turn: "<think>" and its newline where a
    Thinking template (Qwen3-VL-*-Thinking) opens the reasoning itself, else "". The sampled
    response continues it, so the reward reads opening + response (else no response has the
    format) and a given response (SFT, preferences) drops its own copy (strip_opening)."""
    m = re.search(r"<think>\n?\Z", prompt_text)
    return m.group() if m else ""


def strip_opening(prompt_text, response):
    """A full assistant text ("<think>...</think> \\boxed{3}") as the continuation of a prompt
    whose template already opened it: without the opening's "<think>" and the spaces after it."""
    opening = assistant_opening(prompt_text).strip()
    if opening and response.startswith(opening):
        return response[len(opening):].lstrip()
    return response


def is_jsonable(value):
    """JSON-like data: what a reward function takes, cheap to pickle (no image bytes)."""
    if isinstance(value, (list, tuple, dict)):
        return all(is_jsonable(v) for v in (value.values() if isinstance(value, dict) else value))
    return value is None or isinstance(value, (str, int, float, bool))


def load_prompts(spec, processor, *, format_prompt=MATH_FORMAT_PROMPT, min_pixels, max_pixels,
                 max_prompt_length, prompt_key="problem", answer_key="answer", image_key="images",
                 kind="prompt"):
    """load_rows(spec) -> (prompts, summary): build_prompt's dicts plus `row`, the row's other
    JSON-like fields for the reward (e.g. Geometry3K's `choices`), and a line of skip counts.
    A defect of the dataset's format raises a ValueError naming the file, row and field (a key no
    row has, a non-string problem, a list answer, other ms-swift turns). A defect of one row is
    skipped and counted: empty problem, answer or response, <image> count mismatch, a bad image,
    duplicate (same texts and pixels), more than max_prompt_length tokens (never truncated: a cut
    in the image span breaks the forward, EasyR1 #83), rejected == chosen. Over half skipped
    raises."""
    if kind not in RESPONSES:
        raise ValueError(f"unknown kind {kind!r}, expected one of: {', '.join(RESPONSES)}")
    rows = load_rows(spec)
    path, columns = spec.partition("@")[0], rows.column_names
    root = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))  # of images
    swift = prompt_key not in columns and "messages" in columns
    needed = {prompt_key: ("messages",) + ("query", "prompt") * (kind != "prompt")}  # or stand-ins
    needed |= ({answer_key: ("solution",) * swift} if kind == "prompt"
               else {k[0]: k for k in RESPONSES[kind].values()})
    for key, alternatives in needed.items():
        if key not in columns and not set(alternatives) & set(columns):
            raise ValueError(f"{spec}: no row has field '{key}' (fields: {', '.join(columns)})")
    # Decode images here, not in datasets, so that a corrupt one is a skipped row, not a crash.
    feature, undecoded = rows.features.get(image_key), datasets.Image(decode=False)
    if isinstance(feature, datasets.Image):
        rows = rows.cast_column(image_key, undecoded)
    elif isinstance(getattr(feature, "feature", None), datasets.Image):  # a list, as in Geometry3K
        rows = rows.cast_column(image_key, datasets.List(undecoded))
    used = {prompt_key, answer_key, image_key, *(k for keys in needed.values() for k in keys)}
    prompts, skipped, first, seen, dropped = [], collections.Counter(), {}, {}, set()
    for i in range(len(rows)):
        row = rows[i]
        try:
            p = build_prompt(row, i, processor, format_prompt=format_prompt, min_pixels=min_pixels,
                             max_pixels=max_pixels, source=spec, prompt_key=prompt_key,
                             answer_key=answer_key, image_key=image_key, root=root, kind=kind)
            key = (p["text"], p["answer"], *(p[k] for k in RESPONSES[kind]),
                   *((im.size, hashlib.sha1(im.tobytes()).digest()) for im in p["images"]))
            if key in seen:
                raise SkipRow(f"row {i}: same as row {seen[key]}", "duplicate")
            if (n := len(encode_prompt(p, processor)["prompt_ids"])) > max_prompt_length:
                raise SkipRow(f"row {i}: {n} tokens", f"longer than {max_prompt_length} tokens")
        except SkipRow as e:
            skipped[e.reason] += 1
            first.setdefault(e.reason, str(e).removeprefix(f"{spec}: "))
            continue
        seen[key] = i
        # The reward gets `response` and `ground_truth` from the trainer: no row field overrides.
        p["row"] = {k: v for k, v in row.items()
                    if k not in used and k not in ("response", "ground_truth") and is_jsonable(v)}
        dropped |= row.keys() - used - p["row"].keys()
        prompts.append(p)
    what = "prompts" if kind == "prompt" else kind + " examples"
    summary = f"{spec}: {len(prompts)} {what} from {len(rows)} rows"
    summary += "".join(f"; skipped {c} {r} (first: {first[r]})" for r, c in skipped.items())
    summary += f"; fields not given to the reward: {', '.join(sorted(dropped))}" if dropped else ""
    if 2 * sum(skipped.values()) > len(rows) or not prompts:
        raise ValueError(f"{summary}. Over half the rows skipped (or no rows): check the data and "
                         "the flags")
    return prompts, summary


def encode_prompt(prompt, processor):
    """The trainer's view of a prompt: processor-expanded ids (1-D) and, with images, pixel_values
    (num_patches, C*T*P*P) and image_grid_thw (num_images, 3)."""
    enc = processor(text=[prompt["text"]], images=prompt["images"] or None, return_tensors="pt")
    out = {"prompt_ids": enc["input_ids"][0]}
    if prompt["images"]:
        out["pixel_values"], out["image_grid_thw"] = enc["pixel_values"], enc["image_grid_thw"]
    return out


# ----------------------------------------------------------------------------- batching
def collate(samples, pad_id, share_prompts=False):
    """Samples (dicts with prompt_ids, response_ids, optional pixel_values/image_grid_thw and the
    per-token floats sampler_logp/old_logp/ref_logp) -> one batch. Layout (EasyR1/verl): prompts
    LEFT-padded to P, responses RIGHT-padded to T, so every response starts at column P and
    logits[:, P-1:P+T-1] predict it: input_ids/attention_mask (B, P+T), response_ids/response_mask
    (B, T), pixel_values/image_grid_thw in row order. share_prompts: consecutive rows with the same
    prompt and pixels (a GRPO group) keep one copy: input_ids/attention_mask are then (U, P), the U
    distinct prompts, and prompt_index (B,) names each row's (model.token_logprobs runs it once)."""
    P = max(len(s["prompt_ids"]) for s in samples)
    T = max(len(s["response_ids"]) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + T), dtype=torch.long)
    response_mask = torch.zeros((B, T))
    for i, s in enumerate(samples):
        p, r = s["prompt_ids"], torch.as_tensor(s["response_ids"], dtype=torch.long)
        input_ids[i, P - len(p):P], input_ids[i, P:P + len(r)] = p, r
        attention_mask[i, P - len(p):P + len(r)] = 1
        response_mask[i, :len(r)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "response_ids": input_ids[:, P:], "response_mask": response_mask}
    first = range(B)  # the rows whose prompt (and pixels) the batch holds
    if share_prompts:
        same = lambda a, b: torch.equal(a["prompt_ids"], b["prompt_ids"]) and (  # noqa: E731
            a.get("pixel_values") is b.get("pixel_values") or "pixel_values" in a
            and "pixel_values" in b and torch.equal(a["pixel_values"], b["pixel_values"]))
        first = [i for i in range(B) if i == 0 or not same(samples[i - 1], samples[i])]
        batch["prompt_index"] = torch.tensor([i in first for i in range(B)]).cumsum(0) - 1
        batch["input_ids"] = input_ids[first, :P]
        batch["attention_mask"] = attention_mask[first, :P]
    with_pixels = [samples[i] for i in first if "pixel_values" in samples[i]]
    if with_pixels:
        batch["pixel_values"] = torch.cat([s["pixel_values"] for s in with_pixels])
        batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in with_pixels])
    for key in ("sampler_logp", "old_logp", "ref_logp"):  # per-token, right-padded like responses
        if key in samples[0]:
            batch[key] = torch.zeros((B, T))
            for i, s in enumerate(samples):
                v = torch.as_tensor(s[key], dtype=torch.float32)
                batch[key][i, :len(v)] = v
    return batch



def token_budget_batches(lengths, budget):
    """Indices of rows with (prompt, response) `lengths` in micro-batches of at most `budget` tokens
    as collate pads full rows, count x (longest prompt + longest response); shared prompts only
    lower that. Longest responses first, filling one micro-batch after another (the fewest for equal
    prompts); a row over the budget goes alone. Ascending inside: a group's rows stay adjacent."""
    batches, longest = [], (0, 0)
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i][::-1], reverse=True):
        fit = tuple(map(max, longest, lengths[i]))
        if not batches or (len(batches[-1]) + 1) * sum(fit) > budget:
            batches.append([])
            fit = lengths[i]
        batches[-1].append(i)
        longest = fit
    return [sorted(b) for b in batches]
