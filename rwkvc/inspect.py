"""`rwkvc inspect`: what a checkpoint or an artifact holds."""
from __future__ import annotations

from pathlib import Path

from .errors import RwkvcError


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n:.1f} GB"


def _components_text(comps: dict) -> list[str]:
    lines = [f"  {'component':<12} {'params':>14} {'bytes':>12}"]
    tp = tb = 0
    for k, v in comps.items():
        lines.append(f"  {k:<12} {v['params']:>14,} {_fmt_bytes(v['bytes']):>12}")
        tp += v["params"]
        tb += v["bytes"]
    lines.append(f"  {'total':<12} {tp:>14,} {_fmt_bytes(tb):>12}")
    return lines


def _compressions_text(comp: dict) -> list[str]:
    """RWKV-Lite's compressions found in a checkpoint, one line each."""
    if not comp:
        return []
    lines = ["  RWKV-Lite compressions:"]
    if "low_rank" in comp:
        lr = comp["low_rank"]
        lines.append(f"    low-rank projections {', '.join(lr['projections'])} (rank {', '.join(map(str, lr['ranks']))}; "
                     f"{lr['variant']})")
    if "sparse_ffn" in comp:
        sp = comp["sparse_ffn"]
        lines.append(f"    sparse FFN: predictors on {sp['layers']} layers (hidden width {sp['predictor_width']}) "
                     "+ 1-bit quantised key predictor")
    if "hierarchical_head" in comp:
        hh = comp["hierarchical_head"]
        lines.append(f"    hierarchical head: {hh['clusters']} vocabulary clusters"
                     f"{' (+ MLP cluster head)' if hh['mlp_variant'] else ''}; used only with the vocabulary "
                     "cluster file (*-cls.npy), else the dense head")
    return lines


def _deep_checkpoint(model) -> dict:
    """RWKV-7a's DeepEmbed tables in a checkpoint: their count, shape and bytes as stored."""
    des = [blk.ffn.deep for blk in model.blocks if blk.ffn.deep is not None]
    if not des:
        return {}
    V, D2 = des[0].table.shape
    n = sum(int(a.nbytes) for de in des for a in de.table.arrays().values())
    return {"tables": len(des), "shape": [V, D2], "rank": des[0].rank, "bytes": n,
            "params": sum(int(a.size) for de in des for a in de.table.arrays().values())}


def _deep_artifact(p: Path, m: dict) -> dict:
    """RWKV-7a's DeepEmbed tables in an artifact: per layer, the merged table's stored bytes (and scales), its
    storage, whether the runtime holds it in memory, and the bytes a decoded token reads."""
    import re
    pat = re.compile(r"blocks\.(\d+)\.ffn\.s_emb\.(\w+)$")
    found = []                                   # (layer, part, dtype, shape, bytes)
    eps = m.get("entry_points", {})
    if str(eps.get("step", "")).endswith(".onnx"):
        import onnx
        from onnx import helper
        g = onnx.load(str(p / eps["step"]), load_external_data=False).graph
        for t in g.initializer:
            mm = pat.match(t.name)
            ext = {e.key: e.value for e in t.external_data}
            if mm and "length" in ext:
                found.append((int(mm.group(1)), mm.group(2), str(helper.tensor_dtype_to_np_dtype(t.data_type)),
                              list(t.dims), int(ext["length"])))
    elif (p / "params.json").is_file():
        import json
        for e in json.loads((p / "params.json").read_text()).get("params", []):
            mm = pat.match(str(e.get("name", "")))
            if mm:
                found.append((int(mm.group(1)), mm.group(2), e["dtype"], e["shape"], int(e["nbytes"])))
    if not found:
        return {}
    from .abi import DEEP_EMBED_DENSE
    resident = eps.get("step", "").endswith(".onnx") and any(pt == DEEP_EMBED_DENSE.rsplit(".", 1)[-1]
                                                              for _, pt, *_ in found)
    per_token = sum(b // shp[0] for _, _, _, shp, b in found)
    tables = [(dt, shp) for _, pt, dt, shp, _ in found if pt != "q8scale"]
    return {"tables": len({lay for lay, *_ in found}), "shape": tables[0][1], "bytes": sum(f[4] for f in found),
            "storage": sorted({dt for dt, _ in tables}), "resident": bool(resident), "bytes_read_per_token": per_token}


def inspect_path(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        return inspect_artifact(p)
    return inspect_checkpoint(p)


def inspect_checkpoint(p: Path) -> dict:
    from .frontend import load_state_dict, model_from_state_dict
    sd = load_state_dict(p)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in sd.values()})
    model = model_from_state_dict(sd)
    c = model.config
    comps = {k: {"params": n, "bytes": b} for k, (n, b) in model.component_params().items()}
    info = {"kind": "checkpoint", "path": str(p), "version": f"v{c.version}", "file_bytes": p.stat().st_size,
            "dtypes": dtypes, "config": c.to_dict(), "components": comps,
            "params": sum(v["params"] for v in comps.values())}
    from .arch.lite import compressions
    comp = compressions(sd)
    info["compressions"] = comp
    if model.init_state is not None:
        info["init_state"] = "time_state"
    deep = _deep_checkpoint(model)
    if deep:
        info["deep_embed"] = deep
    heads = f"heads {c.n_head} x {c.head_size}" if c.version != "4" else "no heads (RWKV-4)"
    text = [f"{p}: RWKV-v{c.version} checkpoint{' (RWKV-Lite)' if comp else ''} ({', '.join(dtypes)}, "
            f"{_fmt_bytes(info['file_bytes'])})",
            f"  layers {c.n_layer}, n_embd {c.n_embd}, {heads}, ffn {c.ffn_dim}, "
            f"vocab {c.vocab_size}" + (f", low-rank {dict(c.lora)}" if c.lora else "")]
    if model.init_state is not None:
        text.append("  initial state: tuned (time_state), used as the artifact's initial state")
    text += _compressions_text(comp)
    if deep:
        text.append(f"  DeepEmbed (RWKV-7a): {deep['tables']} tables {deep['shape'][0]}x{deep['shape'][1]} (rank "
                    f"{deep['rank']}, s_emb + s_emb_x), {_fmt_bytes(deep['bytes'])} in the file")
    text += _components_text(comps)
    info["_text"] = "\n".join(text)
    return info


