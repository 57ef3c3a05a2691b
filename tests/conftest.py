"""Shared fixtures: a random tiny Qwen2.5-VL and a little synthetic data, built offline once per run."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # vLLM's first-generate compile costs ~19 s and changes nothing here


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """(model_dir, data_dir): random weights (no warm start) and 16 train / 8 test rows."""
    import data
    import tiny

    root = tmp_path_factory.mktemp("tiny")
    data_dir = tiny.make_synthetic(str(root / "data"), n_train=16, n_test=8, seed=0)
    fmt = data.MATH_FORMAT_PROMPT.replace("{{ content | trim }}", "")
    texts = [q + fmt for q in tiny.QUESTIONS] + [tiny.synthetic_response(k) for k in range(10)]
    model_dir = tiny.build_tiny_model(str(root / "model"), texts * 20, seed=0)
    return model_dir, data_dir


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """(model_dir, data_dir): the tiny default as train.py builds it (tiny.prepare: the whole
    synthetic data), with a 3-step warm start instead of 150 so that it builds in seconds."""
    import tiny

    return tiny.prepare(str(tmp_path_factory.mktemp("world")), steps=3)
