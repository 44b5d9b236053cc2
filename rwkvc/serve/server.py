"""Running the app: `rwkvc serve` (uvicorn in the foreground) and a server in a background thread (tests,
benchmarks, notebooks)."""
from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

from .app import create_app
from .engine import Engine


def load_engine(artifact: str | os.PathLike, max_batch: int = 8, cache_mb: float = 256, threads: int | None = None,
                batched: bool | None = None, state: str | None = None) -> Engine:
    """The engine over an artifact; state: a tuned state file every request starts from (rwkvc run --state)."""
    from rwkvc.api import load
    from rwkvc.errors import RwkvcError
    if cache_mb < 0:
        raise RwkvcError(f"--cache-mb must be >= 0, got {cache_mb}")
    m = load(artifact, threads=threads)
    if state:
        m.use_state(state)
    return Engine(m, max_batch=max_batch, cache_bytes=int(cache_mb * 2 ** 20), batched=batched)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: an ephemeral one; read it back with sock.getsockname())."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """An rwkvc server on loopback in a thread: `with BackgroundServer(engine) as url: ...` (url ends in /v1)."""

    def __init__(self, engine: Engine, model_name: str | None = None, host: str = "127.0.0.1"):
        import uvicorn
        self.engine = engine
        name = model_name or Path(engine.model.path).name
        self.sock = bind(host, 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}/v1"
        cfg = uvicorn.Config(create_app(engine, name), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        import time
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 30:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(artifact: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, cache_mb: float = 256,
          threads: int | None = None, model_name: str | None = None, log_level: str = "info", echo=print,
          state: str | None = None) -> None:
    """`rwkvc serve`: load, bind, then serve until interrupted."""
    import uvicorn
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = load_engine(artifact, max_batch=max_batch, cache_mb=cache_mb, threads=threads, state=state)
    name = model_name or Path(artifact).resolve().name
    sock = bind(host, port)
    echo(f"serving {artifact} as model {name!r} on http://{host}:{sock.getsockname()[1]}/v1 "
         f"(max batch {max_batch}{', batched step' if engine.batched else ''}, prefix cache {cache_mb:g} MiB)")
    try:
        uvicorn.Server(uvicorn.Config(create_app(engine, name), log_level=log_level, lifespan="off")).run(
            sockets=[sock])
    finally:
        engine.close()
        sock.close()
