"""A train.py checkpoint as a folder that transformers and vLLM load, in one process:

    python export.py out/checkpoints/step_60 --model_path=PATH --out=DIR [--dtype=bfloat16]

PATH is the model the run started from (hub id or folder): it gives the config, the processor and
the tensors that the checkpoint fills. A LoRA run's checkpoint is written with its adapters merged.
"""
import argparse
import json
import os

import torch
import torch.distributed.checkpoint as dcp

import checkpoints
import lora
import model as modeling
import patches


def export_checkpoint(ckpt_dir, model_path, out_dir, *, dtype=torch.float32):
    """A save_pretrained folder (model + processor), as model.save_hf writes, from a
    checkpoints.save_checkpoint folder. DCP reshards when it loads, so a checkpoint written by any
    number of ranks reads here whole; only the model entries are read, not the optimizer state."""
    model = modeling.load_model(model_path, dtype=dtype)
    if os.path.exists(os.path.join(ckpt_dir, "lora.json")):
        with open(os.path.join(ckpt_dir, "lora.json")) as f:
            lora.apply_lora(model, **json.load(f))
    if problem := checkpoints.checkpoint_problem(ckpt_dir):  # before DCP unpickles its metadata
        raise ValueError(problem)
    # In place, into the model's own tensors.
    dcp.load({"model": model.state_dict()}, checkpoint_id=ckpt_dir, no_dist=True)
    model.save_pretrained(out_dir, state_dict=lora.hf_state_dict(model, model.state_dict()))
    patches.load_processor(model_path).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt_dir", help="a checkpoint folder, e.g. out/checkpoints/step_60")
    parser.add_argument("--model_path", required=True, help="the model the run started from")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--dtype", default="float32", help="float32 / bfloat16")
    args = parser.parse_args()
    export_checkpoint(args.ckpt_dir, args.model_path, args.out, dtype=getattr(torch, args.dtype))
