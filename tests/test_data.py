"""data.py: schema, input formats, bad rows (raised or skipped and counted), image bounds, batch layout."""
import io
import json
import pickle

import datasets
import pytest
import torch
from PIL import Image

import data
import images
import tiny


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
        img, count = tiny.draw_shapes(rng)
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
    img = images.resize_image(Image.new("RGB", size), lo, hi)
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


def test_collate_share_prompts_keeps_one_copy_per_run_of_equal_prompts():
    """Consecutive rows with equal ids and pixels share one prompt row; equal ids with other pixels,
    or the same prompt again after another one, do not."""
    px = lambda v: {"pixel_values": torch.full((4, 3), v), "image_grid_thw": torch.tensor([[1, 2, 2]])}  # noqa: E731
    a, b = {"prompt_ids": torch.tensor([5, 6, 7]), **px(1.0)}, {"prompt_ids": torch.tensor([5, 6, 7]), **px(2.0)}
    c = {"prompt_ids": torch.tensor([8])}
    rows = [a, a, b, c, c, a]
    samples = [{**p, "response_ids": list(range(1, 2 + i % 3))} for i, p in enumerate(rows)]
    full, shared = data.collate(samples, pad_id=0), data.collate(samples, pad_id=0, share_prompts=True)
    assert shared["prompt_index"].tolist() == [0, 0, 1, 2, 2, 3]
    assert shared["input_ids"].tolist() == [[5, 6, 7], [5, 6, 7], [0, 0, 8], [5, 6, 7]]
    assert shared["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert shared["pixel_values"][:, 0].tolist() == [1.0] * 4 + [2.0] * 4 + [1.0] * 4  # a, b, a: 3 of 4 images
    assert shared["image_grid_thw"].shape == (3, 3)
    for key in ("response_ids", "response_mask"):
        assert torch.equal(shared[key], full[key])
    assert "prompt_index" not in full and full["pixel_values"].shape[0] == 16


# ----------------------------------------------------------------------------- load_prompts: formats and bad rows
def png(size=(56, 56), color=(200, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def write_parquet(path, rows, features=None):
    """Rows -> a parquet file; images are stored as datasets.Image (as Geometry3K on the hub is)."""
    features = features or datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                              "images": datasets.List(datasets.Image())})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return str(path)


def good(n, tag="q"):
    """n distinct text-only rows that always load."""
    return [{"problem": f"{tag} {i}?", "answer": str(i)} for i in range(n)]


@pytest.fixture(scope="module")
def processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir[0])


def load(spec, processor, **kw):
    kw = {"min_pixels": 56 * 56, "max_pixels": 112 * 112, "max_prompt_length": 512, **kw}
    return data.load_prompts(spec, processor, **kw)


def test_geometry3k_parquet_passes_choices_to_the_reward(tmp_path, processor):
    text = datasets.Value("string")
    features = datasets.Features({"images": datasets.List(datasets.Image()), "problem": text, "answer": text,
                                  "choices": datasets.List(text)})
    rows = [{"images": [{"bytes": png((60, 40), (0, 0, 255)), "path": None}], "problem": "<image>Find x.",
             "answer": "B", "choices": ["1", "2", "3", "4"]},
            {"images": [{"bytes": png(), "path": None}], "problem": "<image>Find y.", "answer": "C",
             "choices": ["5", "6", "7", "8"]}]
    spec = write_parquet(tmp_path / "g3k.parquet", rows, features)
    prompts, summary = load(spec, processor)
    assert summary == f"{spec}: 2 prompts from 2 rows"
    assert [p["answer"] for p in prompts] == ["B", "C"]
    assert [p["row"] for p in prompts] == [{"choices": ["1", "2", "3", "4"]}, {"choices": ["5", "6", "7", "8"]}]
    assert prompts[0]["images"][0].getpixel((0, 0)) == (0, 0, 255)
    assert prompts[0]["images"][0].size == (68, 45)  # 60x40 scaled by sqrt(3136 / 2400), floored
    assert prompts[0]["text"] == data.build_prompt(rows[0] | {"images": [Image.new("RGB", (60, 40))]}, 0,
                                                   processor)["text"]


