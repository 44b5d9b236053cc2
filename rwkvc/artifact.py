"""Artifacts: a directory with a manifest, the target's files and the tokenizer.

    DIR/
      manifest.json     format + version, model hyper-parameters, target, runtime, passes applied,
                        entry points, state layout, sha256 and size of every other file
      step.onnx, prefill.onnx, weights.bin     (cpu / cuda targets)
      tokenizer/rwkv_vocab_v20230424.txt

`compile_to_dir` builds everything in a temporary sibling directory and renames it into place at the
end, so a failed compile never leaves a half-written artifact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import __version__, ir
from .errors import RwkvcError

FORMAT = "rwkvc-artifact"
FORMAT_VERSION = 2  # 2: one wkv state input/output per layer in the ONNX graphs
MANIFEST = "manifest.json"
VOCAB = "rwkv_vocab_v20230424.txt"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RwkvcError(f"{out}: exists and is not a directory; choose another output path")
    if out.exists() and any(out.iterdir()) and not force:
        raise RwkvcError(f"{out}: directory exists and is not empty; pass --force to replace it or choose another path")
    parent = out.resolve().parent
    if not parent.exists():
        raise RwkvcError(f"{parent}: parent directory of the output does not exist; create it first")
    try:  # a real probe: permissions, read-only file systems and root on /proc all show up here
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as e:
        raise RwkvcError(f"{parent}: cannot write the output there ({e.strerror}); "
                         "choose an output directory you can write to") from None


def compile_to_dir(model: ir.Model, target, out: str | os.PathLike, *, dtype: str | None = None,
                   source: str | None = None, force: bool = False, options: dict | None = None,
                   progress=None) -> Path:
    """Lower `model` with `target` into the artifact directory `out` (atomically)."""
    from rwkvc.targets import unsupported
    out = Path(out)
    check_output_dir(out, force)
    dtype = dtype or target.capabilities.dtypes[0]
    why = unsupported(target, model, dtype)
    if why:
        raise RwkvcError(why)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        fields = target.compile(model, str(tmp), dict(options or {}, dtype=dtype), progress=progress)
        tok_dir = tmp / "tokenizer"
        tok_dir.mkdir()
        shutil.copyfile(Path(__file__).parent / "data" / VOCAB, tok_dir / VOCAB)
        if model.init_state is not None:
            import numpy as np
            np.savez(tmp / "init_state.npz", shift=model.init_state.shift, wkv=model.init_state.wkv)
        cfg = model.config
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "rwkvc_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"path": str(source) if source else None},
            "target": target.name,
            "model": cfg.to_dict(),
            "passes": model.passes,
            "state": {**{k: list(v) for k, v in cfg.state_shapes().items()}, "dtype": "float32",
                      "init": "init_state.npz" if model.init_state is not None else None},
            "tokenizer": {"kind": "rwkv-world", "file": f"tokenizer/{VOCAB}"},
            **fields,
        }
        manifest["files"] = {str(p.relative_to(tmp)): {"sha256": sha256(p), "bytes": p.stat().st_size}
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    d = Path(path)
    if not d.exists():
        raise RwkvcError(f"{d}: no such artifact directory; compile one with `rwkvc compile MODEL -o DIR`")
    if not d.is_dir() or not (d / MANIFEST).exists():
        raise RwkvcError(f"{d}: not an rwkvc artifact (no {MANIFEST}); compile one with `rwkvc compile MODEL -o DIR`")
    try:
        m = json.loads((d / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RwkvcError(f"{d / MANIFEST}: corrupt manifest ({e}); recompile the artifact") from None
    if m.get("format") != FORMAT:
        raise RwkvcError(f"{d}: manifest is not an rwkvc artifact manifest")
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise RwkvcError(f"{d}: artifact format {m['format_version']} is newer than this rwkvc understands "
                         f"({FORMAT_VERSION}); upgrade rwkvc")
    for rel, info in m.get("files", {}).items():
        p = d / rel
        if not p.exists():
            raise RwkvcError(f"{d}: artifact file {rel} is missing; recompile the artifact")
        if p.stat().st_size != info["bytes"]:
            raise RwkvcError(f"{d}: artifact file {rel} has {p.stat().st_size} bytes, manifest says {info['bytes']} "
                             "(truncated or modified); recompile the artifact")
    return m


def verify_hashes(path: str | os.PathLike) -> list[str]:
    """Names of files whose sha256 differs from the manifest (slow: reads everything)."""
    d = Path(path)
    m = read_manifest(d)
    return [rel for rel, info in m["files"].items() if sha256(d / rel) != info["sha256"]]
