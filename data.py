"""Dataset rows -> prompts and images for the sampler; rollouts -> padded tensors for the trainer.

Rows follow Geometry3K's schema: `problem` (text with one `<image>` placeholder per image),
`answer` (a string), `images` (a list). The sampler gets the chat text with ONE <|image_pad|> per
image plus the PIL images (vLLM expands the pad itself); the trainer gets the processor's expanded
ids with pixel_values and image_grid_thw. Passing expanded ids to vLLM silently corrupts prompts
(TRL #6401), so the two are kept apart from here on.
"""
import io
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


QUESTIONS = ["<image>How many shapes are in the figure?", "<image>Count the shapes in the figure.",
             "How many shapes does the figure show? <image>"]


def make_synthetic(out_dir, *, n_train=2000, n_test=200, seed=0):
    """Write train.parquet / test.parquet in Geometry3K's schema for a task that needs the image:
    count the shapes drawn in a 2x2 grid (answer 1-4; the text never tells). Returns out_dir."""
    import datasets

    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    features = datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "images": datasets.List(datasets.Image())})
    for split, n in [("train", n_train), ("test", n_test)]:
        rows = {"problem": [], "answer": [], "images": []}
        for _ in range(n):
            img, count = draw_shapes(rng)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            rows["problem"].append(rng.choice(QUESTIONS))
            rows["answer"].append(str(count))
            rows["images"].append([{"bytes": buf.getvalue(), "path": None}])
        datasets.Dataset.from_dict(rows, features=features).to_parquet(os.path.join(out_dir, f"{split}.parquet"))
    return out_dir


# ----------------------------------------------------------------------------- loading
def load_rows(spec):
    """`name@split` (hub id or local folder, through datasets.load_dataset) or a local
    .parquet/.json/.jsonl file (optionally `file@split`, the split is ignored). Returns a Dataset."""
    import datasets

    path, _, split = spec.partition("@")
    split = split or "train"
    ext = os.path.splitext(path)[1].lower()
    if ext in (".parquet", ".json", ".jsonl"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        builder = "parquet" if ext == ".parquet" else "json"
        return datasets.load_dataset(builder, data_files=path, split="train")
    return datasets.load_dataset(path, split=split)


def resize_image(img, min_pixels, max_pixels):
    """Scale an image (keeping its aspect ratio) so its area lies in [min_pixels, max_pixels]."""
    img = img.convert("RGB")
    area = img.width * img.height
    if area > max_pixels or area < min_pixels:
        scale = math.sqrt((max_pixels if area > max_pixels else min_pixels) / area)
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
    return img


def to_pil(image):
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):  # datasets' undecoded Image: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image))
    return Image.open(image)


def build_prompt(row, index, processor, *, format_prompt=MATH_FORMAT_PROMPT, min_pixels=3136,
                 max_pixels=4194304, source="data"):
    """One dataset row -> {"text", "images", "answer"}: the chat text with one image pad per image
    (what vLLM takes) and the resized PIL images. Errors name the source, row and field."""
    problem, images = row.get("problem"), list(row.get("images") or [])
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"{source}: row {index}: field 'problem' is missing or empty")
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"{source}: row {index}: field 'answer' is missing, empty or not a string")
    if problem.count("<image>") != len(images):
        raise ValueError(f"{source}: row {index}: field 'problem' has {problem.count('<image>')} <image> "
                         f"placeholders but field 'images' has {len(images)} images")
    if format_prompt:
        problem = jinja2.Template(format_prompt).render(content=problem)
    content = []
    for i, chunk in enumerate(problem.split("<image>")):
        if i > 0:
            content.append({"type": "image"})
        if chunk.strip():
            content.append({"type": "text", "text": chunk})
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    images = [resize_image(to_pil(im), min_pixels, max_pixels) for im in images]
    return {"text": text, "images": images, "answer": answer.strip()}


def encode_prompt(prompt, processor):
    """The trainer's view of a prompt: processor-expanded ids (1-D) and, with images, pixel_values
    (num_patches, C*T*P*P) and image_grid_thw (num_images, 3)."""
    enc = processor(text=[prompt["text"]], images=prompt["images"] or None, return_tensors="pt")
    out = {"prompt_ids": enc["input_ids"][0]}
    if prompt["images"]:
        out["pixel_values"], out["image_grid_thw"] = enc["pixel_values"], enc["image_grid_thw"]
    return out


# ----------------------------------------------------------------------------- batching
def collate(samples, pad_id):
    """Samples (dicts with prompt_ids, response_ids, optional pixel_values/image_grid_thw and any
    per-token float tensors listed in `token_keys`) -> one batch.

    Layout (EasyR1/verl): prompts LEFT-padded to P, responses RIGHT-padded to T, so every response
    starts at column P and logits[:, P-1:P+T-1] predict it. Returns input_ids/attention_mask (B, P+T),
    response_ids/response_mask (B, T), pixel_values/image_grid_thw concatenated in row order.
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
    if any("pixel_values" in s for s in samples):
        batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples if "pixel_values" in s])
        batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in samples if "image_grid_thw" in s])
    for key in ("sampler_logp", "old_logp", "ref_logp"):  # per-token values, right-padded like responses
        if key in samples[0]:
            batch[key] = torch.zeros((B, T))
            for i, s in enumerate(samples):
                v = torch.as_tensor(s[key], dtype=torch.float32)
                batch[key][i, :len(v)] = v
    return batch