def test_text_only_jsonl_has_no_images(tmp_path, processor):
    spec = write_jsonl(tmp_path / "math.jsonl", [{"problem": "1+1?", "answer": "2", "level": 1},
                                                 {"problem": "2+2?", "answer": "4", "images": [], "level": 2}])
    prompts, summary = load(spec, processor)
    assert summary == f"{spec}: 2 prompts from 2 rows"
    assert [(p["images"], p["answer"], p["row"]) for p in prompts] == [([], "2", {"level": 1}), ([], "4", {"level": 2})]
    assert "<|image_pad|>" not in prompts[0]["text"]
    assert set(data.encode_prompt(prompts[0], processor)) == {"prompt_ids"}


def test_ms_swift_jsonl_images_relative_to_the_file(tmp_path, processor, monkeypatch):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (56, 56), (0, 255, 0)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (56, 56), (0, 0, 255)).save(tmp_path / "b.png")
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>x?"}],
             "images": ["imgs/a.png"], "solution": "3", "source": "geo"},
            {"messages": [{"role": "user", "content": "<image>y?"}], "images": [str(tmp_path / "b.png")],
             "solution": "4", "source": "geo"}]
    spec = write_jsonl(tmp_path / "swift.jsonl", rows)
    monkeypatch.chdir(tmp_path / "imgs")  # a path relative to the working directory would not find imgs/a.png
    prompts, summary = load(spec, processor)
    assert summary == f"{spec}: 2 prompts from 2 rows"
    assert [p["images"][0].getpixel((0, 0)) for p in prompts] == [(0, 255, 0), (0, 0, 255)]
    assert [p["answer"] for p in prompts] == ["3", "4"]
    assert [p["row"] for p in prompts] == [{"source": "geo"}, {"source": "geo"}]
    assert prompts[0]["text"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert prompts[1]["text"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")


def test_ms_swift_multi_turn_is_an_error(tmp_path, processor):
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    spec = write_jsonl(tmp_path / "swift.jsonl", [{"messages": turns, "solution": "1"}])
    with pytest.raises(ValueError, match=r"swift.jsonl: row 0: field 'messages' must be \[system,\] user turns with "
                                         r"string content, got roles \['user', 'assistant', 'user'\]"):
        load(spec, processor)


def test_key_flags_rename_the_fields(tmp_path, processor):
    (tmp_path / "a.png").write_bytes(png())
    spec = write_jsonl(tmp_path / "k.jsonl", [{"question": "<image>q?", "gt": "7", "pics": ["a.png"], "answer": "x"}])
    prompts, _ = load(spec, processor, prompt_key="question", answer_key="gt", image_key="pics")
    assert (prompts[0]["answer"], len(prompts[0]["images"]), prompts[0]["row"]) == ("7", 1, {"answer": "x"})
    with pytest.raises(ValueError, match=r"k.jsonl: no row has field 'problem' \(fields: question, gt, pics, answer\)"):
        load(spec, processor)


def test_multi_image_row_with_every_image_type(tmp_path, processor):
    colors = [(10, 0, 0), (20, 0, 0), (30, 0, 0), (40, 0, 0), (50, 0, 0)]
    (tmp_path / "c.png").write_bytes(png(color=colors[2]))
    (tmp_path / "e.png").write_bytes(png(color=colors[4]))
    images = [Image.new("RGB", (56, 56), colors[0]), png(color=colors[1]), str(tmp_path / "c.png"),
              {"bytes": png(color=colors[3]), "path": None}, {"bytes": None, "path": "e.png"}]
    row = {"problem": "<image>" * 5 + "Which is darkest?", "answer": "A", "images": images}
    p = data.build_prompt(row, 0, processor, root=str(tmp_path))
    assert [im.getpixel((0, 0)) for im in p["images"]] == colors
    assert p["text"].count("<|image_pad|>") == 5
    assert data.encode_prompt(p, processor)["image_grid_thw"].tolist() == [[1, 4, 4]] * 5


def test_over_long_prompts_are_skipped_not_truncated(tmp_path, processor):
    rows = good(3) + [{"problem": "a much longer question " * 10 + "?", "answer": "1"}]
    spec = write_jsonl(tmp_path / "long.jsonl", rows)
    lengths = [len(data.encode_prompt(data.build_prompt(r, 0, processor), processor)["prompt_ids"]) for r in rows]
    assert max(lengths[:3]) < lengths[3]
    limit = lengths[3] - 1  # between the short rows and the long one
    prompts, summary = load(spec, processor, max_prompt_length=limit)
    assert [p["answer"] for p in prompts] == ["0", "1", "2"]
    assert summary == (f"{spec}: 3 prompts from 4 rows; skipped 1 longer than {limit} tokens "
                       f"(first: row 3: {lengths[3]} tokens)")
    assert [p["text"] for p in prompts] == [data.build_prompt(r, 0, processor)["text"] for r in rows[:3]]  # untouched
    assert len(load(spec, processor, max_prompt_length=lengths[3])[0]) == 4  # exactly the limit is allowed
    with pytest.raises(ValueError, match=rf"0 prompts from 4 rows; skipped 4 longer than 5 tokens \(first: row 0: "
                                         rf"{lengths[0]} tokens\)\. Over half the rows skipped"):
        load(spec, processor, max_prompt_length=5)


def test_corrupt_image_bytes_are_skipped(tmp_path, processor):
    rows = [{"problem": f"<image>{i}", "answer": "1", "images": [{"bytes": png(), "path": None}]} for i in range(3)]
    rows[1]["images"] = [{"bytes": b"not an image", "path": None}]
    rows[2]["images"] = [{"bytes": png()[:60], "path": None}]  # a truncated PNG: the header reads, the pixels do not
    spec = write_parquet(tmp_path / "bad.parquet", rows + good(3))
    prompts, summary = load(spec, processor)
    assert len(prompts) == 4
    assert summary.startswith(f"{spec}: 4 prompts from 6 rows; skipped 2 unreadable image (first: row 1: field "
                              "'images': image 0: cannot identify image file")
    with pytest.raises(data.SkipRow, match=r"row 2: field 'images': image 0: image file is truncated"):
        data.build_prompt(rows[2], 2, processor)


def test_missing_image_file_is_skipped(tmp_path, processor):
    (tmp_path / "here.png").write_bytes(png())
    rows = [{"problem": "<image>a", "answer": "1", "images": ["here.png"]},
            {"problem": "<image>b", "answer": "1", "images": ["gone.png"]}] + good(1)
    spec = write_jsonl(tmp_path / "m.jsonl", rows)
    prompts, summary = load(spec, processor)
    assert [p["answer"] for p in prompts] == ["1", "0"]
    assert summary == (f"{spec}: 2 prompts from 3 rows; skipped 1 missing image file (first: row 1: field 'images': "
                       f"image 0: [Errno 2] No such file or directory: '{tmp_path / 'gone.png'}')")


def test_image_placeholder_count_mismatch_is_skipped(tmp_path, processor):
    (tmp_path / "a.png").write_bytes(png())
    rows = [{"problem": "<image><image>two?", "answer": "1", "images": ["a.png"]},
            {"problem": "none?", "answer": "1", "images": ["a.png"]}] + good(3)
    prompts, summary = load(write_jsonl(tmp_path / "c.jsonl", rows), processor)
    assert len(prompts) == 3
    assert summary.endswith("; skipped 2 <image> count mismatch (first: row 0: field 'problem' has 2 <image> "
                            "placeholders but field 'images' has 1 images)")


def test_missing_or_empty_answer_and_empty_problem_are_skipped(tmp_path, processor):
    rows = [{"problem": "a?", "answer": ""}, {"problem": "b?", "answer": "  "}, {"problem": "c?"},
            {"problem": "", "answer": "1"}, {"answer": "1"}] + good(6)
    spec = write_jsonl(tmp_path / "e.jsonl", rows)
    prompts, summary = load(spec, processor)
    assert len(prompts) == 6
    assert summary == (f"{spec}: 6 prompts from 11 rows; skipped 3 missing or empty answer (first: row 0: field "
                       "'answer' is missing or empty); skipped 2 empty problem (first: row 3: field 'problem' is "
                       "missing or empty)")


def test_numeric_answers_become_strings_lists_are_an_error(tmp_path, processor):
    spec = write_jsonl(tmp_path / "n.jsonl", [{"problem": "a?", "answer": 3}, {"problem": "b?", "answer": 2.5},
                                              {"problem": "c?", "answer": 4.0}])
    assert [p["answer"] for p in load(spec, processor)[0]] == ["3", "2.5", "4"]
    spec = write_jsonl(tmp_path / "l.jsonl", good(2) + [{"problem": "c?", "answer": [1, 2]}])
    with pytest.raises(ValueError, match=r"l.jsonl: row 2: field 'answer' is a list, not a string or a number$"):
        load(spec, processor)
    with pytest.raises(ValueError, match=r"row 0: field 'answer' is a dict"):
        data.build_prompt({"problem": "x", "answer": {"a": 1}}, 0, processor)


def test_non_string_problem_is_an_error(tmp_path, processor):
    spec = write_jsonl(tmp_path / "p.jsonl", good(2) + [{"problem": ["a", "b"], "answer": "1"}])
    with pytest.raises(ValueError, match=r"p.jsonl: row 2: field 'problem' is a list, not a string$"):
        load(spec, processor)


def test_tiny_images_are_scaled_to_what_the_processor_takes(tmp_path, processor):
    # Older smart_resize versions raise for a side < 28 px; all of them for an aspect ratio > 200.
    for size in [(1, 1), (5, 200), (200, 5), (1, 199)]:
        img = images.resize_image(Image.new("RGB", size), 56 * 56, 112 * 112)
        assert min(img.size) >= 28 and max(img.size) / min(img.size) <= 200, (size, img.size)
    rows = [{"problem": "<image>a", "answer": "1", "images": [{"bytes": png((1, 1)), "path": None}]},
            {"problem": "<image>b", "answer": "1", "images": [{"bytes": png((5, 200)), "path": None}]},
            {"problem": "<image>c", "answer": "1", "images": [{"bytes": png((1, 300)), "path": None}]}] + good(1)
    spec = write_parquet(tmp_path / "t.parquet", rows)
    prompts, summary = load(spec, processor)
    assert [p["images"][0].size for p in prompts[:2]] == [(56, 56), (28, 1120)]
    # The processor's own resize keeps the 28-px side and shrinks the long one to its max_pixels (112 * 112).
    grids = [data.encode_prompt(p, processor)["image_grid_thw"].tolist() for p in prompts[:2]]
    assert grids == [[[1, 4, 4]], [[1, 50, 2]]]
    assert summary.endswith("skipped 1 image aspect ratio over 200 (first: row 2: field 'images': image 0 is "
                            "1x300, aspect ratio over 200)")


def test_duplicates_are_skipped(tmp_path, processor):
    red, blue = {"bytes": png(color=(255, 0, 0)), "path": None}, {"bytes": png(color=(0, 0, 255)), "path": None}
    rows = [{"problem": "<image>n?", "answer": "1", "images": [red]},
            {"problem": "<image>n?", "answer": "1", "images": [red]},   # duplicate of row 0
            {"problem": "<image>n?", "answer": "1", "images": [blue]},  # another image
            {"problem": "<image>n?", "answer": "2", "images": [red]},   # another answer
            {"problem": "<image>m?", "answer": "1", "images": [red]}]   # another text
    spec = write_parquet(tmp_path / "d.parquet", rows)
    prompts, summary = load(spec, processor)
    assert len(prompts) == 4
    assert summary == f"{spec}: 4 prompts from 5 rows; skipped 1 duplicate (first: row 1: same as row 0)"


def test_more_than_half_skipped_raises_half_does_not(tmp_path, processor):
    rows = good(2) + [{"problem": "x?", "answer": ""}] * 2
    assert len(load(write_jsonl(tmp_path / "half.jsonl", rows), processor)[0]) == 2
    with pytest.raises(ValueError, match=r"1 prompts from 3 rows; skipped 2 missing or empty answer .*Over half"):
        load(write_jsonl(tmp_path / "most.jsonl", rows[1:]), processor)


def test_row_fields_are_plain_data(tmp_path, processor):
    features = datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "blob": datasets.Value("binary"), "response": datasets.Value("string"),
                                  "meta": {"id": datasets.Value("int64")}})
    rows = [{"problem": f"{i}?", "answer": "1", "blob": png(), "response": "r", "meta": {"id": i}} for i in range(2)]
    spec = write_parquet(tmp_path / "f.parquet", rows, features)
    prompts, summary = load(spec, processor)
    assert [p["row"] for p in prompts] == [{"meta": {"id": 0}}, {"meta": {"id": 1}}]
    assert summary.endswith("; fields not given to the reward: blob, response")
    assert pickle.loads(pickle.dumps(prompts[0]["row"])) == {"meta": {"id": 0}}


