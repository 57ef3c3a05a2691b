"""Dataset rows -> prompts and images for the sampler; rollouts -> padded tensors for the trainer.

Rows follow Geometry3K's schema: `problem` (text with one `<image>` placeholder per image), `answer`,
`images` (a list, maybe empty, of bytes, paths, PIL or {"bytes", "path"}), the keys renamable as in
EasyR1 (prompt_key, answer_key, image_key); ms-swift's GRPO rows (`messages`, `solution`) load too. Offline
rows add their responses: SFT (ms-swift's query/response, or `messages` ending in the assistant turn) and
preference pairs (ms-swift's `messages` + `rejected_response`, TRL's prompt/chosen/rejected).
The sampler gets the chat text with ONE <|image_pad|> per image plus the PIL images (vLLM expands the
pad itself); the trainer gets the processor's expanded ids with pixel_values and image_grid_thw.
Passing expanded ids to vLLM silently corrupts prompts (TRL #6401), so the two are kept apart.
"""
import collections
import hashlib
import io
import json
import math
import os
import random

import jinja2
import torch
from PIL import Image, ImageDraw

# The seed's examples/format_prompt/math.jinja (EasyR1), verbatim in meaning.
MATH_FORMAT_PROMPT = (
    "{{ content | trim }} You FIRST think about the reasoning process as an internal monologue and then "
    "provide the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in \\boxed{}."
)


def check_format_prompt(text, path):
    """A format prompt file's text, checked: jinja that uses {{ content }} (without it the problem
    and its <image> are dropped, and the forward fails much later). Returns the text."""
    import jinja2.meta

    try:
        names = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(text))
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"format prompt {path}: line {e.lineno}: {e.message}") from e
    if "content" not in names:
        raise ValueError(f"format prompt {path} has no {{{{ content }}}}: where the problem goes")
    return text


