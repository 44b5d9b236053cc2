"""Where rwkvc keeps what it makes for itself: $RWKV_CACHE, else ~/.cache/rwkvc (the fused kernels, the
demo model, the record of verified artifact files)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("RWKV_CACHE") or Path.home() / ".cache" / "rwkvc")
