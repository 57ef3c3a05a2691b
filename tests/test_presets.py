"""Each preset in runs/ runs a few steps on the tiny default, with its flags in force, and logs
finite metrics."""
import glob
import json
import math
import os
import shlex
import subprocess
import sys

import pytest

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "runs", "*.sh")))


def preset_flags(path):
    """The --flags on the preset's exec line (the user's "$@" left out)."""
    line = next(line for line in open(path) if line.startswith("exec "))
    return [tok for tok in shlex.split(line) if tok.startswith("--") and tok != "--nproc_per_node"]


def test_presets_cover_the_family():
    assert {os.path.basename(p) for p in PRESETS} == {"grpo.sh", "dapo.sh", "gspo.sh", "drgrpo.sh", "chord.sh"}
    assert train.parse_flags(preset_flags(os.path.join(ROOT, "runs", "gspo.sh"))).clip_eps_high == 4e-4


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_runs_on_tiny_default(path, tmp_path_factory, tiny_world):
    out = tmp_path_factory.mktemp("preset")
    flags = preset_flags(path)
    cfg = train.parse_flags(flags)
    model, data = tiny_world  # chord.sh's synthetic/sft.parquet: in tiny_world's data folder
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *flags, f"--out_dir={out}",
           f"--model_path={model}", f"--train_data={data}/train.parquet",
           f"--val_data={data}/test.parquet", f"--cache_dir={os.path.dirname(data)}",
           "--max_steps=2", "--rollout_batch_size=8", "--global_batch_size=4",
           "--num_generations=4", "--micro_batch_size=8", "--val_max_prompts=8", "--max_response_length=16",
           "--max_sample_tries=2", "--sft_batch_size=4", "--save_hf=false"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(out),
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    steps = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in steps if "reward/overall" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert all(math.isfinite(v) for v in r.values()), r
        assert r["rollout/logp_diff_max"] < 1e-4
        assert ("chord/mu" in r) == bool(cfg.sft_data)  # the SFT term is on exactly for CHORD
        assert r["rollout/rounds"] >= 1 and (r["rollout/rounds"] == 1 or cfg.dynamic_sampling)
    # No KL term where the preset turns it off; where it is on, k3 is never negative.
    assert all(r["loss/kl"] == 0 for r in steps) if cfg.kl_coef == 0 else all(r["loss/kl"] >= 0 for r in steps)