def test_unreadable_or_unknown_files_name_the_file(tmp_path, processor):
    (tmp_path / "broken.jsonl").write_text('{"problem": "a", \n')
    with pytest.raises(ValueError, match=r"broken.jsonl: cannot be read as json: "):
        load(str(tmp_path / "broken.jsonl"), processor)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"broken.parquet: cannot be read as parquet: "):
        load(str(tmp_path / "broken.parquet"), processor)
    (tmp_path / "rows.csv").write_text("problem,answer\na,1\n")
    with pytest.raises(ValueError, match=r"rows.csv: unknown data file type '.csv'"):
        load(str(tmp_path / "rows.csv"), processor)


def test_custom_format_prompt_template_wraps_the_problem(tiny_dir, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir[0])
    template = tmp_path / "r1v.jinja"  # what --format_prompt=path reads
    template.write_text("{{ content | trim }} Put the answer in <answer> </answer> tags.")
    row = {"problem": "  <image> Find x.  ", "answer": "2", "images": [Image.new("RGB", (56, 56))]}
    p = data.build_prompt(row, 0, processor, format_prompt=template.read_text())
    assert "<|vision_end|> Find x. Put the answer in <answer> </answer> tags.<|im_end|>" in p["text"]
    assert "You FIRST" not in p["text"]


