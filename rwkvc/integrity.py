"""An artifact is checked before it is trusted: the manifest holds every file's sha256 and size.

    verify_artifact(DIR)      every file hashed (`rwkvc verify`); the first damaged file is a RwkvcError
    check_on_load(DIR, man)   what `rwkvc.load` does: files up to SMALL bytes hashed on every load; a larger
                              file hashed on its first load and then trusted while its stat (device, inode,
                              size, mtime, ctime) matches the record kept in the cache (verified/); an
                              edit in place changes ctime, so it is hashed again and found
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .cache import cache_root
from .errors import RwkvcError

SMALL = 16 << 20     # bytes: files up to this size are hashed on every load
CHUNK = 1 << 22


def file_sha256(path: Path, bar=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
            if bar is not None:
                bar.update(len(b))
    return h.hexdigest()


def damaged_message(d: Path, rel: str) -> str:
    return (f"{d / rel}: damaged (its sha256 differs from the artifact's manifest); recompile the artifact "
            f"or restore the file")


def verify_artifact(path: str | os.PathLike, progress: bool = True) -> dict:
    """Hash every file of the artifact against its manifest; returns files, bytes and seconds."""
    from .artifact import read_manifest
    d = Path(path)
    m = read_manifest(d)
    files = m["files"]
    total = sum(info["bytes"] for info in files.values())
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {d.name}", leave=False)
    try:
        for rel, info in files.items():
            if file_sha256(d / rel, bar) != info["sha256"]:
                raise RwkvcError(damaged_message(d, rel))
    finally:
        if bar is not None:
            bar.close()
    return {"files": len(files), "bytes": total, "seconds": time.perf_counter() - t0}


def _stat_key(p: Path) -> list[int]:
    s = p.stat()
    return [s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns]


def _record_path(p: Path) -> Path:
    return cache_root() / "verified" / (hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:32] + ".json")


def _trusted(p: Path, sha: str) -> bool:
    try:
        rec = json.loads(_record_path(p).read_text())
        return rec == {"stat": _stat_key(p), "sha256": sha}
    except (OSError, ValueError):
        return False


def _remember(p: Path, sha: str) -> None:
    """Best effort: an unwritable cache only means the file is hashed again next time."""
    rec = _record_path(p)
    try:
        rec.parent.mkdir(parents=True, exist_ok=True)
        tmp = rec.with_name(f"{rec.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stat": _stat_key(p), "sha256": sha}))
        os.replace(tmp, rec)
    except OSError:
        pass


def check_on_load(d: Path, manifest: dict) -> None:
    """Refuse a damaged artifact with one line naming the file (see the module docstring for the cost)."""
    for rel, info in manifest["files"].items():
        p = d / rel
        if info["bytes"] > SMALL and _trusted(p, info["sha256"]):
            continue
        if file_sha256(p) != info["sha256"]:
            raise RwkvcError(damaged_message(d, rel))
        if info["bytes"] > SMALL:
            _remember(p, info["sha256"])
