"""Run train.py as a GPU run would set up its process group, on a CPU machine (under torchrun).

A GPU run asks for train.process_group_backend("cuda"). Here gloo stands in for NCCL with the same
device map: "cuda:gloo" serves CUDA tensors only, exactly NCCL's restriction (a CPU tensor then
raises "No backend type associated with device type cpu"), so any collective the trainer runs on
host tensors fails here unless the group also has a CPU backend. argv: train.py's flags.
"""
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

cuda_backend = train.process_group_backend("cuda")
init = dist.init_process_group


def init_as_on_gpu(backend=None, **kwargs):
    assert backend == "gloo", backend  # what train.py asks for on this CPU machine
    as_on_gpu = cuda_backend if ":" in cuda_backend else f"cuda:{cuda_backend}"
    return init(as_on_gpu.replace("nccl", "gloo"), **kwargs)


dist.init_process_group = init_as_on_gpu
train.main(train.parse_flags(sys.argv[1:]))
