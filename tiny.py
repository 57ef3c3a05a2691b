"""The tiny CPU world: what `python train.py` trains by default, on a laptop, with no download.

A random ~1M-parameter Qwen2.5-VL (a byte-level BPE trained here, the real Qwen2.5-VL processor)
and a task that needs the image: count the 1-4 shapes drawn in a 2x2 grid, in Geometry3K's schema.
A random model never writes \\boxed{}, so RL would see zero reward forever: a short SFT warm start
teaches the answer format on random answers, then a few steps on the true counts, stopped while
accuracy is still at chance, so every point of validation accuracy above it is earned by RL.
Both are built once into a cache folder; `resolve` maps the names "tiny" and "synthetic..." to it.
"""
import io
import json
import os
import random

import datasets
import torch
from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoProcessor, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                          Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                          Qwen3VLVideoProcessor)

import data
import grpo
import model as modeling

# The tiny model's flag defaults, applied (by train.py) only to the tiny model or a folder trained
# from it (e.g. an SFT stage's out_dir/hf), and only to the flags the user did not set: its sizes
# and learning rate are the tiny model's; a real model keeps EasyR1's Geometry3K recipe.
TINY = dict(lr=1e-3, weight_decay=0.0, min_pixels=56 * 56, max_pixels=112 * 112,
            max_prompt_length=512, rollout_batch_size=32, global_batch_size=16,
            micro_batch_size=40, hf_batch_size=160, max_response_length=24, max_steps=120,
            val_freq=20, vllm_kv_cache_mb=64, vllm_enforce_eager=True)
WARM_START_STEPS = 150  # SFT steps on the answer format, with random answers
GROUNDED_STEPS = 30  # then SFT steps on the true answers, stopped while accuracy is at chance

# Qwen's special tokens, in Qwen2.5-VL's order (their ids follow the tiny BPE vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2's pre-tokenizer split: contractions, letters, single digits, punctuation runs, spaces.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# The Qwen2.5-VL chat template (images only): a default system turn, one
# <|vision_start|><|image_pad|><|vision_end|> per image item, text items verbatim.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL-Instruct's template (images only) differs in one thing: no default system turn. The
# Thinking variants also open the assistant turn with "<think>\n" themselves.
QWEN3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "")
QWEN3_THINKING_CHAT_TEMPLATE = QWEN3_CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n",
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n")
QUESTIONS = ["<image>How many shapes are in the figure?", "<image>Count the shapes in the figure.",
             "How many shapes does the figure show? <image>"]


def is_tiny(model_path):
    """"tiny", or a local folder with the tiny model's vocabulary (1,024 tokens; Qwen's 151,665)."""
    config = os.path.join(model_path, "config.json")
    if model_path == "tiny" or not os.path.isfile(config):
        return model_path == "tiny"
    config = json.load(open(config))
    return 0 < config.get("text_config", config).get("vocab_size", 0) <= 1024


def resolve(paths, cache_dir, **kw):
    """`paths` ({"model": "tiny", "train": "synthetic@train", ...}) with "tiny" as the model folder
    and "synthetic<rest>" as the data folder + <rest>, built in cache_dir if absent (prepare, with
    `kw`); the model only when a path is "tiny". Other paths pass as given. Builds on first call:
    run it on one rank, then (after a barrier) on every rank."""
    if "tiny" not in paths.values() and not any(v.startswith("synthetic") for v in paths.values()):
        return dict(paths)
    model_dir, data_dir = prepare(cache_dir, with_model="tiny" in paths.values(), **kw)
    return {k: model_dir if v == "tiny" else
            data_dir + v[len("synthetic"):] if v.startswith("synthetic") else v
            for k, v in paths.items()}


