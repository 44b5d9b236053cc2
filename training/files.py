"""Writing training's files so that a crash, a kill or a full disk never leaves half of one, and the
scripts' one-line errors.

    atomic_write / atomic_save   the whole file is written to `.NAME.tmp-PID` in the same directory,
                                 flushed and fsynced, then renamed over NAME (and the directory fsynced);
                                 a failure removes the temporary file and names NAME in the OSError;
                                 atomic_write_all renames several files only once all are written
    remove_dead_temps            deletes the temporaries of processes that no longer run (a SIGKILL
                                 cannot clean up after itself)
    JsonLines                    metrics.jsonl: one write per line (a kill never leaves half a line),
                                 created on its first line, a failed write cut back to the last whole line
    script_main                  a script's main(): RwkvcError, OSError (no space, permissions, missing
                                 files) and bad command-line values become one `error: ...` line, exit 2
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

from rwkvc.errors import RwkvcError, exit_status

TEMP = re.compile(r"\..+\.tmp-(\d+)")


def temp_path(path: Path) -> Path:
    """The temporary name `path` is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def os_error_text(e: OSError) -> str:
    """'FILE: No space left on device' (the file when the error names one)."""
    what = e.strerror or str(e)
    return f"{e.filename}: {what}" if e.filename else what


class _Sink:
    """The file torch.save writes to, keeping the OSError that torch's writer turns into a RuntimeError."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def _fsync_dir(d: Path):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(path: Path, write: Callable[[object], object]) -> Path:
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            sink = _Sink(f)
            try:
                write(sink)
            except OSError:
                raise
            except Exception:
                if sink.error is not None:
                    raise sink.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    return tmp


def atomic_write_all(items) -> list[Path]:
    """Write every (path, write) of `items` whole or not at all: each write(f) fills a temporary file
    beside its path (f has write/flush), and only when all are written are they renamed, in order, one
    right after the other. A failure removes the temporary files and names the path in the OSError."""
    items = [(Path(p), w) for p, w in items]
    temps: list[Path] = []
    try:
        for path, write in items:
            temps.append(_write_temp(path, write))
        for tmp, (path, _) in zip(temps, items):
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        for tmp in temps:
            try:
                tmp.unlink()
            except OSError:
                pass
    for d in {path.parent for path, _ in items}:
        _fsync_dir(d)
    return [path for path, _ in items]


def atomic_write(path: str | os.PathLike, write: Callable[[object], object]) -> Path:
    """Write `path` whole or not at all (see atomic_write_all)."""
    return atomic_write_all([(path, write)])[0]


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save(obj, path), atomically."""
    import torch
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_dead_temps(d: str | os.PathLike) -> list[str]:
    """Delete the `.NAME.tmp-PID` files in `d` whose process is gone; returns their names."""
    gone = []
    d = Path(d)
    if not d.is_dir():
        return gone
    for p in d.iterdir():
        m = TEMP.fullmatch(p.name)
        if not m or not p.is_file():
            continue
        pid = int(m.group(1))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue                     # that process still runs: its file
            except ProcessLookupError:
                pass
            except PermissionError:
                continue                     # another user's process
        try:
            p.unlink()
            gone.append(p.name)
        except FileNotFoundError:
            pass
    return gone


def check_output_dir(d: str | os.PathLike, flag: str) -> None:
    """RwkvcError, before any work, when directory `d` cannot be made or written (a file is in the way, or
    the nearest existing directory is not writable)."""
    d = Path(d)
    probe = d
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RwkvcError(f"{flag} {d}: {probe} is not a directory")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise RwkvcError(f"{flag} {d}: {probe} is not writable (permission denied)")


class JsonLines:
    """An append-only JSON-lines file (metrics.jsonl). Each line is one write(2), so a kill never leaves
    half a line; the file is created by its first line, so a run that fails before writing one leaves no
    empty file; a write the disk cannot take is cut back so the file still ends with a whole line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd: int | None = None
        self.created = False

    def write(self, obj: dict):
        data = (json.dumps(obj) + "\n").encode("utf-8")
        if self.fd is None:
            self.created = not self.path.exists()
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        end = os.fstat(self.fd).st_size
        try:
            n = os.write(self.fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            try:
                os.ftruncate(self.fd, end)
            except OSError:
                pass
            if self.created and end == 0:
                self.close()
                self.path.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from None

    def sync(self):
        if self.fd is not None:
            os.fsync(self.fd)

    def close(self):
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a bad value reported as one `error: ...` line (exit status 2), no usage block."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def script_main(fn: Callable[[], object]) -> int:
    """Run a script's work: 0 on success; a RwkvcError or an OSError (a missing file, permissions, no
    space) becomes one `error: ...` line on stderr and exit status 2."""
    def run():
        try:
            return fn()
        except OSError as e:
            raise RwkvcError(os_error_text(e)) from None
    return exit_status(run)
