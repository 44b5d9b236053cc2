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
    heads = f"heads {c.n_head} x {c.head_size}" if c.version != "4" else "no heads (RWKV-4)"
    text = [f"{p}: RWKV-v{c.version} checkpoint{' (RWKV-Lite)' if comp else ''} ({', '.join(dtypes)}, "
            f"{_fmt_bytes(info['file_bytes'])})",
            f"  layers {c.n_layer}, n_embd {c.n_embd}, {heads}, ffn {c.ffn_dim}, "
            f"vocab {c.vocab_size}" + (f", low-rank {dict(c.lora)}" if c.lora else "")]
    if model.init_state is not None:
        text.append("  initial state: tuned (time_state), used as the artifact's initial state")
    text += _compressions_text(comp)
    text += _components_text(comps)
    info["_text"] = "\n".join(text)
    return info


def inspect_artifact(p: Path) -> dict:
    from .artifact import read_manifest
    m = read_manifest(p)
    c = m["model"]
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
    for rel, f in info["files"].items():
        text.append(f"    {rel:<40} {_fmt_bytes(f['bytes']):>10}")
    info["_text"] = "\n".join(text)
    return info