# ----------------------------------------------------------------------------- offline rows: SFT and preference pairs
def pixels(p):
    return [im.tobytes() for im in p["images"]]


def test_synthetic_sft_and_preference_jsonl_round_trip(tiny_dir, processor, monkeypatch):
    monkeypatch.chdir("/")  # the image paths are relative to the files' folder, not the working directory
    train, _ = load(f"{tiny_dir[1]}/train.parquet", processor)
    sft, summary = load(f"{tiny_dir[1]}/sft.jsonl", processor, kind="sft")
    assert summary == f"{tiny_dir[1]}/sft.jsonl: 16 sft examples from 16 rows"
    chord, _ = load(f"{tiny_dir[1]}/sft.parquet", processor, kind="sft")  # CHORD's problem/answer/response rows
    pref, summary = load(f"{tiny_dir[1]}/pref.jsonl", processor, kind="pref")
    assert summary == f"{tiny_dir[1]}/pref.jsonl: 16 pref examples from 16 rows"
    for t, s, c, p in zip(train, sft, chord, pref, strict=True):
        assert t["text"] == s["text"] == c["text"] == p["text"] and pixels(t) == pixels(s) == pixels(p)
        assert s["response"] == c["response"] == p["chosen"] == tiny.synthetic_response(t["answer"])
        assert p["rejected"] in {tiny.synthetic_response(k) for k in "1234"} - {p["chosen"]}
        assert s["answer"] is None and p["answer"] is None and c["answer"] == t["answer"]
        assert set(p) == {"text", "images", "answer", "chosen", "rejected", "row"}


