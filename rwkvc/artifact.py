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

import errno
import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import __version__, ir
from .errors import RwkvcError
from .integrity import file_sha256

FORMAT = "rwkvc-artifact"
FORMAT_VERSION = 2  # 2: one wkv state input/output per layer in the ONNX graphs
MANIFEST = "manifest.json"
VOCAB = "rwkv_vocab_v20230424.txt"


def is_artifact(d: Path) -> bool:
    """A directory holding an rwkvc manifest (what --force may replace)."""
    try:
        return json.loads((d / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RwkvcError(f"{out}: exists and is not a directory; choose another output path")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise RwkvcError(f"{out}: directory exists and is not empty; pass --force to replace it or choose another path")
        if not is_artifact(out):
            raise RwkvcError(f"{out}: not an rwkvc artifact (no rwkvc {MANIFEST}); --force replaces only an artifact: "
                             "choose another output path")
        cwd = Path.cwd().resolve()
        if out.resolve() == cwd or out.resolve() in cwd.parents:
            raise RwkvcError(f"{out}: is the current directory (or holds it); run the compile from elsewhere "
                             "to replace it")
    parent = out.resolve().parent
    if not parent.exists():
        raise RwkvcError(f"{parent}: parent directory of the output does not exist; create it first")
    try:  # a real probe: permissions, read-only file systems and root on /proc all show up here
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as e:
        raise RwkvcError(f"{parent}: cannot write the output there ({e.strerror}); "
                         "choose an output directory you can write to") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_leftovers(out: Path) -> list[Path]:
    """The temporary directories of compiles into `out` whose process has died (.NAME.tmp-PID-*,
    .NAME.old-PID): removed, and returned."""
    gone = []
    for p in out.resolve().parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, rest = p.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and p.is_dir() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def _snapshot(out: Path):
    """What stands at `out`: None, or (device, inode, mtime) of the directory."""
    try:
        s = out.stat()
    except FileNotFoundError:
        return None
    return (s.st_dev, s.st_ino, s.st_mtime_ns)


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def _install(tmp: Path, out: Path, before) -> None:
    """Rename the finished `tmp` to `out`, under an exclusive lock on the parent directory: refused when
    something else was written to `out` since this compile checked it (a concurrent compile)."""
    import fcntl
    fd = os.open(out.resolve().parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _snapshot(out) != before:
            raise RwkvcError(f"{out}: written by another process while this compile ran; nothing was replaced: "
                             "compile again (with --force to replace that artifact)")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        os.close(fd)


def resolve_dtype(dtype: str | None, options: dict | None) -> str | None:
    """The weight dtype asked for, as the `dtype` argument or as options["dtype"] (not two different ones)."""
    given = (options or {}).get("dtype")
    if dtype is not None and given is not None and given != dtype:
        raise RwkvcError(f"dtype is given twice, as {dtype!r} and as options['dtype'] = {given!r}; give it once")
    return dtype or given


def compile_to_dir(model: ir.Model, target, out: str | os.PathLike, *, dtype: str | None = None,
                   source: str | None = None, force: bool = False, options: dict | None = None,
                   progress=None, tokenizer: str | os.PathLike | None = None) -> Path:
    """Lower `model` with `target` into the artifact directory `out` (atomically). `tokenizer`: a Hugging Face
    tokenizer.json the artifact carries instead of the World vocabulary (rwkvc.hf_tokenizer)."""
    out = Path(out)
    check_output_dir(out, force)
    dtype = resolve_dtype(dtype, options) or target.capabilities.dtypes[0]
    why = target.capabilities.why_not(target.name, model, dtype)
    if why:
        raise RwkvcError(why)
    remove_dead_leftovers(out)
    before = _snapshot(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.resolve().parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())   # the user's umask, as a plain mkdir would give
        fields = target.compile(model, str(tmp), dict(options or {}, dtype=dtype), progress=progress)
        tok_dir = tmp / "tokenizer"
        tok_dir.mkdir()
        tok_name, tok_kind = (VOCAB, "rwkv-world") if tokenizer is None else ("tokenizer.json", "hf-tokenizers")
        shutil.copyfile(Path(__file__).parent / "data" / VOCAB if tokenizer is None else tokenizer, tok_dir / tok_name)
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
            "tokenizer": {"kind": tok_kind, "file": f"tokenizer/{tok_name}"},
            **fields,
        }
        manifest["files"] = {str(p.relative_to(tmp)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        for p in sorted(tmp.rglob("*")):   # every file on disk before the manifest names it (and its pages clean,
            if p.is_file():                # so a runtime can drop a table's cached pages: rwkvc.mapped.drop_cached)
                _fsync(p)
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _install(tmp, out, before)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        hint = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the output location"
        raise RwkvcError(f"{out}: cannot write the artifact ({e.strerror or e}); nothing was written: {hint} "
                         "and compile again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# field -> the type it must have (the fields every artifact has; a target adds its own, checked by its runtime)
MANIFEST_FIELDS = {"format": str, "format_version": int, "target": str, "runtime": str, "model": dict,
                   "passes": list, "state": dict, "tokenizer": dict, "entry_points": dict, "files": dict}


def _damaged(d: Path, what: str) -> RwkvcError:
    return RwkvcError(f"{d / MANIFEST}: {what}; the manifest is damaged or not rwkvc's: recompile the artifact")


def inside(d: Path, rel, what: str = "a path") -> Path:
    """d / rel, for a relative path from an artifact's manifest that stays inside d (no absolute path, no
    `..`, no link out)."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise _damaged(d, f"{what} {rel!r} is not a path inside the artifact")
    p = d / rel
    root = d.resolve()
    if root != p.resolve() and root not in p.resolve().parents:
        raise _damaged(d, f"{what} {rel!r} leads out of the artifact")
    return p


def _check_fields(d: Path, m: dict) -> None:
    for k, t in MANIFEST_FIELDS.items():
        if not isinstance(m.get(k), t) or isinstance(m.get(k), bool):
            raise _damaged(d, f"field {k!r} is {type(m.get(k)).__name__}, not {t.__name__}")
    for rel, info in m["files"].items():
        inside(d, rel, "file")
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("bytes"), int)):
            raise _damaged(d, f"file {rel!r} has no sha256 and size")
    named = [("tokenizer file", m["tokenizer"].get("file")), ("initial state", m["state"].get("init")),
             ("library", m.get("library"))]
    named += [(f"entry point {k}", v) for k, v in m["entry_points"].items() if str(v).endswith(".onnx")]
    for what, rel in named:
        if rel is not None and rel not in m["files"]:
            inside(d, rel, what)
            raise _damaged(d, f"{what} {rel!r} is not one of its files")


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
    except OSError as e:
        raise RwkvcError(f"{d / MANIFEST}: cannot read it ({e.strerror})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise RwkvcError(f"{d}: manifest is not an rwkvc artifact manifest")
    if not isinstance(m.get("format_version"), int) or m["format_version"] > FORMAT_VERSION:
        raise RwkvcError(f"{d}: artifact format {m.get('format_version')!r} is not one this rwkvc understands "
                         f"(up to {FORMAT_VERSION}); upgrade rwkvc or recompile the artifact")
    _check_fields(d, m)
    for rel, info in m["files"].items():
        p = d / rel
        if not p.is_file():
            raise RwkvcError(f"{d}: artifact file {rel} is missing; recompile the artifact")
        if p.stat().st_size != info["bytes"]:
            raise RwkvcError(f"{d}: artifact file {rel} has {p.stat().st_size} bytes, manifest says {info['bytes']} "
                             "(truncated or modified); recompile the artifact")
    return m


def verify_hashes(path: str | os.PathLike) -> list[str]:
    """Names of files whose sha256 differs from the manifest (slow: reads everything)."""
    d = Path(path)
    m = read_manifest(d)
    return [rel for rel, info in m["files"].items() if file_sha256(d / rel) != info["sha256"]]
