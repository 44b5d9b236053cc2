"""`rwkvc bench`: decode and prefill speed, peak RSS and size of an artifact, measured in-process."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def weight_traffic(path) -> dict:
    """Weight bytes of an artifact's step graph: resident (held in memory for every token) and read per
    decoded token, from the graph itself and the passes' calibration statistics in the manifest.

    An initializer that only Gather / GatherElements nodes read as their data, or that rwkvc's fused kernels
    read row by row (rwkvc.abi.FUSED_ROW_INPUTS) (the lazy embedding table, a sparse FFN's key / value rows,
    a clustered head's rows, their scales and the head's per-block row / token tables) stays memory-mapped
    by ONNX Runtime: it is not resident, and a token reads only the rows it gathers: one row of the embedding; the fraction the sparse-ffn / hhead passes measured on
    calibration text for the others (their reports in manifest["passes"]; the head's tables are read by
    blocks of rows, which rounds that fraction up by about half a block per chosen cluster). The dense
    embedding is gathered too, but the runtime holds it in memory (runtimes/onnxruntime.py): resident,
    one row read. Every other initializer is resident and read once per token (pre-packed by the kernels
    that use it)."""
    import re

    import onnx
    from .artifact import read_manifest
    from .abi import row_read
    from .abi import resident as held_by_runtime
    d = Path(path)
    man = read_manifest(d)
    if "step" not in man.get("entry_points", {}) or not str(man["entry_points"]["step"]).endswith(".onnx"):
        return {}
    m = onnx.load(str(d / man["entry_points"]["step"]), load_external_data=False)
    g = m.graph
    sizes = {}
    for t in g.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            sizes[t.name] = (int(ext["length"]), list(t.dims))
    users: dict[str, list] = {}
    for node in g.node:
        for j, name in enumerate(node.input):
            if name in sizes:
                users.setdefault(name, []).append((node.op_type, j, list(node.input)))
    by_rows = row_read(g)
    reports = {p.get("name"): p for p in man.get("passes", [])}
    ffn_frac = {int(k): v.get("fraction", 1.0) for k, v in reports.get("sparse-ffn", {}).get("layers", {}).items()}
    head_frac = reports.get("hhead", {}).get("rows_fraction_read", 1.0)
    resident = read = gathered_total = 0
    parts = {"embedding": 0, "head": 0, "blocks": 0}
    for name, (n, dims) in sizes.items():
        us = users.get(name, [])
        gathered = name in by_rows
        part = "embedding" if name.startswith("emb.") else "head" if name.startswith("head") else "blocks"
        if not gathered:
            resident += n
            read += n
            parts[part] += n
            continue
        if held_by_runtime(name):                         # held in memory by the runtime; one row a token
            resident += n
        else:
            gathered_total += n
        by_token = any(ins[1] == "tokens" for _, _, ins in us)
        rows = dims[0] if dims else 1
        if by_token:
            r = n / rows                                  # one row per decoded token
        else:
            mm = re.match(r"blocks\.(\d+)\.ffn\.", name)
            frac = ffn_frac.get(int(mm.group(1)), 1.0) if mm else head_frac if name.startswith("head") else 1.0
            r = n * frac
        read += r
        parts[part] += r
    return {"weight_bytes_file": int(sum(n for n, _ in sizes.values())), "weight_bytes_resident": int(resident),
            "weight_bytes_mapped": int(gathered_total), "weight_bytes_read_per_token": int(read),
            "weight_bytes_read_per_token_by_part": {k: int(v) for k, v in parts.items()}}


def rss_bytes() -> dict:
    """Current resident memory of this process: anonymous (copied / pre-packed) and file-backed (mapped)."""
    out = {}
    try:
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def bench_artifact(path, n_decode=64, n_prefill=512, threads=None, repeat=3, seed=0, between=None) -> dict:
    """Speed, memory and weight traffic of an artifact (`rwkvc bench`). between: called after each timed
    decode run (a benchmark interleaving a competitor's runs with ours, so both sample the same span)."""
    from .api import load
    rss0 = rss_bytes()
    t_load = time.perf_counter()
    m = load(path, threads=threads)
    t_load = time.perf_counter() - t_load
    rss_loaded = rss_bytes()
    V = m.config.vocab_size
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, min(V, 65530), n_prefill).tolist()

    m.forward(prompt[:8])                                   # warm up both sessions
    m.forward(prompt[:1])
    t_pre = []
    for _ in range(repeat):
        logits = state = None   # one prompt's state at a time, as a process serving one stream holds
        t0 = time.perf_counter()
        logits, state = m.forward(prompt)
        t_pre.append(time.perf_counter() - t0)
    st, tok = state, int(np.argmax(logits))
    logits = state = None       # the decode goes on from the prompt, each timed run from where the last ended
    t_dec = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n_decode):   # greedy: np.argmax of the logits (Model.greedy_step)
            tok, st = m.greedy_step(tok, st, in_place=True)   # as a decode loop holds its state
        t_dec.append(time.perf_counter() - t0)
        if between is not None:
            between()
    files = m.manifest.get("files", {})
    d, p = min(t_dec), min(t_pre)
    return {
        "artifact": str(Path(path)),
        "target": m.manifest["target"],
        "model": m.manifest["model"],
        "passes": [x.get("name") for x in m.manifest.get("passes", [])],
        "threads": threads or "default",
        "prepack": getattr(m.runtime, "prepack", None),   # ONNX Runtime's packed copies of float matrices
        # the weights copied into 2 MiB pages at load (runtimes/hugepages.py); None where the runtime has none
        "weight_bytes_huge_pages": m.runtime.huge_page_bytes() if hasattr(m.runtime, "huge_page_bytes") else None,
        "decode_tokens": n_decode,
        "decode_tokens_per_s": n_decode / d,
        "decode_ms_per_token": 1000 * d / n_decode,
        "prefill_tokens": n_prefill,
        "prefill_tokens_per_s": n_prefill / p,
        "peak_rss_bytes": peak_rss_bytes(),
        "load_seconds": t_load,
        "state_bytes": 4 * sum(int(np.prod(s)) for s in m.config.state_shapes().values()),
        "rss_start_bytes": rss0.get("VmRSS", 0),   # the interpreter and its imports before the load
        "artifact_bytes": sum(f["bytes"] for f in files.values()),
        **weight_traffic(path),
        "rss_load_anon_bytes": rss_loaded.get("RssAnon", 0) - rss0.get("RssAnon", 0),
        "rss_load_file_bytes": rss_loaded.get("RssFile", 0) - rss0.get("RssFile", 0),
    }
