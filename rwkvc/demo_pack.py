"""The demo model shipped with rwkvc, packed small: rwkvc/data/demo-kjv.npz (~4 MB) is training/demo.py's
RWKV-7 (4 layers, 128 channels, World vocabulary, trained on the offline King James Bible) with

    the embedding and head rows of the tokens the KJV uses (9,474 of 65,536) in int8, one scale a row;
    every other token's embedding and head row replaced by the mean of those rows (training pushed them
    all the same way: none of those tokens ever appears, so each row only learned to be unlikely);
    every other tensor in float16.

`unpack` rebuilds an official-format checkpoint (.pth) from it, which compiles like any other. The pack is a
plain .npz read with allow_pickle=False: no code in it can run.

    python -m rwkvc.demo_pack ~/.cache/rwkvc/demo/model/rwkv-final.pth rwkvc/data/demo-kjv.npz TOKENS.bin...
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from .errors import RwkvcError

PACK = Path(__file__).resolve().parent / "data" / "demo-kjv.npz"


def _q8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.maximum(np.abs(rows).max(axis=1), 1e-12) / 127.0
    return np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8), scale.astype(np.float32)


def pack(state_dict: dict, keep_ids: np.ndarray, out: str | os.PathLike) -> int:
    """Write the pack of a demo checkpoint (state dict of float tensors), keeping the rows of keep_ids."""
    keep = np.unique(np.concatenate([np.asarray(keep_ids, np.int64), [0]]))
    arrays = {"keep_ids": keep.astype(np.int32)}
    for name in ("emb.weight", "head.weight"):
        w = state_dict[name].float().numpy()
        rest = np.setdiff1d(np.arange(w.shape[0]), keep)
        q, s = _q8(w[keep])
        arrays[name + ".q"], arrays[name + ".scale"] = q, s
        arrays[name + ".rest_mean"] = w[rest].mean(axis=0).astype(np.float32)
        arrays[name + ".rows"] = np.array(w.shape[0], np.int64)
    for k, v in state_dict.items():
        if k not in ("emb.weight", "head.weight"):
            arrays["t/" + k] = v.float().numpy().astype(np.float16)
    tmp = Path(f"{out}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    return Path(out).stat().st_size


def unpack(out: str | os.PathLike, pack_path: str | os.PathLike = PACK) -> Path:
    """The checkpoint (official format, float32) rebuilt from the pack, written atomically to `out`."""
    import torch
    try:
        z = np.load(pack_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise RwkvcError(f"{pack_path}: cannot read the shipped demo model ({e}); reinstall rwkvc") from None
    with z:
        keep = z["keep_ids"].astype(np.int64)
        sd = {}
        for name in ("emb.weight", "head.weight"):
            rows = int(z[name + ".rows"])
            w = np.repeat(z[name + ".rest_mean"][None, :], rows, axis=0)
            w[keep] = z[name + ".q"].astype(np.float32) * z[name + ".scale"][:, None]
            sd[name] = torch.from_numpy(w)
        for k in z.files:
            if k.startswith("t/"):
                sd[k[2:]] = torch.from_numpy(z[k].astype(np.float32))
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(sd, tmp)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    import torch

    from .binidx import MMapIndexedDataset
    a = sys.argv[1:] if argv is None else argv
    if len(a) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    sd = torch.load(a[0], weights_only=True)
    ids = np.concatenate([np.unique(np.asarray(MMapIndexedDataset(p).tokens)) for p in a[2:]])
    n = pack(sd, ids, a[1])
    print(f"wrote {a[1]}: {n / 1e6:.2f} MB, {len(np.unique(ids))} token rows kept", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
