"""Compile and run one checkpoint at several recipes, one process at a time: compile time and peak RSS,
artifact bytes, load time, peak RSS while decoding, decode and prefill tokens/s (the docs/benchmarks/big-models.md
table).

    python bench/scale_bench.py CKPT.pth --work DIR [--recipes fp32,int8,int4,gptq] [--eager] [--no-run]
        [--threads 2] [--tokens 32] [--prefill 512] [--keep] [--calib README.md] [--calib-tokens 512]

Each compile is `rwkvc compile` under /usr/bin/time (its own peak RSS, ru_maxrss); --eager adds the same
compile with the whole checkpoint loaded and quantised weights kept in memory (the non-streaming compile)
for comparison. Each run is `rwkvc bench --json` in a fresh process. Results: DIR/scale.jsonl (one line per
compile / run) and a markdown table on stdout. Artifacts are deleted after their run unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RECIPES = {"fp32": None, "int8": "int8", "int4": "int4"}   # presets
# calibrated recipes: passes, calibrated on --calib text (--calib-tokens of it) layer by layer
CALIBRATED = {"gptq": "int4(group=128,method=gptq),lazy-emb(storage=int8)"}

EAGER = """
import sys
import rwkvc.frontend as F
from rwkvc.passes import PassContext
from rwkvc.pipeline import compile_checkpoint
from rwkvc.passes.presets import preset
load = F.load_model
F.load_model = lambda p, cluster_file=None, lazy=False: load(p, cluster_file)
ctx = PassContext(progress=False)
ctx.keep = lambda rep: rep
compile_checkpoint(sys.argv[1], sys.argv[2], passes=preset(sys.argv[3]) if sys.argv[3] != "fp32" else None,
                   ctx=ctx, force=True, progress=False)
"""


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, stderr tail) of a command run under /usr/bin/time."""
    t0 = time.time()
    r = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", "nice", "-n", "10", *cmd], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    stat = [ln for ln in lines if ln.startswith("TIME ")]
    if r.returncode != 0 or not stat:
        raise SystemExit(f"failed: {' '.join(cmd)}\n" + "\n".join(lines[-15:]))
    _, secs, kb = stat[-1].split()
    return float(secs) if secs else time.time() - t0, int(kb) * 1024, "\n".join(lines[-3:])


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--work", required=True)
    ap.add_argument("--recipes", default="fp32,int8,int4")
    ap.add_argument("--eager", action="store_true", help="also compile without streaming (peak for comparison)")
    ap.add_argument("--no-run", action="store_true", help="compile only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--calib", default="README.md", help="calibration text of the calibrated recipes (gptq)")
    ap.add_argument("--calib-tokens", type=int, default=512)
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "scale.jsonl", "a")
    rows = []
    for name in a.recipes.split(","):
        out = work / f"{Path(a.ckpt).stem}-{name}"
        row = {"ckpt": a.ckpt, "ckpt_bytes": os.path.getsize(a.ckpt), "recipe": name}
        if a.eager and name not in CALIBRATED:   # (the eager script runs presets)
            secs, peak, _ = timed([sys.executable, "-c", EAGER, a.ckpt, str(out), name])
            row.update(eager_compile_s=secs, eager_compile_peak_rss=peak)
            shutil.rmtree(out, ignore_errors=True)
        cmd = ["rwkvc", "compile", a.ckpt, "-o", str(out), "--target", "cpu", "--force", "-q"]
        if name in CALIBRATED:
            cmd += ["--passes", CALIBRATED[name], "--calib", a.calib, "--calib-tokens", str(a.calib_tokens)]
        elif RECIPES[name]:
            cmd += ["--preset", RECIPES[name]]
        secs, peak, _ = timed(cmd)
        row.update(compile_s=secs, compile_peak_rss=peak, artifact_bytes=dir_bytes(out))
        if not a.no_run:
            r = subprocess.run(["nice", "-n", "10", "rwkvc", "bench", str(out), "--json", "--threads", str(a.threads),
                                "--tokens", str(a.tokens), "--prefill", str(a.prefill), "--repeat", str(a.repeat)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(r.stderr[-3000:])
            b = json.loads(r.stdout)
            row.update({k: b.get(k) for k in ("load_seconds", "peak_rss_bytes", "rss_start_bytes", "state_bytes",
                                              "weight_bytes_resident", "weight_bytes_mapped", "decode_tokens_per_s",
                                              "prefill_tokens_per_s")})
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
        log.write(json.dumps(row) + "\n")
        log.flush()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    gb = lambda v: f"{v / 1e9:.2f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    print("| recipe | compile s | compile peak GB | eager peak GB | artifact GB | load s | run peak GB | "
          "resident weights GB | decode tok/s | prefill tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['compile_s']:.0f} | {gb(r['compile_peak_rss'])} | {gb(r.get('eager_compile_peak_rss'))} "
              f"| {gb(r['artifact_bytes'])} | {r.get('load_seconds', 0) or 0:.1f} | {gb(r.get('peak_rss_bytes'))} "
              f"| {gb(r.get('weight_bytes_resident'))} | {r.get('decode_tokens_per_s') or 0:.2f} "
              f"| {r.get('prefill_tokens_per_s') or 0:.1f} |")


if __name__ == "__main__":
    main()