# ----------------------------------------------------------------------------- synthetic data
def draw_shapes(rng, size=56, cells=2):
    """A white image cut into cells x cells squares; a random subset holds one coloured shape each."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    cell = size // cells
    count = rng.randint(1, cells * cells)
    for idx in rng.sample(range(cells * cells), count):
        x0, y0 = (idx % cells) * cell, (idx // cells) * cell
        r = rng.randint(cell // 3, cell // 2 - 1)  # half-size of the shape
        cx, cy = x0 + cell // 2, y0 + cell // 2
        color = tuple(rng.randint(0, 160) for _ in range(3))  # dark enough to stand out from white
        kind = rng.choice(["square", "circle", "triangle"])
        if kind == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img, count


def synthetic_response(answer):
    """The expert answer to a synthetic row (CHORD's SFT data, the tiny model's warm start)."""
    return f"<think>I count the shapes in the figure.</think> \\boxed{{{answer}}}"


QUESTIONS = ["<image>How many shapes are in the figure?", "<image>Count the shapes in the figure.",
             "How many shapes does the figure show? <image>"]


def make_synthetic(out_dir, *, n_train=2000, n_test=200, seed=0):
    """Write train.parquet / test.parquet in Geometry3K's schema for a task that needs the image:
    count the shapes drawn in a 2x2 grid (answer 1-4; the text never tells), and sft.parquet: the
    train rows with an expert `response` (for CHORD). The train rows again, as ms-swift jsonl with the
    images in images/ (relative paths): sft.jsonl (query/response) and pref.jsonl (messages ending in
    the right count, rejected_response a wrong one), for offline SFT and MPO. Returns out_dir."""
    import datasets

    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    features = datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "images": datasets.List(datasets.Image())})
    tables, raw = {}, {}
    for split, n in [("train", n_train), ("test", n_test)]:
        rows = {"problem": [], "answer": [], "images": []}
        for _ in range(n):
            img, count = draw_shapes(rng)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            rows["problem"].append(rng.choice(QUESTIONS))
            rows["answer"].append(str(count))
            rows["images"].append([{"bytes": buf.getvalue(), "path": None}])
        raw[split], tables[split] = rows, datasets.Dataset.from_dict(rows, features=features)
        tables[split].to_parquet(os.path.join(out_dir, f"{split}.parquet"))
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    jsonl = {"sft.jsonl": [], "pref.jsonl": []}
    for i, (query, answer, images) in enumerate(zip(*raw["train"].values())):
        # No "train" in the name: load_dataset(out_dir) would infer a split of images from images/train_*.png.
        path, wrong = f"images/{i}.png", rng.choice([a for a in "1234" if a != answer])
        with open(os.path.join(out_dir, path), "wb") as f:
            f.write(images[0]["bytes"])
        jsonl["sft.jsonl"].append({"query": query, "response": synthetic_response(answer), "images": [path]})
        turns = [{"role": "user", "content": query}, {"role": "assistant", "content": synthetic_response(answer)}]
        jsonl["pref.jsonl"].append({"messages": turns, "rejected_response": synthetic_response(wrong), "images": [path]})
    for name, lines in jsonl.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    sft = tables["train"].add_column("response", [synthetic_response(a) for a in tables["train"]["answer"]])
    sft.to_parquet(os.path.join(out_dir, "sft.parquet"))  # written last: its presence means the data is complete
    return out_dir


# ----------------------------------------------------------------------------- loading
def load_rows(spec):
    """`name@split` (hub id or local folder, through datasets.load_dataset) or a local
    .parquet/.json/.jsonl file (optionally `file@split`, the split is ignored). Returns a Dataset."""
    import datasets

    path, _, split = spec.partition("@")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".parquet", ".json", ".jsonl"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        builder = "parquet" if ext == ".parquet" else "json"
        if not _has_rows(path, builder):
            raise ValueError(f"{spec}: the file has no rows")
        try:
            return datasets.load_dataset(builder, data_files=path, split="train")
        except Exception as e:  # arrow/json errors, some wrapped in a DatasetGenerationError that says nothing
            raise ValueError(f"{spec}: cannot be read as {builder}: {e.__cause__ or e}") from e
    if os.path.isfile(path):
        raise ValueError(f"{spec}: unknown data file type {ext!r}; use .parquet, .json or .jsonl")
    return datasets.load_dataset(path, split=split or "train")


def _has_rows(path, builder):
    """False for a file with no rows (empty, blank lines, a parquet of 0 rows), for which datasets
    says "BatchSize must be greater than 0" or nothing at all; True when unsure."""
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows > 0
        with open(path, "rb") as f:
            return bool(f.read(1 << 20).strip(b" \t\r\n[]"))
    except Exception:  # unreadable: load_dataset says why
        return os.path.getsize(path) > 0


def to_rgb(img):
    """Any PIL mode -> RGB as meant to be seen: transparency on white (a plain convert makes it
    black, and black line art vanishes; vLLM's loader and qwen-vl-utils paste RGBA on white), 16-bit
    grayscale scaled to 8 bits (a plain convert clips it, mostly to white)."""
    if img.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit samples, 65535 is white
        img = img.convert("I").point(lambda v: v / 257)
    if img.has_transparency_data:  # RGBA, LA, PA, or P / L / RGB with a transparent colour
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def resize_image(img, min_pixels, max_pixels):
    """Scale an image (keeping its aspect ratio) so its area lies in [min_pixels, max_pixels] and its short
    side is >= 28 px, the processor's unit (14-px patches merged 2x2): older smart_resize rejects less.
    That wins over max_pixels. No resize fixes the other thing it rejects, an aspect ratio over 200,
    and none makes it: the long side is capped at 200 short sides (rounding the short side down
    turned 10000x50 into 5780x28)."""
    img = to_rgb(img)
    w, h = img.size
    scale = max(math.sqrt(min(max(w * h, min_pixels), max_pixels) / (w * h)), 28 / min(w, h))
    if scale != 1.0:
        short = max(28, int(min(w, h) * scale))
        long = max(28, min(int(max(w, h) * scale), 200 * short))
        img = img.resize((long, short) if w >= h else (short, long))
    return img


def to_pil(image, root=None):
    """PIL, bytes, a path (a relative one from `root`, the data file's folder) or datasets' undecoded
    {"bytes", "path"} -> PIL (opened lazily: a corrupt image fails on first use)."""
    if isinstance(image, Image.Image):
        return image
    image = (image.get("bytes") or image.get("path")) if isinstance(image, dict) else image
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image))
    return Image.open(os.path.join(root, image) if root and isinstance(image, str) else image)


class SkipRow(ValueError):
    """A defect of one row, not of the dataset's format: load_prompts skips and counts it by `reason`."""
    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def swift_turns(messages, where, reply=False):
    """ms-swift's `messages` -> (user text, system text or None, assistant text or None): [system,] user, then
    with `reply` one assistant turn (the response, or the chosen one). Multi-turn is refused, not guessed at."""
    ok = isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
    roles, tail = [m.get("role") for m in messages] if ok else None, ["assistant"] * reply
    if roles not in (["user"] + tail, ["system", "user"] + tail):
        raise ValueError(f"{where} 'messages' must be [system,] user{', assistant' * reply} turns with string "
                         f"content, got roles {roles}")
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


# The texts an offline row adds to its prompt, by kind: name -> the fields that may hold it, first found wins.
# "messages" stands for the assistant turn of ms-swift's `messages`: the response (SFT) or the chosen one.
RESPONSES = {"prompt": {}, "sft": {"response": ("response", "messages")},
             "pref": {"chosen": ("chosen", "messages"), "rejected": ("rejected", "rejected_response")}}


def build_prompt(row, index, processor, *, format_prompt=MATH_FORMAT_PROMPT, min_pixels=3136,
                 max_pixels=4194304, source="data", prompt_key="problem", answer_key="answer",
                 image_key="images", root=None, kind="prompt"):
    """One dataset row -> {"text", "images", "answer"}: the chat text with one image pad per image
    (what vLLM takes) and the resized PIL images. A row without `prompt_key` but with `messages` is
    ms-swift's (answer in `solution` unless `answer_key` is there). kind "sft" / "pref" adds RESPONSES'
    texts ("response" / "chosen", "rejected"), takes the prompt from `query` or `prompt` too, and makes
    the answer optional (None). Errors name source, row and field; a row's own defect raises SkipRow
    (see load_prompts), a format error a plain ValueError."""
    where, system, reply, problem = f"{source}: row {index}: field", None, None, row.get(prompt_key)
    if problem is None and kind != "prompt":  # ms-swift's SFT `query`, TRL's preference `prompt`
        prompt_key = next((k for k in ("query", "prompt") if row.get(k) is not None), prompt_key)
        problem = row.get(prompt_key)
    if problem is None and row.get("messages") is not None:
        (problem, system, reply), prompt_key = swift_turns(row["messages"], where, kind != "prompt"), "messages"
        answer_key = answer_key if answer_key in row else "solution"
    tokens = [t.content for t in processor.tokenizer.added_tokens_decoder.values() if t.special]
    problem = text_field(problem, prompt_key, where, "empty problem", tokens)
    if system:
        text_field(system, "messages", where, "empty system turn", tokens)
    answer = row.get(answer_key)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):  # a number column: 3.0 -> "3", NaN -> None
        answer = None if answer != answer else str(int(answer)) if float(answer).is_integer() else str(answer)
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"{where} '{answer_key}' is a {type(answer).__name__}, not a string or a number")
    answer = (answer or "").strip() or None  # offline rows may have none; an RL prompt must
    if answer is None and kind == "prompt":
        raise SkipRow(f"{where} '{answer_key}' is missing or empty", "missing or empty answer")
    texts, fields = {}, {**row, "messages": reply}
    for name, keys in RESPONSES[kind].items():
        key = max(keys, key=lambda k: (fields.get(k) is not None, k in fields))  # the first set, else first present
        texts[name] = text_field(fields.get(key), key, where, f"missing or empty {name}", tokens)
    if kind == "pref" and texts["rejected"] == texts["chosen"]:
        raise SkipRow(f"{where} '{key}' is the chosen response", "rejected same as chosen")
    images = row.get(image_key)
    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    if problem.count("<image>") != len(images):
        raise SkipRow(f"{where} '{prompt_key}' has {problem.count('<image>')} <image> placeholders but field "
                      f"'{image_key}' has {len(images)} images", "<image> count mismatch")
    pil = []
    for k, im in enumerate(images):
        try:
            img = to_pil(im, root)
            if max(img.size) <= 200 * min(img.size):  # the image's own ratio: resize_image keeps it
                pil.append(resize_image(img, min_pixels, max_pixels))
        except Exception as e:  # PIL raises many kinds for bad bytes: OSError, SyntaxError, ValueError, zlib.error
            reason = "missing image file" if isinstance(e, FileNotFoundError) else "unreadable image"
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
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return {"text": text, "images": pil, "answer": answer, **texts}


