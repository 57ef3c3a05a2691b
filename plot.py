"""Training curves from metrics.jsonl, as one PNG: a run's own (train.py redraws out_dir/curves.png
at each validation and at the end), or several runs overlaid, one colour per run.

    python plot.py out                                        # -> out/curves.png
    python plot.py out_a out_b --out=compare.png --labels=seed0,seed1

matplotlib's object API with no pyplot: no global figure state and no display, the PNG is drawn
by the Agg renderer.
"""
import argparse
import json
import math
import os

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

# One panel per entry, in this order; a panel is drawn with those of its keys that some run logs.
# The last three are what an SFT or MPO run logs instead of the GRPO ones (loss/sft also comes
# with GRPO's SFT mixing).
PANELS = [
    ("reward", ["reward/overall", "reward/accuracy", "reward/format"]),
    ("val accuracy", ["val/accuracy", "val_blank/accuracy"]),
    ("KL to the reference", ["kl"]),
    ("response entropy", ["response/entropy"]),
    ("response length (tokens)", ["response/length"]),
    ("clip fraction", ["clip_frac"]),
    ("grad norm (before clipping)", ["grad_norm"]),
    ("step time (s)", ["time/step", "time/rollout", "time/reward", "time/logprobs", "time/update",
                       "time/sync"]),
    ("SFT loss", ["loss/sft"]),
    ("MPO losses", ["mpo/loss_dpo", "mpo/loss_bco", "mpo/loss_sft"]),
    ("MPO implicit reward", ["mpo/reward_margin", "mpo/reward_accuracy"]),
]
# Keys within a panel, when colours tell runs apart: six, for the step-time panel.
STYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]


def load(metrics_path):
    """The records of a metrics.jsonl; a last line still being written is left out."""
    with open(metrics_path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def series(records, key):
    """(steps, values) of `key`; a skipped update logs an infinite grad norm, drawn as a gap."""
    pairs = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in pairs], [v if math.isfinite(v) else math.nan for _, v in pairs]


def figure(runs, labels):
    """A Figure with one Axes per panel that some run has keys for; returns (fig, titles).
    runs: a list of record lists, labels: one name per run."""
    panels = [(title, [k for k in keys if any(k in r for rs in runs for r in rs)])
              for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    cols = min(3, len(panels)) or 1
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5 * cols, 3.2 * rows), layout="constrained")
    overlay = len(runs) > 1  # colours are runs (the figure's legend), line styles keys
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for r, records in enumerate(runs):
            for k, key in enumerate(keys):
                steps, values = series(records, key)
                # validation is sparse: points make its few values readable
                ax.plot(steps, values, color=f"C{r if overlay else k}",
                        linestyle=STYLES[k] if overlay else "-",
                        marker="o" if len(steps) <= 20 else None, markersize=3)
        if len(keys) > 1:  # the first run's lines stand for the keys
            ax.legend(ax.lines[:len(keys)], keys, fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if overlay:
        fig.legend([Line2D([], [], color=f"C{r}") for r in range(len(runs))], labels,
                   loc="outside upper center", ncols=len(runs))
    return fig, [title for title, _ in panels]


def overlay(metrics_paths, png_path, labels):
    """Draw the runs of `metrics_paths` into png_path; returns the panel titles drawn."""
    fig, titles = figure([load(p) for p in metrics_paths], labels)
    # tmp + rename: a viewer that reloads the PNG during a run never reads half a file
    tmp = f"{png_path}.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, png_path)
    return titles


def draw_curves(metrics_path, png_path):
    """One run's curves (train.py's out_dir/curves.png); returns the panel titles drawn."""
    return overlay([metrics_path], png_path, labels=[metrics_path])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("out_dirs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", help="the PNG (default: out_dir/curves.png for one run)")
    parser.add_argument("--labels", help="comma-separated, one per run (default: the paths)")
    args = parser.parse_args()
    labels = args.labels.split(",") if args.labels else [os.path.normpath(d) for d in args.out_dirs]
    if len(labels) != len(args.out_dirs):
        parser.error(f"{len(labels)} labels for {len(args.out_dirs)} runs")
    if args.out is None and len(args.out_dirs) > 1:
        parser.error("--out is needed to overlay several runs")
    png_path = args.out or os.path.join(args.out_dirs[0], "curves.png")
    metrics_paths = [os.path.join(d, "metrics.jsonl") for d in args.out_dirs]
    titles = overlay(metrics_paths, png_path, labels)
    print(f"{png_path}: {', '.join(titles)}")
