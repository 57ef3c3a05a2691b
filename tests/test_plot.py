"""plot.py: the PNG a run's metrics.jsonl gives, the panels drawn for the keys present, and an
overlay whose lines hold each run's values. The records are written here in train.py's format:
one json.dumps(record) per line, step records and validation records sharing "step"."""
import json
import math
import os
import subprocess
import sys

import numpy as np
from PIL import Image

import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO_PANELS = ["reward", "val accuracy", "KL to the reference", "response entropy",
               "response length (tokens)", "clip fraction", "grad norm (before clipping)",
               "step time (s)"]
TIMES = ["time/step", "time/rollout", "time/reward", "time/logprobs", "time/update", "time/sync"]


def grpo_records(shift):
    """Three GRPO steps with validation at 0 and 3, values offset by `shift` to tell runs apart."""
    records = [{"step": 0, "val/accuracy": 0.25 + shift, "val/n": 8, "time/val": 2.0}]
    for step in (1, 2, 3):
        v = step / 10 + shift
        records.append({"step": step, "reward/overall": v, "reward/accuracy": v / 2,
                        "reward/format": 1 - v, "kl": v / 100, "response/entropy": 1 + v,
                        "response/length": 20 * v, "clip_frac": v / 10, "grad_norm": 3 * v,
                        "loss/policy": -v, "memory/peak_gb": 1.0,
                        **{key: k + v for k, key in enumerate(TIMES)}})
    records.append({"step": 3, "val/accuracy": 0.5 + shift, "val/n": 8, "time/val": 2.0})
    records.append({"step": 3, "val_blank/accuracy": 0.125, "val_blank/n": 8, "time/val": 2.0})
    return records


def write(path, records, tail=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_curves_png_of_a_grpo_run_being_written(tmp_path):
    records = grpo_records(0.0)
    records[2]["grad_norm"] = math.inf  # a skipped update
    # a record still being written when the curves are redrawn mid-run
    metrics = write(str(tmp_path / "out" / "metrics.jsonl"), records, tail='{"step": 4, "kl"')
    png = str(tmp_path / "out" / "curves.png")
    assert plot.draw_curves(metrics, png) == GRPO_PANELS
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert 800 <= im.width <= 3000 and 600 <= im.height <= 3000
    assert sorted(os.listdir(tmp_path / "out")) == ["curves.png", "metrics.jsonl"]  # no .tmp left
    fig, _ = plot.figure([plot.load(metrics)], [metrics])
    grad = fig.axes[GRPO_PANELS.index("grad norm (before clipping)")].lines[0]
    assert list(grad.get_xdata()) == [1, 2, 3]
    assert np.isnan(grad.get_ydata()[1])
    assert list(grad.get_ydata()[::2]) == [records[1]["grad_norm"], records[3]["grad_norm"]]


def test_panels_are_those_whose_keys_are_present(tmp_path):
    # an SFT run logs loss/sft and an MPO run mpo/*, not the GRPO rollout keys
    sft = [{"step": 0, "val/accuracy": 0.0}, {"step": 1, "loss/sft": 0.7, "grad_norm": 1.2,
                                              "time/update": 1.6, "memory/peak_gb": 1.0}]
    mpo = [{"step": 1, "grad_norm": 1.2, "mpo/delta": 0.0, "mpo/loss_dpo": 0.69,
            "mpo/loss_bco": 1.39, "mpo/reward_margin": 0.0, "time/update": 1.6}]
    # (records, panels, lines per panel): a panel draws only the keys that were logged
    cases = [(sft, ["val accuracy", "grad norm (before clipping)", "step time (s)", "SFT loss"],
              [1, 1, 1, 1]),
             (mpo, ["grad norm (before clipping)", "step time (s)", "MPO losses",
                    "MPO implicit reward"], [1, 1, 2, 1])]
    for i, (records, panels, lines) in enumerate(cases):
        metrics = write(str(tmp_path / f"run{i}" / "metrics.jsonl"), records)
        assert plot.draw_curves(metrics, str(tmp_path / f"run{i}" / "curves.png")) == panels
        fig, _ = plot.figure([records], ["run"])
        assert [len(ax.lines) for ax in fig.axes] == lines
    losses = fig.axes[2].get_legend()  # several keys in a panel: named in its legend
    assert [t.get_text() for t in losses.get_texts()] == ["mpo/loss_dpo", "mpo/loss_bco"]


def test_overlay_draws_each_runs_values_in_every_panel(tmp_path):
    runs = [grpo_records(0.0), grpo_records(0.5)]
    paths = [write(str(tmp_path / name / "metrics.jsonl"), r) for name, r in zip("ab", runs)]
    fig, titles = plot.figure([plot.load(p) for p in paths], ["a", "b"])
    assert titles == GRPO_PANELS
    for ax, (title, keys) in zip(fig.axes, [p for p in plot.PANELS if p[0] in GRPO_PANELS]):
        assert ax.get_title() == title
        assert len(ax.lines) == 2 * len(keys)  # run-major: a's keys, then b's
        for r, records in enumerate(runs):
            for k, key in enumerate(keys):
                line = ax.lines[r * len(keys) + k]
                want = [(rec["step"], rec[key]) for rec in records if key in rec]
                assert list(zip(line.get_xdata(), line.get_ydata())) == want
                assert line.get_color() == f"C{r}"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]
    # the same overlay from the command line
    out = tmp_path / "compare.png"
    cmd = [sys.executable, "plot.py", *[os.path.dirname(p) for p in paths], f"--out={out}",
           "--labels=a,b"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=120)
    with Image.open(out) as im:
        assert im.format == "PNG"
