import os
import sys

# The official `rwkv` package (the numerical reference) only defines RWKV-7 when this is set before import.
os.environ.setdefault("RWKV_V7_ON", "1")
os.environ.setdefault("RWKV_JIT_ON", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)


def official_rwkv(path_pth: str):
    """The official package's model for a .pth file ('cpu fp32'); it appends '.pth' itself."""
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        from rwkv.model import RWKV
        return RWKV(str(path_pth)[:-4], "cpu fp32")


def rwkvc_cmd():
    return [sys.executable, "-m", "rwkvc.cli"]
