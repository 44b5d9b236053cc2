"""GPT checkpoint -> an ONNX Runtime artifact with a key/value cache (runtimes/gpt.py runs it).

    DIR/
      manifest.json   rwkvc's artifact manifest: model {"kind": "gpt", L, C, H, V, block_size, ...},
                      runtime "onnxruntime-gpt", entry points, the cache layout, every file's sha256
      prefill.onnx    tokens (T,), past_key.i / past_value.i (H, P, N)  ->  logits (V,) of the last token,
                      present_key.i / present_value.i (H, P+T, N)        (P may be 0: a fresh prompt)
      step.onnx       the same with T = 1 (no mask: one new token sees every cached one)
      weights.bin     every weight once (page-aligned), both graphs point into it
      tokenizer/      the World vocabulary (the binidx data of training/ is World-tokenized)

The graphs are traced from the reference module (rwkvc.reference.gpt.GPT.forward_cached) by PyTorch's
TorchScript ONNX exporter: it keeps the symbolic P and T, where torch.export (the dynamo exporter)
specialises sizes 0 and 1, which are exactly the fresh prompt (P = 0) and the step (T = 1). The past
keys and values are explicit inputs and outputs, so a decode step costs what a transformer's costs:
attention over, and a copy of, the whole cache. The artifact is written in a temporary directory and
renamed into place (rwkvc.artifact's install), like every compile.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from pathlib import Path


from rwkvc import __version__
from rwkvc.artifact import (FORMAT, FORMAT_VERSION, MANIFEST, VOCAB, _install, _snapshot, _umask,
                            check_output_dir, remove_dead_leftovers)
from rwkvc.errors import RwkvcError
from rwkvc.integrity import file_sha256

from .onnx.graph import WeightStore

RUNTIME = "onnxruntime-gpt"
OPSET = 17
INLINE_BYTES = 1024   # initializers smaller than this stay inside the graph


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    """The graphs' input and output names: tokens / logits, then each layer's key and value."""
    past = [f"past_{kv}.{i}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present_{kv}.{i}" for i in range(n_layer) for kv in ("key", "value")]
    return ["tokens", *past], ["logits", *present]


def is_gpt_checkpoint(path) -> bool:
    """Whether `path` is a torch checkpoint holding a GPT state dict (rwkvc.reference.gpt's keys), read from
    the archive's key names without unpickling anything."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    try:
        with zipfile.ZipFile(p) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            return pkl is not None and b"transformer.wpe.weight" in z.read(pkl)
    except (OSError, zipfile.BadZipFile):
        return False


def load_gpt(path):
    """The float32 reference GPT of a checkpoint (torch.load weights_only), or one RwkvcError line."""
    import torch

    from rwkvc.reference.gpt import gpt_from_state_dict, is_gpt_state_dict
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise RwkvcError(f"{path}: cannot be read as a PyTorch checkpoint ({str(e).strip().splitlines()[0][:160]})") from None
    if not isinstance(sd, dict) or not is_gpt_state_dict(sd):
        raise RwkvcError(f"{path}: not a GPT checkpoint (no transformer.wte / transformer.wpe weights); "
                         "train one with `python training/train.py --model gpt`")
    try:
        return gpt_from_state_dict(sd).eval()
    except (KeyError, ValueError, RuntimeError, IndexError) as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RwkvcError(f"{path}: a damaged or incomplete GPT checkpoint ({msg}); use a rwkv-*.pth written "
                         "by `train.py --model gpt`") from None


class _Entry:
    """forward_cached with flat, batch-free inputs and outputs: (tokens (T,), k0, v0, k1, ...) with each
    past (H, P, N) -> (logits (V,), present k0, v0, ...) each (H, P+T, N)."""

    def __new__(cls, model):
        import torch

        class Entry(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, tokens, *past):
                cache = [(past[2 * i].unsqueeze(0), past[2 * i + 1].unsqueeze(0)) for i in range(len(past) // 2)]
                logits, cache = self.m.forward_cached(tokens.unsqueeze(0), cache)
                return (logits[0], *(z[0] for kv in cache for z in kv))

        return Entry(model)


def _trace(model, T: int | None):
    """The prefill (T None: any number of tokens) or step (T = 1) graph, weights inline."""
    import onnx
    import torch
    cfg = model.cfg
    ins, outs = io_names(cfg.n_layer)
    tokens = torch.zeros(T or 3, dtype=torch.int64)
    past = [torch.zeros(cfg.n_head, 2, cfg.head_size) for _ in range(2 * cfg.n_layer)]
    dyn = {n: {1: "P"} for n in ins[1:]} | {n: {1: "S"} for n in outs[1:]}
    if T is None:
        dyn["tokens"] = {0: "T"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")   # the exporter's deprecation notice and tracer warnings (the block_size check)
        torch.onnx.export(_Entry(model), (tokens, *past), buf, input_names=ins, output_names=outs,
                          dynamic_axes=dyn, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def _externalize(m, store: WeightStore) -> None:
    """Move the graph's large initializers into the shared weight file, each distinct tensor once."""
    from onnx import numpy_helper
    for t in m.graph.initializer:
        arr = numpy_helper.to_array(t)
        if arr.nbytes < INLINE_BYTES:
            continue
        key = hashlib.sha256(arr.tobytes() + str((arr.dtype, arr.shape)).encode()).hexdigest()
        ext = store.add(key, arr, dtype=arr.dtype)
        t.ClearField("raw_data")
        for f in ("float_data", "int64_data", "int32_data", "double_data"):
            t.ClearField(f)
        t.data_location = ext.data_location
        del t.external_data[:]
        t.external_data.extend(ext.external_data)


def manifest_model(cfg) -> dict:
    return {"kind": "gpt", **cfg.to_dict(), "head_size": cfg.head_size}


def export_gpt(checkpoint, out, *, force: bool = False, progress=None) -> Path:
    """Export the GPT checkpoint `checkpoint` (a path, or a reference GPT module) to the artifact `out`."""
    import onnx
    out = Path(out)
    model = load_gpt(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint.eval()
    cfg = model.cfg
    check_output_dir(out, force)
    remove_dead_leftovers(out)
    before = _snapshot(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.resolve().parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        store = WeightStore(str(tmp / "weights.bin"))
        try:
            for name, T in (("prefill", None), ("step", 1)):
                if progress:
                    progress(f"tracing {name}.onnx")
                g = _trace(model, T)
                _externalize(g, store)
                onnx.save_model(g, str(tmp / f"{name}.onnx"))
        finally:
            store.close()
        (tmp / "tokenizer").mkdir()
        shutil.copyfile(_vocab_file(), tmp / "tokenizer" / VOCAB)
        H, N = cfg.n_head, cfg.head_size
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "rwkvc_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"path": str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None},
            "target": "cpu", "runtime": RUNTIME, "providers": ["CPUExecutionProvider"], "dtype": "float32",
            "model": manifest_model(cfg), "passes": [],
            "state": {"kind": "kv-cache", "per_layer": {"key": [H, "P", N], "value": [H, "P", N]},
                      "max_tokens": cfg.block_size, "dtype": "float32", "init": None},
            "tokenizer": {"kind": "rwkv-world", "file": f"tokenizer/{VOCAB}"},
            "entry_points": {"prefill": "prefill.onnx", "step": "step.onnx"}, "weights": "weights.bin",
        }
        manifest["files"] = {str(p.relative_to(tmp)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _install(tmp, out, before)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RwkvcError(f"{out}: cannot write the artifact ({e.strerror or e}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _vocab_file() -> Path:
    import rwkvc
    return Path(rwkvc.__file__).parent / "data" / VOCAB