@data.quiet_progress()  # the bars of every file and model it writes: noise at this size
def prepare(cache_dir, *, steps=WARM_START_STEPS, grounded_steps=GROUNDED_STEPS, seed=0,
            with_model=True):
    """Build the synthetic data and (with_model) the warm-started tiny model in cache_dir if
    absent; returns (model_dir, data_dir), model_dir None without the model."""
    data_dir = os.path.join(cache_dir, "data")
    model_dir = os.path.join(cache_dir, f"model-ws{steps}-g{grounded_steps}")  # one per recipe
    if not all(os.path.exists(os.path.join(data_dir, f))
               for f in ("sft.parquet", "sft.jsonl", "pref.jsonl")):
        make_synthetic(data_dir, seed=seed)
    if not with_model:
        return None, data_dir
    if os.path.exists(os.path.join(model_dir, "config.json")):
        return model_dir, data_dir
    rng = random.Random(seed)
    fmt = data.MATH_FORMAT_PROMPT.replace("{{ content | trim }}", "").strip()
    texts = [q.replace("<image>", "") + " " + fmt for q in QUESTIONS]
    texts += [synthetic_response(rng.randint(0, 9)) for _ in range(20)]
    texts += ["You are a helpful assistant.", "system user assistant",
              "Find x. \\frac{1}{2} \\sqrt{3} 60^\\circ"]
    raw_dir = os.path.join(cache_dir, "random")
    build_tiny_model(raw_dir, texts * 20, seed=seed)
    # Written aside and renamed: an interrupted build never leaves a folder that looks complete.
    warm_start(raw_dir, data_dir, model_dir + ".tmp", steps=steps, grounded_steps=grounded_steps,
               seed=seed)
    os.replace(model_dir + ".tmp", model_dir)
    return model_dir, data_dir


def warm_start(model_dir, data_dir, out_dir, *, steps, grounded_steps, seed, batch_size=32):
    """Plain single-process SFT of the tiny random model, in two phases (fresh AdamW each):
    `steps` at lr 3e-3 on the answer format with answers drawn at random (the model learns to
    write `<think>...</think> \\boxed{k}` and to ignore the image), then `grounded_steps` at lr
    1e-3 on the true counts, stopped before accuracy moves off chance (measured: it jumps from
    ~20% to ~90% between 50 and 60 such steps)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = AutoProcessor.from_pretrained(model_dir)
    policy = modeling.load_model(model_dir)
    rows = data.load_rows(os.path.join(data_dir, "train.parquet"))
    eos = processor.tokenizer.eos_token_id
    for phase, n, lr in (("format", steps, 3e-3), ("grounded", grounded_steps, 1e-3)):
        opt = torch.optim.AdamW(policy.parameters(), lr=lr)
        for step in range(n):
            samples = []
            for i in rng.sample(range(len(rows)), batch_size):
                prompt = data.build_prompt(rows[i], i, processor, min_pixels=TINY["min_pixels"],
                                           max_pixels=TINY["max_pixels"])
                answer = prompt["answer"] if phase == "grounded" else rng.randint(1, 4)
                target = processor.tokenizer.encode(synthetic_response(answer)) + [eos]
                samples.append({**data.encode_prompt(prompt, processor), "response_ids": target})
            batch = data.collate(samples, processor.tokenizer.pad_token_id)
            logp = modeling.token_logprobs(policy, batch)
            loss = grpo.aggregate(grpo.sft_loss(logp, batch["response_mask"]),
                                  batch["response_mask"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 100 == 0 or step == n - 1:
                print(f"warm-start ({phase}) step {step}: sft loss {loss.item():.4f}", flush=True)
    policy.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- the model
def build_tiny_model(out_dir, texts, *, seed=0, vocab_size=1024, min_pixels=56 * 56,
                     max_pixels=112 * 112, tie_word_embeddings=False, arch="qwen2_5_vl",
                     thinking=False):
    """Write a random tiny Qwen2.5-VL, or Qwen3-VL with arch="qwen3_vl" (model, tokenizer,
    processor), that transformers and vLLM load. texts: the corpus the byte-level BPE is trained
    on. Shapes follow vLLM's CPU limits: text head_dim 32 (16 fails there), mrope_section summing
    to head_dim / 2. Deterministic for a seed. tie_word_embeddings: lm_head shares embed_tokens'
    weight, as in Qwen2.5-VL-3B and Qwen3-VL-2B/4B (the larger ones are untied). thinking: the
    Qwen3-VL Thinking variants' template (the assistant turn opens with "<think>\n")."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    bpe.add_special_tokens(SPECIAL_TOKENS)
    template = (CHAT_TEMPLATE if arch != "qwen3_vl" else QWEN3_THINKING_CHAT_TEMPLATE if thinking
                else QWEN3_CHAT_TEMPLATE)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", chat_template=template,
                                  model_max_length=32768)
    tok.padding_side = "left"
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    pad, eos = ids["<|endoftext|>"], ids["<|im_end|>"]
    text = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128)
    config = dict(tie_word_embeddings=tie_word_embeddings, image_token_id=ids["<|image_pad|>"],
                  video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
    if arch == "qwen3_vl":  # patch 16, deepstack into both decoder layers, interleaved mRoPE
        image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels,
                                                patch_size=16, image_mean=[0.5] * 3,
                                                image_std=[0.5] * 3)
        processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok,
                                     video_processor=Qwen3VLVideoProcessor(),
                                     chat_template=template)
        text["head_dim"] = 32
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000000.0,
                                   "mrope_section": [6, 5, 5], "mrope_interleaved": True}
        vision.update(depth=3, deepstack_visual_indexes=[0, 1], num_position_embeddings=64)
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **config)
        model_class = Qwen3VLForConditionalGeneration
    else:
        image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
        processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                        video_processor=Qwen2VLVideoProcessor(),
                                        chat_template=template)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": [4, 6, 6]}
        vision.update(fullatt_block_indexes=[1], window_size=112)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=pad,
                                  eos_token_id=eos, pad_token_id=pad, **config)
        model_class = Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = model_class(config).float()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- the data
