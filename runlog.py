"""What a run leaves behind, written by rank 0 (the others only gather their validation rows):
metrics.jsonl, one JSON object per step or validation; samples/step_N.jsonl, every validation
generation with its score; curves.png, redrawn at each validation (plot.py); and with
--wandb_project the same in a Weights & Biases run (EasyR1's val_generations_to_log idea)."""
import dataclasses
import json
import os

import torch.distributed as dist
from tqdm import tqdm


def print0(*args):
    if dist.get_rank() == 0:
        tqdm.write(" ".join(str(a) for a in args))  # above the progress bar, not through it


class RunLog:
    """The run's files; every rank makes one, rank 0 writes."""

    def __init__(self, cfg):
        self.master, self.out_dir, self.wandb = dist.get_rank() == 0, cfg.out_dir, None
        if self.master:
            self.metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a")
        if self.master and cfg.wandb_project:
            import wandb  # only when asked for

            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or None,
                                    config=dataclasses.asdict(cfg), dir=cfg.out_dir,
                                    settings=wandb.Settings(silent=True, console="off"))

    def log(self, record):
        if self.master:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            if self.wandb:
                self.wandb.log({k: v for k, v in record.items() if k != "step"},
                               step=record["step"])

    def validation(self, record, rows, show=2):
        """Log a validation: its record, its rows (all ranks' gathered), `show` of them printed
        (half right ones, where there are any)."""
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        self.log(record)
        if not self.master:
            return
        rows = [r for part in gathered for r in part]
        prefix = "val_blank" if "val_blank/n" in record else "val"
        tqdm.write(f"step {record['step']}: {prefix}/accuracy {record[prefix + '/accuracy']:.3f} "
                   f"(temperature {record[prefix + '/temperature']}, n={record[prefix + '/n']})")
        right = [r for r in rows if r.get("accuracy", r["overall"]) == 1]
        wrong = [r for r in rows if r.get("accuracy", r["overall"]) != 1]
        for r in right[:show // 2] + wrong[:show - min(len(right), show // 2)]:
            # the user turn's first words, the response's last ones
            question = r["prompt"].split("user\n")[-1].replace("<|image_pad|>", "")
            question = question.replace("<|vision_start|>", "").replace("<|vision_end|>", "")
            tqdm.write(f"  {question[:50]!r}... -> ...{r['response'][-70:]!r} "
                       f"(truth {r['ground_truth']}, score {r['overall']:.2f})")
        folder = os.path.join(self.out_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        name = f"{'blank_' if prefix == 'val_blank' else ''}step_{record['step']}.jsonl"
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if self.wandb:
            import wandb

            columns = ["step", "prompt", "response", "ground_truth", "overall"]
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            self.wandb.log({f"{prefix}/samples": table}, step=record["step"])
        self.curves()

    def curves(self):
        if self.master:
            import plot  # matplotlib, only when drawing

            plot.draw_curves(os.path.join(self.out_dir, "metrics.jsonl"),
                             os.path.join(self.out_dir, "curves.png"))

    def close(self):
        if self.master:
            self.curves()
            self.metrics.close()
            if self.wandb:
                self.wandb.finish()