def test_sft_rows_in_query_and_messages_form(tmp_path, processor, monkeypatch):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (56, 56), (0, 255, 0)).save(tmp_path / "imgs" / "a.png")
    rows = [{"query": "<image>How many?", "response": "Three.", "images": ["imgs/a.png"]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}], "solution": "4"}]
    spec = write_jsonl(tmp_path / "sft.jsonl", rows)
    monkeypatch.chdir(tmp_path / "imgs")
    prompts, summary = load(spec, processor, kind="sft")
    assert summary == f"{spec}: 2 sft examples from 2 rows"
    assert [(p["response"], p["answer"]) for p in prompts] == [("Three.", None), ("4", "4")]
    assert prompts[0]["images"][0].getpixel((0, 0)) == (0, 255, 0)
    as_prompt = data.build_prompt({"problem": "<image>How many?", "answer": "x", "images": [Image.new("RGB", (56, 56))]},
                                  0, processor)
    assert prompts[0]["text"] == as_prompt["text"]  # the same chat text as an RL prompt
    assert prompts[1]["text"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?")
    assert "4<|im_end|>" not in prompts[1]["text"]  # the assistant turn is the target, not part of the prompt


def test_preference_rows_in_ms_swift_and_trl_form(tmp_path, processor):
    (tmp_path / "a.png").write_bytes(png(color=(0, 0, 255)))
    swift = {"messages": [{"role": "user", "content": "<image>Count."}, {"role": "assistant", "content": "good"}],
             "rejected_response": "bad", "images": ["a.png"]}
    trl = {"prompt": "What is 1+1?", "chosen": "2", "rejected": "3", "images": []}
    for rows in ([swift], [trl], [swift, trl]):  # one form per file, or both in one file
        prompts, _ = load(write_jsonl(tmp_path / "pref.jsonl", rows), processor, kind="pref")
        assert [(p["chosen"], p["rejected"]) for p in prompts] == [(r.get("chosen", "good"), r.get("rejected", "bad"))
                                                                   for r in rows]
    assert prompts[0]["images"][0].getpixel((0, 0)) == (0, 0, 255) and prompts[1]["images"] == []
    assert prompts[1]["text"] == data.build_prompt({"problem": "What is 1+1?", "answer": "2"}, 0, processor)["text"]


def test_offline_rows_skip_and_count_bad_rows(tmp_path, processor):
    turns = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    rows = [{"messages": turns(f"q{i}?", f"a{i}"), "rejected_response": f"b{i}"} for i in range(4)]
    rows += [{"messages": turns("q4?", ""), "rejected_response": "b"},         # empty chosen turn
             {"messages": turns("q5?", "a5"), "rejected_response": None},      # no rejected response
             {"messages": turns("q6?", "same"), "rejected_response": "same"},  # nothing to prefer
             {"messages": turns("q0?", "a0"), "rejected_response": "b0"},      # duplicate of row 0
             {"messages": turns("q0?", "a0"), "rejected_response": "c0"}]      # another pair, same prompt: kept
    spec = write_jsonl(tmp_path / "p.jsonl", rows)
    prompts, summary = load(spec, processor, kind="pref")
    assert [(p["chosen"], p["rejected"]) for p in prompts] == [("a0", "b0"), ("a1", "b1"), ("a2", "b2"), ("a3", "b3"),
                                                               ("a0", "c0")]
    assert summary == (f"{spec}: 5 pref examples from 9 rows; skipped 1 missing or empty chosen (first: row 4: field "
                       "'messages' is missing or empty); skipped 1 missing or empty rejected (first: row 5: field "
                       "'rejected_response' is missing or empty); skipped 1 rejected same as chosen (first: row 6: field "
                       "'rejected_response' is the chosen response); skipped 1 duplicate (first: row 7: same as row 0)")
    with pytest.raises(ValueError, match=r"1 pref examples from 4 rows; .*Over half the rows skipped"):
        load(write_jsonl(tmp_path / "q.jsonl", rows[3:7]), processor, kind="pref")
    sft = [{"query": f"q{i}?", "response": f"r{i}" if i else "  "} for i in range(3)]
    prompts, summary = load(write_jsonl(tmp_path / "s.jsonl", sft), processor, kind="sft")
    assert summary.endswith("; skipped 1 missing or empty response (first: row 0: field 'response' is missing or empty)")


def test_offline_format_errors_name_file_row_and_field(tmp_path, processor):
    spec = write_jsonl(tmp_path / "s.jsonl", [{"query": "q?", "images": []}])
    with pytest.raises(ValueError, match=r"s.jsonl: no row has field 'response' \(fields: query, images\)"):
        load(spec, processor, kind="sft")
    spec = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q?"}]}])
    with pytest.raises(ValueError, match=r"m.jsonl: row 0: field 'messages' must be \[system,\] user, assistant turns "
                                         r"with string content, got roles \['user'\]"):
        load(spec, processor, kind="sft")
    with pytest.raises(ValueError, match=r"p.jsonl: row 3: field 'chosen' is a list, not a string$"):
        data.build_prompt({"prompt": "q?", "chosen": ["a"], "rejected": "b"}, 3, processor, source="p.jsonl", kind="pref")
    with pytest.raises(ValueError, match=r"unknown kind 'dpo', expected one of: prompt, sft, pref"):
        load(spec, processor, kind="dpo")


# ----------------------------------------------------------------------------- issue 16: silent damage, late errors
def encoded(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return {"bytes": buf.getvalue(), "path": None}


def line_art(mode):
    """A 56x56 image, all transparent but for an opaque black diagonal: a diagram as drawn for the web."""
    rgba = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    for i in range(56):
        rgba.putpixel((i, i), (0, 0, 0, 255))
    if mode == "P":  # a palette image whose index 0 is the transparent colour
        p = Image.new("P", (56, 56), 0)
        p.putpalette([0, 0, 0, 0, 0, 0])
        for i in range(56):
            p.putpixel((i, i), 1)
        p.info["transparency"] = 0
        return p
    return rgba.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_images_are_composited_on_white(tmp_path, processor, mode):
    row = {"problem": "<image>What is drawn?", "answer": "1", "images": [encoded(line_art(mode))]}
    prompts, _ = load(write_parquet(tmp_path / "t.parquet", [row] + good(1)), processor)
    img = prompts[0]["images"][0]
    assert img.mode == "RGB" and img.size == (56, 56)  # inside the pixel bounds: not resized
    assert img.getpixel((0, 55)) == (255, 255, 255) and img.getpixel((20, 20)) == (0, 0, 0)
    assert sorted(img.getcolors()) == [(56, (0, 0, 0)), (56 * 56 - 56, (255, 255, 255))]


def test_16_bit_grayscale_is_scaled_to_8_bits(tmp_path, processor):
    import numpy as np

    ramp = (np.arange(56 * 56, dtype=np.uint32).reshape(56, 56) * 20).astype(np.uint16)  # 0 .. 62700
    source = Image.fromarray(ramp)
    assert source.mode == "I;16"
    row = {"problem": "<image>What is drawn?", "answer": "1", "images": [encoded(source)]}
    prompts, _ = load(write_parquet(tmp_path / "t.parquet", [row] + good(1)), processor)
    got = np.asarray(prompts[0]["images"][0])  # (56, 56, 3)
    want = (ramp.astype(np.float64) / 257).astype(np.uint8)  # 65535 -> 255, truncating like PIL
    assert np.array_equal(got, np.repeat(want[:, :, None], 3, axis=2))
    assert got.max() == 243 and got.min() == 0  # not clipped to white (it was 255 almost everywhere)


def test_special_tokens_typed_in_text_are_skipped_with_row_and_field(tmp_path, processor):
    rows = [{"problem": "Is <|image_pad|> an image?", "answer": "1"},
            {"problem": "Stop here<|im_end|> then?", "answer": "2"}] + good(3)
    prompts, summary = load(write_jsonl(tmp_path / "t.jsonl", rows), processor)
    assert [p["answer"] for p in prompts] == ["0", "1", "2"]
    assert "skipped 2 special token in text (first: row 0: field 'problem' has the special token " \
           "<|image_pad|> in its text)" in summary
    sft = [{"query": "a?", "response": "<think>x</think> <|vision_start|>"}] + [
        {"query": f"q{i}?", "response": f"r{i}"} for i in range(2)]
    _, summary = load(write_jsonl(tmp_path / "sft.jsonl", sft), processor, kind="sft")
    assert "skipped 1 special token in text (first: row 0: field 'response' has the special token " \
           "<|vision_start|> in its text)" in summary


def test_format_prompt_without_content_or_with_a_syntax_error_names_the_file():
    good_text = "{{ content | trim }} Answer in \\boxed{}."
    assert data.check_format_prompt(good_text, "r1v.jinja") == good_text
    with pytest.raises(ValueError, match=r"format prompt mine.jinja has no \{\{ content \}\}"):
        data.check_format_prompt("Solve the problem.", "mine.jinja")
    with pytest.raises(ValueError, match=r"format prompt mine.jinja: line 2: unexpected '}'"):
        data.check_format_prompt("Solve\n{{ content }", "mine.jinja")


def test_empty_jsonl_and_zero_row_parquet_name_the_file(tmp_path, processor):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"problem": pa.array([], pa.string())}), tmp_path / "zero.parquet")
    for name in ("empty.jsonl", "blank.jsonl", "zero.parquet"):
        with pytest.raises(ValueError, match=f"^{tmp_path / name}: the file has no rows$"):
            load(str(tmp_path / name), processor)


def test_aspect_ratio_is_checked_before_the_resize(tmp_path, processor):
    # 10000x50 is exactly 200:1. Scaled by 0.578 to fit max_pixels, int() made it 5780x28 (206:1) and
    # the row was skipped; the resize now cuts the long side to keep 200:1, which the processor takes.
    img = images.resize_image(Image.new("RGB", (10000, 50)), 3136, 167_042)
    assert img.size == (5600, 28)
    row = {"problem": "<image>How long?", "answer": "1", "images": [encoded(Image.new("RGB", (10000, 50)))]}
    prompts, summary = load(write_parquet(tmp_path / "t.parquet", [row] + good(1)), processor,
                            max_pixels=167_042)
    assert "skipped" not in summary and prompts[0]["images"][0].size == (5600, 28)
    # the processor takes it, keeps the 28-px side and shrinks the long one to its own max_pixels
    assert data.encode_prompt(prompts[0], processor)["image_grid_thw"].tolist() == [[1, 2, 112]]
