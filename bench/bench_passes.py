"""Memory and speed of the compression passes, per pass and together, in one run.

    python bench/bench_passes.py --model demo                 # the KJV demo model (trained once, cached)
    python bench/bench_passes.py --model 0.1b                 # the 0.1B-shaped RWKV-7 (random weights, bf16)
    python bench/bench_passes.py --model path/to/model.pth --recipes int8,int4,all --tokens 64 --threads 1

For each recipe it compiles the model for the cpu target and reports, from the same process:

    weights resident     bytes the runtime keeps in memory for every token (rwkvc.bench.weight_traffic:
                         initializers read only by Gather stay memory-mapped and are not counted)
    read per token       weight bytes a decoded token reads (gathered tables: the rows it reads, with the
                         sparse-ffn / hhead passes' measured fractions)
    decode tokens/s      greedy decode through the step graph, best of --repeat
    RSS after load       anonymous / file-backed resident memory the load added (measured)

against the dense fp16 artifact (compiled when the target lowers the model's version in float16,
otherwise its bytes are computed: 2 bytes per parameter, the same graph) and against the official `rwkv`
package (`cpu fp32`, RWKV_V7_ON=1) greedily decoding --tokens tokens, best of --repeat, its runs interleaved
with the recipe's decode runs (one official run after each of ours, so both bests come from the same
stretch of time: this VM's speed changes within seconds, and ten runs of a fast artifact take a tenth of a
second): each row's "vs official" divides by that measurement (in parentheses), and the official row shows
the range over the run. Results: a Markdown table on stdout and --json FILE.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RWKV_V7_ON", "1")
os.environ.setdefault("RWKV_JIT_ON", "0")

RECIPES = {
    "dense": "",
    "int8": "int8",
    "int4": "int4(group=32)",
    "int4-g128": "int4(group=128)",
    "int4-gptq": "int4(group=32,method=gptq)",
    "svd": "svd(rank=0.25)",
    "sparse-ffn": "sparse-ffn(recall=0.99)",
    "hhead": "hhead(k=200,p=0.95)",
    "lazy-emb": "lazy-emb(storage=int8)",
    "all": "svd(rank=0.25,targets=att.r+att.k+att.v+att.o),sparse-ffn(recall=0.99),hhead(k=200,p=0.95,min_k=6),"
           "int4(group=32),lazy-emb(storage=int8)",
    "all-g128": "svd(rank=0.25,targets=att.r+att.k+att.v+att.o),sparse-ffn(recall=0.99),hhead(k=200,p=0.95,min_k=6),"
                "int4(group=128),lazy-emb(storage=int8)",
}
SHAPE_01B = dict(n_layer=12, n_embd=768, head_size=64, vocab_size=65536, dims={"w": 64, "a": 64, "v": 32, "g": 128},
                 dtype="bf16")


def checkpoint(name: str, work: Path) -> Path:
    if name == "demo":
        from rwkvc.training.demo import demo
        return Path(demo(log=lambda *a: print(*a, file=sys.stderr)))
    if name == "0.1b":
        from rwkvc.testing import save_random_v7
        p = work / "rwkv7-0.1b-random.pth"
        if not p.exists():
            save_random_v7(p, **SHAPE_01B)
        return p
    return Path(name)


def dense_fp16_bytes(model) -> dict:
    """The dense fp16 artifact's weight bytes: every matrix and vector in 2 bytes; the embedding resident
    (a dense fp16 runtime such as the official package holds it), one row of it read per token."""
    comps = model.component_params()
    total = 2 * sum(v[0] for v in comps.values())
    emb = 2 * comps["embedding"][0]
    row = 2 * model.config.n_embd
    return {"weight_bytes_resident": total, "weight_bytes_read_per_token": total - emb + row}


class Official:
    """The official `rwkv` package (`cpu fp32`) on the checkpoint, loaded once; decode() is its greedy
    decode speed, best of `repeat` runs, measured beside each recipe (this VM's speed drifts by 30-50 %
    within seconds, so each recipe is compared with official runs interleaved with its own)."""

    def __init__(self, ckpt: Path, threads: int | None):
        import torch
        if threads:
            torch.set_num_threads(threads)
        with contextlib.redirect_stdout(io.StringIO()):
            from rwkv.model import RWKV
            self.m = RWKV(str(ckpt)[:-4], "cpu fp32")
        n_params = sum(v.numel() for v in torch.load(str(ckpt), map_location="cpu", weights_only=True).values())
        self.resident = 4 * n_params

    def decode(self, tokens: list[int], repeat: int) -> float:
        best = 0.0
        for _ in range(repeat):
            out, st = self.m.forward(tokens[:1], None)
            tok = int(out.argmax())
            t0 = time.perf_counter()
            for _ in range(len(tokens)):
                out, st = self.m.forward([tok], st)
                tok = int(out.argmax())
            best = max(best, len(tokens) / (time.perf_counter() - t0))
        return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="demo, 0.1b, or a checkpoint path")
    ap.add_argument("--recipes", default="dense,int8,int4,svd,sparse-ffn,hhead,lazy-emb,all",
                    help="comma-separated names from: " + ", ".join(RECIPES))
    ap.add_argument("--calib", default=None, help="calibration text (default: the offline KJV)")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed")
    ap.add_argument("--repeat", type=int, default=10,
                    help="timed runs of each decode, ours and the official package's (best is reported; these VMs' "
                         "speed varies by 30-50 %% from second to second, so best of 3 was noisy)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="keep the artifacts here (default: a temporary directory)")
    ap.add_argument("--no-official", action="store_true", help="skip the official rwkv package")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.recipes.split(",") if n.strip()]
    bad = [n for n in names if n not in RECIPES]
    if bad:
        ap.error(f"unknown recipe {bad[0]}; choose from {', '.join(RECIPES)}")

    from rwkvc.bench import bench_artifact
    from rwkvc.calib import default_calib_tokens, load_tokens
    from rwkvc.frontend import load_model
    from rwkvc.passes import PassContext
    from rwkvc.pipeline import compile_checkpoint, parse_recipe

    tmp = tempfile.TemporaryDirectory(prefix="rwkvc-bench-") if not a.workdir else None
    work = Path(a.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(a.model, work)
    base = load_model(ckpt)
    cfg = base.config
    print(f"# {ckpt.name}: RWKV-v{cfg.version} L{cfg.n_layer} C{cfg.n_embd} F{cfg.ffn_dim} V{cfg.vocab_size}",
          file=sys.stderr)
    calib = load_tokens(a.calib, limit=a.calib_tokens) if a.calib else default_calib_tokens(a.calib_tokens)
    calib = calib % cfg.vocab_size          # a small-vocabulary test model still gets text-shaped tokens
    fp16 = dense_fp16_bytes(base)
    del base
    official = None
    if not a.no_official:
        try:
            official = Official(ckpt, a.threads)
        except Exception as e:  # no rwkv package, or a version it cannot run
            print(f"official rwkv package skipped: {type(e).__name__}: {e}", file=sys.stderr)
    tokens = list(range(1, a.tokens + 1))
    rows = []
    for name in names:
        recipe = parse_recipe(RECIPES[name])
        out = work / f"art-{name}"
        t0 = time.perf_counter()
        compile_checkpoint(str(ckpt), out, target="cpu", passes=recipe, force=True,
                           ctx=PassContext(calib_tokens=calib, progress=False))
        t_compile = time.perf_counter() - t0
        off_runs = []   # the official package's runs, one after each of this recipe's decode runs
        between = (lambda: off_runs.append(official.decode(tokens, 1))) if official is not None else None
        r = bench_artifact(out, n_decode=a.tokens, n_prefill=64, threads=a.threads, repeat=a.repeat, between=between)
        r.update(name=name, recipe=RECIPES[name], compile_s=round(t_compile, 1))
        if off_runs:
            r["official_decode_tokens_per_s"] = max(off_runs)
        rows.append(r)
        print(f"{name}: {r['decode_tokens_per_s']:.1f} tok/s, resident {r['weight_bytes_resident'] / 1e6:.2f} MB, "
              f"read/token {r['weight_bytes_read_per_token'] / 1e6:.2f} MB", file=sys.stderr)
        gc.collect()
    off = [r["official_decode_tokens_per_s"] for r in rows if "official_decode_tokens_per_s" in r]
    official = ({"decode_tokens_per_s": min(off), "decode_tokens_per_s_max": max(off),
                 "weight_bytes_resident": official.resident} if official is not None and off else None)
    result = {"model": str(ckpt), "config": cfg.to_dict(), "dense_fp16": fp16, "official": official, "rows": rows,
              "threads": a.threads or "default"}

    head = ("| recipe | weights resident | vs fp16 | read / token | vs fp16 | decode tok/s | vs official | "
            "RSS load (anon) | compile s |")
    print(head)
    print("|" + "---|" * 9)
    print(f"| dense fp16 (computed) | {fp16['weight_bytes_resident'] / 1e6:.2f} MB | 1.0x | "
          f"{fp16['weight_bytes_read_per_token'] / 1e6:.2f} MB | 1.0x | | | | |")
    if official:
        print(f"| official rwkv cpu fp32 | {official['weight_bytes_resident'] / 1e6:.2f} MB | | | | "
              f"{official['decode_tokens_per_s']:.1f}-{official['decode_tokens_per_s_max']:.1f} | 1.0x | | |")
    for r in rows:
        ref = r.get("official_decode_tokens_per_s")
        sp = f"{r['decode_tokens_per_s'] / ref:.1f}x ({ref:.0f})" if ref else ""
        print(f"| {r['name']} | {r['weight_bytes_resident'] / 1e6:.2f} MB | "
              f"{fp16['weight_bytes_resident'] / max(r['weight_bytes_resident'], 1):.1f}x | "
              f"{r['weight_bytes_read_per_token'] / 1e6:.2f} MB | "
              f"{fp16['weight_bytes_read_per_token'] / max(r['weight_bytes_read_per_token'], 1):.1f}x | "
              f"{r['decode_tokens_per_s']:.1f} | {sp} | {r['rss_load_anon_bytes'] / 1e6:.1f} MB | {r['compile_s']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