def plain(value):
    """JSON-like data: what a reward function takes and a process pickles cheaply (no image bytes)."""
    if isinstance(value, (list, tuple, dict)):
        return all(plain(v) for v in (value.values() if isinstance(value, dict) else value))
    return value is None or isinstance(value, (str, int, float, bool))


def load_prompts(spec, processor, *, format_prompt=MATH_FORMAT_PROMPT, min_pixels, max_pixels,
                 max_prompt_length, prompt_key="problem", answer_key="answer", image_key="images", kind="prompt"):
    """load_rows(spec) -> (prompts, summary): build_prompt's dicts plus `row`, the row's other plain
    fields for the reward (e.g. Geometry3K's `choices`), and a line reporting every skip count.

    A defect of the dataset's format raises a ValueError naming the file, row and field: unreadable
    file, a key no row has, a non-string problem, a list or dict answer, ms-swift turns other than
    [system,] user. A defect of one row is skipped and counted: empty problem or answer, <image>
    count mismatch, unreadable or missing image, aspect ratio over 200, duplicate (same text, answer
    and pixels), more than max_prompt_length processor tokens (never truncated: a cut inside the image
    span breaks the forward, EasyR1 #83). Over half the rows skipped is a broken dataset: that raises.
    kind "sft" / "pref" loads offline rows (see build_prompt): a missing or empty response is skipped, as is
    a pair whose rejected text is the chosen one; duplicates must repeat the responses too."""
    import datasets

    if kind not in RESPONSES:
        raise ValueError(f"unknown kind {kind!r}, expected one of: {', '.join(RESPONSES)}")
    rows = load_rows(spec)
    path, columns = spec.partition("@")[0], rows.column_names
    root = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))  # relative image paths start here
    swift = prompt_key not in columns and "messages" in columns
    needed = {prompt_key: ("messages",) + ("query", "prompt") * (kind != "prompt")}  # a field, or one of its stand-ins
    needed |= {answer_key: ("solution",) * swift} if kind == "prompt" else {k[0]: k for k in RESPONSES[kind].values()}
    for key, alternatives in needed.items():
        if key not in columns and not set(alternatives) & set(columns):
            raise ValueError(f"{spec}: no row has field '{key}' (fields: {', '.join(columns)})")
    # Decode images here, not in datasets, so that a corrupt one is a skipped row rather than a crash.
    feature, undecoded = rows.features.get(image_key), datasets.Image(decode=False)
    if isinstance(feature, datasets.Image):
        rows = rows.cast_column(image_key, undecoded)
    elif isinstance(getattr(feature, "feature", None), datasets.Image):  # a list of images, as in Geometry3K
        rows = rows.cast_column(image_key, datasets.List(undecoded))
    used = {prompt_key, answer_key, image_key, *(k for keys in needed.values() for k in keys)}
    prompts, skipped, first, seen, dropped = [], collections.Counter(), {}, {}, set()
    for i in range(len(rows)):
        row = rows[i]
        try:
            p = build_prompt(row, i, processor, format_prompt=format_prompt, min_pixels=min_pixels,
                             max_pixels=max_pixels, source=spec, prompt_key=prompt_key, answer_key=answer_key,
                             image_key=image_key, root=root, kind=kind)
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
        # The reward gets `response` and `ground_truth` from the trainer: a row field must not replace them.
        p["row"] = {k: v for k, v in row.items()
                    if k not in used and k not in ("response", "ground_truth") and plain(v)}
        dropped |= row.keys() - used - p["row"].keys()
        prompts.append(p)
    summary = f"{spec}: {len(prompts)} {'prompts' if kind == 'prompt' else kind + ' examples'} from {len(rows)} rows"
    summary += "".join(f"; skipped {c} {r} (first: {first[r]})" for r, c in skipped.items())
    summary += f"; fields not given to the reward: {', '.join(sorted(dropped))}" if dropped else ""
    if 2 * sum(skipped.values()) > len(rows) or not prompts:
        raise ValueError(f"{summary}. Over half the rows skipped (or no rows): check the data and the flags")
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
    per-token floats sampler_logp/old_logp/ref_logp) -> one batch.

    Layout (EasyR1/verl): prompts LEFT-padded to P, responses RIGHT-padded to T, so every response
    starts at column P and logits[:, P-1:P+T-1] predict it. Returns input_ids/attention_mask (B, P+T),
    response_ids/response_mask (B, T), pixel_values/image_grid_thw concatenated in row order.
    share_prompts: consecutive rows with the same prompt and pixels (a GRPO group) keep one copy:
    input_ids/attention_mask are then (U, P), the U distinct prompts alone, pixel_values theirs, and
    prompt_index (B,) names each row's prompt (model.token_logprobs runs each prompt once).
    """
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
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "response_ids": input_ids[:, P:],
             "response_mask": response_mask}
    first = range(B)  # the rows whose prompt (and pixels) the batch holds
    if share_prompts:
        same = lambda a, b: torch.equal(a["prompt_ids"], b["prompt_ids"]) and (  # noqa: E731
            a.get("pixel_values") is b.get("pixel_values") or "pixel_values" in a and "pixel_values" in b
            and torch.equal(a["pixel_values"], b["pixel_values"]))
        first = [i for i in range(B) if i == 0 or not same(samples[i - 1], samples[i])]
        batch["prompt_index"] = torch.tensor([i in first for i in range(B)]).cumsum(0) - 1
        batch["input_ids"], batch["attention_mask"] = input_ids[first, :P], attention_mask[first, :P]
    with_pixels = [samples[i] for i in first if "pixel_values" in samples[i]]
    if with_pixels:
        batch["pixel_values"] = torch.cat([s["pixel_values"] for s in with_pixels])
        batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in with_pixels])
    for key in ("sampler_logp", "old_logp", "ref_logp"):  # per-token values, right-padded like responses
        if key in samples[0]:
            batch[key] = torch.zeros((B, T))
            for i, s in enumerate(samples):
                v = torch.as_tensor(s[key], dtype=torch.float32)
                batch[key][i, :len(v)] = v
    return batch
