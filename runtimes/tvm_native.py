"""Run `rpi5` artifacts through their native runner (`DIR/run --serve`): directly on an aarch64 Linux
host, under `qemu-aarch64` on any other. One runner process per loaded model; forward() sends the
tokens and the state over a pipe and reads back the logits and the new state. For tests and
convenience on a development machine, not for speed (qemu emulates every instruction)."""
from __future__ import annotations

import os
import platform
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from rwkvc import ir
from rwkvc.errors import RwkvcError

MAGIC = 0x52574B56
SYSROOTS = ("/usr/aarch64-linux-gnu",)
INSTALL_HINT = ("apt-get install qemu-user libstdc++6-arm64-cross (or run scripts/setup_tvm.sh), or run "
                "DIR/run on the Raspberry Pi itself")


def runner_command(path: Path, manifest: dict, which=shutil.which, machine: str | None = None,
                   sysroots=SYSROOTS) -> list[str]:
    """argv prefix that runs the artifact's aarch64 runner on this machine (qemu-aarch64 off aarch64)."""
    exe = str(Path(path) / manifest.get("runner", "run"))
    machine = machine or platform.machine()
    if machine.lower() in ("aarch64", "arm64") and platform.system() == "Linux":
        return [exe]
    qemu = which("qemu-aarch64") or which("qemu-aarch64-static")
    sysroot = os.environ.get("QEMU_LD_PREFIX") or next(
        (s for s in sysroots if Path(s, "lib", "ld-linux-aarch64.so.1").exists()), None)
    if qemu is None or sysroot is None:
        what = "qemu-aarch64" if qemu is None else "the aarch64 C/C++ libraries (/usr/aarch64-linux-gnu)"
        raise RwkvcError(f"this is an rpi5 (aarch64) artifact; running it on {machine} needs {what}: {INSTALL_HINT}")
    return [qemu, "-L", sysroot, exe]


class TvmNativeRuntime:
    """forward(tokens (T,) int64, state) -> logits (V,) float32, new state."""

    def __init__(self, path: Path, manifest: dict, threads: int | None = None):
        self.path, self.manifest = Path(path), manifest
        cfg = ir.ModelConfig.from_dict(manifest["model"])
        self.shapes = cfg.state_shapes()
        self.V = cfg.vocab_size
        cmd = runner_command(self.path, manifest) + ["--artifact", str(self.path), "--serve"]
        if threads:
            cmd += ["--threads", str(threads)]
        self.err = tempfile.TemporaryFile()   # a file, not a pipe: a chatty runner cannot block on it
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)
        hello = self._read(6 * 8)
        magic, L, C, H, N, V = struct.unpack("<6q", hello)
        if magic != MAGIC or (L, 2, C) != self.shapes["shift"] or (H, N) != (cfg.n_head, cfg.head_size) or V != self.V:
            self.close()
            raise RwkvcError(f"{self.path}: the native runner disagrees with the manifest about the model; "
                             "recompile the artifact")

    def _read(self, n: int) -> bytes:
        buf = self.proc.stdout.read(n)
        if buf is None or len(buf) != n:
            self.proc.wait(timeout=10)
            self.err.seek(0)
            err = self.err.read().decode(errors="replace").strip().splitlines()
            raise RwkvcError(f"{self.path}: the native runner stopped ({err[-1] if err else 'no message'})")
        return buf

    def forward(self, tokens: np.ndarray, state: ir.State) -> tuple[np.ndarray, ir.State]:
        toks = np.ascontiguousarray(tokens, np.int64)
        msg = struct.pack("<q", len(toks)) + toks.tobytes() + np.ascontiguousarray(state.shift, np.float32).tobytes() \
            + np.ascontiguousarray(state.wkv, np.float32).tobytes()
        try:
            self.proc.stdin.write(msg)
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._read(1)  # raises with the runner's message
        (status,) = struct.unpack("<q", self._read(8))
        if status != 0:
            (n,) = struct.unpack("<q", self._read(8))
            raise RwkvcError(f"native runner: {self._read(n).decode(errors='replace')}")
        ns, nw = int(np.prod(self.shapes["shift"])), int(np.prod(self.shapes["wkv"]))
        logits = np.frombuffer(self._read(4 * self.V), np.float32).copy()
        shift = np.frombuffer(self._read(4 * ns), np.float32).reshape(self.shapes["shift"]).copy()
        wkv = np.frombuffer(self._read(4 * nw), np.float32).reshape(self.shapes["wkv"]).copy()
        return logits, ir.State(shift, wkv)

    def close(self):
        p = getattr(self, "proc", None)
        if p is not None and p.poll() is None:
            try:
                p.stdin.write(struct.pack("<q", 0))
                p.stdin.close()
                p.wait(timeout=10)
            except Exception:  # noqa: BLE001  (a dead pipe, a timeout; at interpreter exit also a torn-down module)
                p.kill()
                p.wait()
        if p is not None:
            p.stdout.close()
            self.err.close()

    def __del__(self):
        self.close()
