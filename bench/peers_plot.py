"""Bar plot of a side-by-side run of rwkvc, rwkv.cpp and llama.cpp (../shared/peers): decode and prefill.

    python bench/peers_plot.py /tmp/scale/sbs15/sbs_results.jsonl docs/img/peers_1p5b.png \
        --title "random RWKV-7 1.5B (L24 D2048 V65536), 2 threads"

Reads the runner's JSON lines (one per engine/format and round: engine, fmt, decode, prefill, rss, bytes,
load1), takes the median over rounds per engine/format (the whiskers span the rounds' min-max, as the
runner's table does) and draws three panels: decode tokens/s, prefill tokens/s and peak RSS, one bar per
engine/format, grouped by precision class and coloured by engine. The PNG is written atomically.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
from pathlib import Path

# bar order: precision class, then engine
CLASS_OF = {
    "FP32": "fp32", "F32": "fp32", "fp32": "fp32",
    "FP16": "fp16", "F16": "fp16", "fp16": "fp16",
    "Q8_0": "8-bit", "int8": "8-bit",
    "Q5_1": "5-bit",
    "Q4_0": "4-bit g32", "int4 g32": "4-bit g32",
    "Q4_K_M": "4-bit g128 / k-quant", "int4 g128": "4-bit g128 / k-quant",
    "--preset int4": "4-bit g128 / k-quant",   # int4 g128 with the embedding on disk in int8 (lazy-emb)
}
CLASS_ORDER = ["fp32", "fp16", "8-bit", "5-bit", "4-bit g32", "4-bit g128 / k-quant", "other"]
ENGINE_ORDER = ["rwkvc", "rwkv.cpp", "llama.cpp"]
COLORS = {"rwkvc": "tab:blue", "rwkv.cpp": "tab:green", "llama.cpp": "tab:orange"}


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (engine, fmt) with the median / min / max of decode and prefill, max RSS, file bytes."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["engine"], r["fmt"]), []).append(r)
    out = []
    for (engine, fmt), rs in groups.items():
        ok = [r for r in rs if r.get("decode")]
        if not ok:
            continue
        d = [r["decode"] for r in ok]
        p = [r["prefill"] for r in ok]
        out.append(dict(engine=engine, fmt=fmt, cls=CLASS_OF.get(fmt, "other"),
                        d=statistics.median(d), dmin=min(d), dmax=max(d),
                        p=statistics.median(p), pmin=min(p), pmax=max(p),
                        rss=max(r["rss"] for r in ok), bytes=ok[0]["bytes"], n=len(ok)))
    out.sort(key=lambda e: (CLASS_ORDER.index(e["cls"]),
                            ENGINE_ORDER.index(e["engine"]) if e["engine"] in ENGINE_ORDER else 9, e["fmt"]))
    return out


def plot(entries: list[dict], path: Path, title: str, loads: list[float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels = [f"{e['engine']}\n{e['fmt']}" for e in entries]
    x = list(range(len(entries)))
    colors = [COLORS.get(e["engine"], "tab:gray") for e in entries]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=90)
    panels = (("decode tokens/s (higher is better)", "d", "dmin", "dmax"),
              ("prefill-512 tokens/s (higher is better)", "p", "pmin", "pmax"),
              ("peak RSS, GB (lower is better)", "rss", None, None))
    for ax, (name, key, lo, hi) in zip(axes, panels):
        scale = 1e9 if key == "rss" else 1.0
        vals = [e[key] / scale for e in entries]
        err = None
        if lo:
            err = [[e[key] - e[lo] for e in entries], [e[hi] - e[key] for e in entries]]
        ax.bar(x, vals, color=colors, yerr=err, capsize=3, edgecolor="black", linewidth=0.4)
        for xi, v in zip(x, vals):
            ax.text(xi, v, f"{v:.2f}" if key == "rss" else f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        # thin separators between precision classes
        for i in range(1, len(entries)):
            if entries[i]["cls"] != entries[i - 1]["cls"]:
                ax.axvline(i - 0.5, color="gray", lw=0.6, ls=":")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7, rotation=45, ha="right")
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(handles=[Patch(color=c, label=n) for n, c in COLORS.items()
                            if any(e["engine"] == n for e in entries)], fontsize=8)
    ns = sorted({e["n"] for e in entries})
    rounds = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    sub = f"median of {rounds} interleaved round(s), whiskers min-max"
    if loads:
        sub += f"; 1-min load average {min(loads):.1f}-{max(loads):.1f} (2 cores, shared)"
    fig.suptitle(f"{title}\n{sub}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="sbs_results.jsonl from ../shared/peers (side_by_side.sh or sbs.py)")
    ap.add_argument("png")
    ap.add_argument("--title", default="rwkvc vs rwkv.cpp vs llama.cpp")
    a = ap.parse_args(argv)
    try:
        rows = [json.loads(line) for line in open(a.results) if line.strip()]
    except (OSError, json.JSONDecodeError) as ex:
        print(f"error: cannot read {a.results}: {ex}; pass the sbs_results.jsonl that side_by_side.sh wrote",
              file=sys.stderr)
        return 2
    entries = aggregate(rows)
    if not entries:
        print(f"error: {a.results} has no successful run to plot", file=sys.stderr)
        return 2
    plot(entries, Path(a.png), a.title, [r["load1"] for r in rows if "load1" in r])
    for e in entries:
        print(f"{e['engine']:9s} {e['fmt']:10s} decode {e['d']:7.1f}  prefill {e['p']:7.1f}  "
              f"RSS {e['rss'] / 1e9:5.2f} GB  file {e['bytes'] / 1e9:5.2f} GB")
    print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
