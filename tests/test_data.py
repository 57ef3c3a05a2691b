"""data.py: schema, errors that name the row, image bounds, batch layout."""
import pytest
import torch
from PIL import Image

import data


def test_synthetic_data_has_geometry3k_schema(tiny_dir):
    rows = data.load_rows(f"{tiny_dir[1]}@train")
    assert set(rows.column_names) == {"problem", "answer", "images"}
    for row in rows:
        assert row["problem"].count("<image>") == len(row["images"]) == 1
        assert row["answer"] in {"1", "2", "3", "4"}
        assert isinstance(row["images"][0], Image.Image)
    assert len(data.load_rows(f"{tiny_dir[1]}@test")) == 8
    assert len(data.load_rows(f"{tiny_dir[1]}/train.parquet")) == 16


def test_synthetic_answer_is_the_number_of_shapes():
    import random

    rng = random.Random(5)
    for _ in range(20):
        img, count = data.draw_shapes(rng)
        pixels = img.load()
        # A cell holds a shape iff any pixel in it is not white.
        filled = sum(any(pixels[x, y] != (255, 255, 255) for x in range(cx, cx + 28) for y in range(cy, cy + 28))
                     for cx in (0, 28) for cy in (0, 28))
        assert filled == count


def test_image_count_mismatch_names_row_and_field(tiny_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir[0])
    row = {"problem": "<image> and <image>?", "answer": "2", "images": [Image.new("RGB", (56, 56))]}
    with pytest.raises(ValueError, match=r"train.parquet: row 7: field 'problem' has 2 <image> .* 'images' has 1"):
        data.build_prompt(row, 7, processor, source="train.parquet")
    with pytest.raises(ValueError, match="row 3: field 'answer'"):
        data.build_prompt({"problem": "x", "answer": "", "images": []}, 3, processor)


def test_prompt_splits_on_image_and_applies_format(tiny_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir[0])
    row = {"problem": "Look: <image> Find x.", "answer": "2", "images": [Image.new("RGB", (56, 56))]}
    p = data.build_prompt(row, 0, processor)
    user = p["text"].split("<|im_start|>user\n")[1]
    assert user.startswith("Look: <|vision_start|><|image_pad|><|vision_end|> Find x. You FIRST think")
    assert user.endswith("MUST BE put in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert p["text"].count("<|image_pad|>") == 1  # vLLM expands it; never pre-expanded here
    plain = data.build_prompt(row, 0, processor, format_prompt=None)
    assert "You FIRST" not in plain["text"]


@pytest.mark.parametrize("size, lo, hi", [((1000, 500), 3136, 100_000), ((10, 20), 3136, 100_000),
                                          ((100, 100), 3136, 100_000)])
def test_resize_keeps_area_in_bounds_and_aspect(size, lo, hi):
    img = data.resize_image(Image.new("RGB", size), lo, hi)
    area = img.width * img.height
    assert lo * 0.97 <= area <= hi
    assert abs(img.width / img.height - size[0] / size[1]) < 0.05
    if lo <= size[0] * size[1] <= hi:
        assert img.size == size


def test_collate_left_pads_prompts_right_pads_responses():
    samples = [{"prompt_ids": torch.tensor([5, 6, 7]), "response_ids": [1], "sampler_logp": [-0.5]},
               {"prompt_ids": torch.tensor([8]), "response_ids": [2, 3, 4], "sampler_logp": [-1.0, -2.0, -3.0]}]
    b = data.collate(samples, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1, 0, 0], [0, 0, 8, 2, 3, 4]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert b["response_ids"].tolist() == [[1, 0, 0], [2, 3, 4]]
    assert b["response_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert b["sampler_logp"].tolist() == [[-0.5, 0, 0], [-1.0, -2.0, -3.0]]
