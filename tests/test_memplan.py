"""memplan: its activation formulas against a saved-tensor count on real-size layers, its parameter
counts against the config's own arithmetic, its verdicts on the README's old and new 7B recipes."""
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import memplan
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 7B decoder dimensions (configs/Qwen2.5-VL-7B-Instruct), the layer the plan's activations scale.
DIMS_7B = dict(hidden=3584, inter=18944, heads=28, kv_heads=4, head_dim=128)
# The README's GPU command at 20b045d, and the one proposed instead (issue 14).
OLD_RECIPE = ["--model_path=Qwen/Qwen2.5-VL-7B-Instruct", "--rollout_batch_size=512",
              "--global_batch_size=128", "--micro_batch_size=4", "--max_steps=60"]
NEW_RECIPE = OLD_RECIPE + ["--micro_batch_size=2", "--activation_checkpointing=true",
                           "--vllm_gpu_memory_utilization=0.45", "--save_freq=10"]


def saved_bytes(fn, exclude):
    """Bytes of the distinct storages autograd saves for backward while fn runs, except those of
    `exclude` (parameters, and inputs shared by every layer: rotary cos/sin, the boolean mask)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.fixture(scope="module")
def layer_7b():
    """One Qwen2.5-VL-7B decoder layer in bf16 on the CPU (233 M parameters, zeros: only the
    saved tensors' sizes matter) and its text config."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer

    import model  # noqa: F401 (registers the trainer's "sdpa_grouped" attention)

    cfg = Qwen2_5_VLTextConfig(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                               num_key_value_heads=4, num_hidden_layers=1,
                               rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    with torch.device("meta"):
        layer = Qwen2_5_VLDecoderLayer(cfg, 0)
    layer = layer.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    return layer, cfg


@pytest.mark.parametrize("attention,grouped", [("sdpa", False), ("sdpa_grouped", True)])
def test_layer_bytes_match_a_saved_tensor_count_of_a_7b_decoder_layer(layer_7b, attention, grouped):
    # 16 tokens under a causal mask: "sdpa" is the path grouped_sdpa hands queries of >= 1024
    # tokens (repeat_kv), "sdpa_grouped" the one it runs below that. The formula is exact with
    # torch 2.13 / transformers 5.19; 2% (the issue allows 10%) still catches a missed K/V copy
    # (5%).
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    layer, cfg = layer_7b
    cfg._attn_implementation = attention  # read by the attention module at each forward
    T = 16
    x = torch.randn(1, T, 3584, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(T).expand(3, 1, T)
    cos, sin = Qwen2_5_VLRotaryEmbedding(cfg)(x, pos)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    measured = saved_bytes(lambda: layer(x, attention_mask=mask, position_embeddings=(cos, sin),
                                         position_ids=pos),
                           exclude=(cos, sin, mask, *layer.parameters()))
    predicted = memplan.layer_bytes(1, T, T, grouped=grouped, **DIMS_7B)
    assert predicted == pytest.approx(measured, rel=0.02)
    # Left to itself the formula picks grouped_sdpa's path by the query length.
    assert memplan.layer_bytes(1, T, T, **DIMS_7B) == memplan.layer_bytes(1, T, T, grouped=True,
                                                                          **DIMS_7B)
    assert memplan.layer_bytes(1, 1024, 1024, **DIMS_7B) == memplan.layer_bytes(
        1, 1024, 1024, grouped=False, **DIMS_7B)


def test_layer_bytes_count_a_qwen3_vl_8b_layers_q_and_k_norms():
    """Qwen3-VL's decoder layer adds an RMSNorm on each q and k head (q_norm, k_norm): the formula
    with qk_norm against a saved-tensor count of a real one at the 8B's sizes, on both paths."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (Qwen3VLTextDecoderLayer,
                                                                Qwen3VLTextRotaryEmbedding)

    dims = dict(hidden=4096, inter=12288, heads=32, kv_heads=8, head_dim=128)
    cfg = Qwen3VLTextConfig(hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, num_hidden_layers=1,
                            rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                             "mrope_section": [24, 20, 20],
                                             "mrope_interleaved": True})
    with torch.device("meta"):
        layer = Qwen3VLTextDecoderLayer(cfg, 0)
    layer = layer.to_empty(device="cpu").to(torch.bfloat16)  # values unused: sizes only
    T = 16
    x = torch.randn(1, T, 4096, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(T).expand(3, 1, T)
    cos, sin = Qwen3VLTextRotaryEmbedding(cfg)(x, pos)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    for attention, grouped in [("sdpa", False), ("sdpa_grouped", True)]:
        cfg._attn_implementation = attention
        measured = saved_bytes(lambda: layer(x, attention_mask=mask, position_ids=pos,
                                             position_embeddings=(cos, sin)),
                               exclude=(cos, sin, mask, *layer.parameters()))
        predicted = memplan.layer_bytes(1, T, T, grouped=grouped, qk_norm=True, **dims)
        assert predicted == pytest.approx(measured, rel=0.02)
        # without the norms' 30,880 bytes a token the count is 14% over the formula
        assert memplan.layer_bytes(1, T, T, grouped=grouped, **dims) < 0.9 * measured


@pytest.mark.parametrize("arch,hidden,inter,gated", [("qwen2_5_vl", 1280, 3420, True),
                                                      ("qwen3_vl", 1152, 4304, False)])
def test_vision_block_bytes_match_a_saved_tensor_count_of_a_real_block(arch, hidden, inter, gated):
    """Qwen2.5-VL-7B's vision block (RMSNorms, a gated SiLU MLP) and Qwen3-VL-8B's (LayerNorms, an
    ungated GELU MLP: at its sizes 38% less than the gated formula says), 16 heads each."""
    import importlib

    name = {"qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL"}[arch]
    models = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    configs = importlib.import_module(f"transformers.models.{arch}.configuration_{arch}")
    cfg = getattr(configs, f"{name}VisionConfig")(hidden_size=hidden, intermediate_size=inter,
                                                  num_heads=16)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        block = getattr(models, f"{name}VisionBlock")(cfg)
    block = block.to_empty(device="cpu").to(torch.bfloat16)  # values unused: sizes only
    N = 128  # two attention windows (Qwen2.5-VL) or images (Qwen3-VL) of 64 patches: cu_seqlens
    x = torch.randn(N, hidden, dtype=torch.bfloat16, requires_grad=True)
    angles = torch.randn(N, hidden // 16)  # a head's rotary angles
    cos, sin = angles.cos(), angles.sin()
    windows = torch.tensor([0, 64, 128], dtype=torch.int32)
    measured = saved_bytes(lambda: block(x, cu_seqlens=windows, position_embeddings=(cos, sin)),
                           exclude=(cos, sin, *block.parameters()))
    predicted = memplan.vision_block_bytes(N, hidden=hidden, inter=inter, heads=16, gated=gated)
    assert predicted == pytest.approx(measured, rel=0.02)


def config_arithmetic(c):
    """Qwen2.5-VL's parameter count from config.json's numbers alone (biases on q/k/v and on every
    vision linear, RMSNorm weights, a 2x2-merging MLP merger, lm_head shared when tied)."""
    h, inter, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    V = c["vocab_size"]
    d = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    v = c["vision_config"]
    hv, iv = v["hidden_size"], v["intermediate_size"]
    patch = hv * 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    block = 2 * hv + (hv * 3 * hv + 3 * hv) + (hv * hv + hv) + 2 * (hv * iv + iv) + (iv * hv + hv)
    m = hv * v["spatial_merge_size"] ** 2
    merger = hv + (m * m + m) + (m * h + h)
    return dict(vision=patch + v["depth"] * block, merger=merger, layers=L * layer, embed=V * h,
                lm_head=0 if c["tie_word_embeddings"] else V * h, rest=h, layer=layer, block=block)


@pytest.mark.parametrize("name,billions", [("Qwen2.5-VL-7B-Instruct", 8.29),
                                           ("Qwen2.5-VL-3B-Instruct", 3.75)])
def test_meta_build_counts_equal_the_config_arithmetic(name, billions):
    with open(os.path.join(memplan.CONFIGS, name, "config.json")) as f:
        expected = config_arithmetic(json.load(f))
    n = memplan.count_params(memplan.load_config(f"Qwen/{name}"))
    assert {k: n[k] for k in expected} == expected
    assert round(n["total"] / 1e9, 2) == billions  # the model cards' sizes; the 3B ties lm_head


def test_shipped_qwen3_vl_configs_agree_with_numbers_the_hub_publishes():
    """Each against a number published with the real weights: the 8B's parameter total, summed
    from its safetensors (a public model report), the 4B's as the hub rounds it (4.44 B), and the
    32B's file, byte for byte, by the git blob id the hub lists for it (a download manifest)."""
    assert memplan.count_params(memplan.load_config("Qwen/Qwen3-VL-8B-Instruct"))["total"] == \
        8_767_123_696
    n = memplan.count_params(memplan.load_config("Qwen/Qwen3-VL-4B-Instruct"))
    assert round(n["total"] / 1e9, 2) == 4.44 and n["lm_head"] == 0  # tied, as the 2B and 4B
    with open(os.path.join(memplan.CONFIGS, "Qwen3-VL-32B-Instruct", "config.json"), "rb") as f:
        raw = f.read()
    blob = hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest()
    assert blob == "29e925092dee9f14278c53e7e7d876cea8a997bc"


def test_load_config_prefers_a_local_folder_then_the_shipped_copy(tmp_path):
    assert memplan.load_config("Qwen/Qwen2.5-VL-7B-Instruct").text_config.hidden_size == 3584
    folder = tmp_path / "Qwen2.5-VL-7B-Instruct"  # the shipped copy's name, other numbers
    folder.mkdir()
    with open(os.path.join(memplan.CONFIGS, "Qwen2.5-VL-7B-Instruct", "config.json")) as f:
        config = dict(json.load(f), hidden_size=1024)
    (folder / "config.json").write_text(json.dumps(config))
    assert memplan.load_config(str(folder)).text_config.hidden_size == 1024


def peak(text):
    fits, gib, phase = re.fullmatch(r"fits: (yes|no) - peak ([\d.]+) GiB of 79\.2 GiB in (.+)",
                                    text.splitlines()[-1]).groups()
    return fits, float(gib), phase


def test_old_readme_recipe_does_not_fit_in_its_first_update():
    text, fits = memplan.plan_from_config(train.parse_flags(OLD_RECIPE), 4, 79.2)
    assert not fits
    assert peak(text)[0] == "no" and peak(text)[2] == "update"


def test_new_readme_recipe_fits_with_a_margin():
    text, fits = memplan.plan_from_config(train.parse_flags(NEW_RECIPE), 4, 79.2)
    assert fits and peak(text)[0] == "yes"
    assert peak(text)[1] <= 0.85 * 79.2  # room for what the estimates miss (fragmentation)


def test_a_vllm_share_without_room_for_one_request_does_not_fit():
    # 0.2 x 79.2 GiB holds the 7B's 15.4 GiB of bf16 weights but no KV cache to speak of.
    text, fits = memplan.plan_from_config(train.parse_flags(
        NEW_RECIPE + ["--vllm_gpu_memory_utilization=0.2"]), 4, 79.2)
    assert not fits and "KV cache cannot hold one request" in text


def test_the_readme_gpu_command_fits_and_dry_run_loads_nothing(tmp_path):
    """The README's torchrun command, planned for its 4 ranks, fits; and train.py --dry_run=true
    prints a plan and exits before any weights load (no hub here: the shipped config serves)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    command = readme.split("torchrun --nproc_per_node 4 train.py", 1)[1].split("\n\n", 1)[0]
    flags = command.replace("\\", " ").split()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    plan = subprocess.run([sys.executable, os.path.join(ROOT, "memplan.py"), "--world_size=4", *flags],
                          capture_output=True, text=True, timeout=300, env=env)
    assert plan.returncode == 0 and plan.stdout.strip().splitlines()[-1].startswith("fits: yes"), plan.stdout
    dry = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dry_run=true", *flags,
                          "--train_data=synthetic@train", "--val_data=", f"--cache_dir={tmp_path}",
                          f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300, env=env)
    assert dry.returncode == 0 and "fits: " in dry.stdout and "update" in dry.stdout, dry.stderr[-2000:]
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "run.lock").exists()


def test_a_token_budget_plans_that_many_full_rows_each_with_its_own_prompt():
    """--max_tokens_per_micro_batch=N plans N / (P + T) rows of P + T tokens (one row when N is
    less), each with its own prompt: sorted by length, a group's rows part."""
    config = memplan.load_config("Qwen/Qwen2.5-VL-3B-Instruct")
    common = dict(world_size=4, gpu_gib=79.2, max_prompt_length=1024, max_response_length=1024,
                  num_generations=5, rollout_batch_size=512, global_batch_size=128)

    def rows(**flags):
        return memplan.plan(config, **common, **flags)["rows"]

    budget = rows(micro_batch_size=1, max_tokens_per_micro_batch=4 * 2048, share_prompts=False)
    assert budget == rows(micro_batch_size=4, share_prompts=False)
    assert rows(micro_batch_size=4, max_tokens_per_micro_batch=1000) == rows(micro_batch_size=1)
    shared = rows(micro_batch_size=1, max_tokens_per_micro_batch=4 * 2048)
    windowed = rows(micro_batch_size=4)  # 4 consecutive rows span 2 groups: 2 prompts
    assert dict(shared)["update"]["activ"] > dict(windowed)["update"]["activ"]
