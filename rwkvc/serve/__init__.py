"""Serving compiled artifacts over the OpenAI API (`rwkvc serve`), with a prefix-state cache and continuous
batching.

    chat.py      the World models' chat template, the prompt as per-message token segments
    protocol.py  the OpenAI request bodies and their mapping onto rwkvc's sampling options
    cache.py     PrefixCache: states after prompt prefixes, LRU by bytes
    engine.py    Engine: the worker thread that joins, batches, steps and samples every live request
    app.py       the FastAPI app (completions, chat completions, models, health, metrics)
    server.py    `rwkvc serve` (uvicorn) and BackgroundServer (a server in a thread)

FastAPI and uvicorn are imported only here (pip install 'rwkvc[serve]').
"""
from __future__ import annotations

from .cache import PrefixCache
from .engine import Engine, Job

__all__ = ["Engine", "Job", "PrefixCache"]
