"""Runtimes: manifest["runtime"] -> a class that runs that artifact kind (see rwkvc.api.load)."""
from __future__ import annotations

from rwkvc.packages import claim

claim(__name__, __file__)   # one import name: rwkvc.runtimes

import importlib

from rwkvc.errors import RwkvcError

# name -> "module:Class", imported on demand so that e.g. TVM is only needed for TVM artifacts
RUNTIMES: dict[str, str] = {
    "onnxruntime": "rwkvc.runtimes.onnxruntime:OrtRuntime",
    "tvm-host": "rwkvc.runtimes.tvm_host:TvmHostRuntime",
    "tvm-native": "rwkvc.runtimes.tvm_native:TvmNativeRuntime",
    "onnxruntime-gpt": "rwkvc.runtimes.gpt:GptRuntime",   # the GPT baseline (targets/gpt_onnx.py)
}


def get_runtime(name: str):
    if name not in RUNTIMES:
        raise RwkvcError(f"artifact needs runtime '{name}', which this rwkvc does not have "
                         f"(it has {', '.join(RUNTIMES)}); upgrade rwkvc")
    mod, cls = RUNTIMES[name].split(":")
    return getattr(importlib.import_module(mod), cls)