def draw_shapes(rng, size=56, cells=2):
    """A white image cut into cells x cells squares; a random subset holds a coloured shape each."""
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
    """The expert answer to a synthetic row (CHORD's SFT data, the warm start, offline SFT/MPO)."""
    return f"<think>I count the shapes in the figure.</think> \\boxed{{{answer}}}"


@data.quiet_progress()
def make_synthetic(out_dir, *, n_train=2000, n_test=200, seed=0):
    """Write train.parquet / test.parquet (Geometry3K's schema: problem, answer, images) and
    sft.parquet (the train rows plus an expert `response`, for CHORD); the train rows again as
    ms-swift jsonl with the images in images/ (relative paths): sft.jsonl (query/response) and
    pref.jsonl (messages ending in the right count, rejected_response a wrong one), for offline
    SFT and MPO. Returns out_dir."""
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    features = datasets.Features({"problem": datasets.Value("string"),
                                  "answer": datasets.Value("string"),
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
        # No "train" in the name: load_dataset(out_dir) would take images/train_*.png for a split.
        path, wrong = f"images/{i}.png", rng.choice([a for a in "1234" if a != answer])
        with open(os.path.join(out_dir, path), "wb") as f:
            f.write(images[0]["bytes"])
        right, rejected = synthetic_response(answer), synthetic_response(wrong)
        turns = [{"role": "user", "content": query}, {"role": "assistant", "content": right}]
        jsonl["sft.jsonl"].append({"query": query, "response": right, "images": [path]})
        jsonl["pref.jsonl"].append({"messages": turns, "rejected_response": rejected,
                                    "images": [path]})
    for name, lines in jsonl.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    sft = tables["train"].add_column("response", [synthetic_response(a) for a in
                                                  tables["train"]["answer"]])
    sft.to_parquet(os.path.join(out_dir, "sft.parquet"))  # last: its presence means complete
    return out_dir