def inspect_artifact(p: Path) -> dict:
    from .artifact import read_manifest
    m = read_manifest(p)
    c = m["model"]
    if c.get("kind") == "gpt":   # the transformer baseline (targets/gpt_onnx.py)
        info = {"kind": "artifact", "path": str(p), "target": m["target"], "runtime": m.get("runtime"),
                "model": "gpt", "config": c, "entry_points": m.get("entry_points", {}), "dtype": m.get("dtype"),
                "artifact_bytes": sum(f["bytes"] for f in m.get("files", {}).values())}
        info["_text"] = (f"{p}: rwkvc artifact of a GPT (runtime {m.get('runtime')}, {m.get('dtype')}), "
                         f"{_fmt_bytes(info['artifact_bytes'])}\n  GPT: layers {c['n_layer']}, n_embd {c['n_embd']}, "
                         f"heads {c['n_head']}, ffn {c['ffn_dim']}, vocab {c['vocab_size']}, context {c['block_size']}")
        return info
    info = {"kind": "artifact", "path": str(p), "target": m["target"], "runtime": m.get("runtime"),
            "version": f"v{c['version']}", "config": c, "passes": m.get("passes", []),
            "entry_points": m.get("entry_points", {}), "dtype": m.get("dtype"),
            "files": m.get("files", {}), "artifact_bytes": sum(f["bytes"] for f in m.get("files", {}).values()),
            "format_version": m.get("format_version"), "source": m.get("source"), "custom_ops": m.get("custom_ops")}
    text = [f"{p}: rwkvc artifact for target '{m['target']}' (runtime {m.get('runtime')}, {m.get('dtype')}), "
            f"{_fmt_bytes(info['artifact_bytes'])}",
            f"  RWKV-v{c['version']}: layers {c['n_layer']}, n_embd {c['n_embd']}, "
            + (f"heads {c['n_head']} x {c['head_size']}" if c["version"] != "4" else "no heads (RWKV-4)")
            + f", ffn {c['ffn_dim']}, vocab {c['vocab_size']}",
            f"  entry points: {', '.join(f'{k}={v}' for k, v in info['entry_points'].items())}"
            + (f" (rwkvc kernels {m['custom_ops']['domain']} v{m['custom_ops']['version']})" if m.get("custom_ops") else ""),
            "  passes: " + (", ".join(x.get("name", "?") + (f" ({x['summary']})" if x.get("summary") else "")
                                      for x in info["passes"]) or "none")]
    deep = _deep_artifact(p, m)
    if deep:
        info["deep_embed"] = deep
        text.append(f"  DeepEmbed tables: {deep['tables']} x {deep['shape'][0]}x{deep['shape'][1]} in "
                    f"{', '.join(deep['storage'])}, {_fmt_bytes(deep['bytes'])} "
                    + ("(held in memory)" if deep["resident"] else "(memory-mapped)")
                    + f"; {_fmt_bytes(deep['bytes_read_per_token'])} read per token")
    for rel, f in info["files"].items():
        text.append(f"    {rel:<40} {_fmt_bytes(f['bytes']):>10}")
    info["_text"] = "\n".join(text)
    return info
