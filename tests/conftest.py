import os
import platform

# The official `rwkv` package (the numerical reference) only defines RWKV-7 when this is set before import.
os.environ.setdefault("RWKV_V7_ON", "1")
os.environ.setdefault("RWKV_JIT_ON", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)


def build_for(monkeypatch, march):
    """rwkvc's kernels built once more with -march=`march` instead of native (~15 s), for the test's length
    (the fixtures avx2_build and sse_build)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the other builds are x86-64 ones")
    from rwkvc.runtimes import ortops
    monkeypatch.setattr(ortops, "FLAGS", [f if f != "-march=native" else "-march=" + march for f in ortops.FLAGS])
    ortops.library.cache_clear()


@pytest.fixture
def avx2_build(monkeypatch):
    """A plain AVX2 x86-64 build: the paths AVX2-only hosts run."""
    from rwkvc.runtimes import ortops
    build_for(monkeypatch, "x86-64-v3")
    yield
    ortops.library.cache_clear()


@pytest.fixture
def sse_build(monkeypatch):
    """A baseline x86-64 build (SSE2 only): the portable loops other CPUs run."""
    from rwkvc.runtimes import ortops
    build_for(monkeypatch, "x86-64")
    yield
    ortops.library.cache_clear()
