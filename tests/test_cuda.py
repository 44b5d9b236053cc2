"""`--target cuda`: compiles without a GPU; numerics checked through ONNX Runtime's CPU provider here,
and on the GPU itself wherever CUDAExecutionProvider exists (skipped in CI, which has no GPU)."""
import json

import numpy as np
import onnxruntime as ort
import pytest

import rwkvc
from rwkvc.errors import RwkvcError
from rwkvc.testing import save_random_v7

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda")
    ckpt = save_random_v7(d / "m.pth", n_layer=2, n_embd=128, head_size=64, vocab_size=1000, seed=4)
    return rwkvc.compile(ckpt, d / "cuda", target="cuda"), rwkvc.compile(ckpt, d / "cpu", target="cpu")


def test_compiles_without_gpu(arts):
    cuda, _ = arts
    man = json.loads((cuda / "manifest.json").read_text())
    assert man["target"] == "cuda" and man["providers"][0] == "CUDAExecutionProvider"
    assert man["dtype"] in ("float16", "float32")
    assert man["lowering"]["fused"] is False and "custom_ops" not in man   # plain ONNX operators only
    import onnx
    onnx.checker.check_model(str(cuda / "step.onnx"), full_check=True)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has the CUDA provider")
def test_clear_error_without_cuda_provider(arts):
    with pytest.raises(RwkvcError, match="CUDAExecutionProvider"):
        rwkvc.load(arts[0])


def test_same_logits_as_cpu_artifact_on_cpu_provider(arts):
    cuda, cpu = arts
    toks = list(range(3, 67))
    a = rwkvc.load(cuda, providers=["CPUExecutionProvider"]).forward(toks)[0]
    b = rwkvc.load(cpu).forward(toks)[0]
    tol = 1e-4 if json.loads((cuda / "manifest.json").read_text())["dtype"] == "float32" else 1e-2
    assert float(np.abs(a - b).max()) <= tol * max(1.0, float(np.abs(b).max()))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU with onnxruntime-gpu")
def test_gpu_logits_match_cpu_artifact(arts):
    cuda, cpu = arts
    toks = list(range(3, 67))
    m = rwkvc.load(cuda)
    b = rwkvc.load(cpu).forward(toks)[0]
    state, a = None, None
    for t in toks:
        a, state = m.forward([t], state)
    tol = 1e-4 if m.manifest["dtype"] == "float32" else 1e-2
    assert float(np.abs(a - b).max()) <= tol * max(1.0, float(np.abs(b).max()))
