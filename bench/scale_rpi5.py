"""A big checkpoint through the rpi5 target: `rwkvc compile --target rpi5 --preset P` (seconds and peak RSS),
then the artifact's native runner under qemu-aarch64 for a token or a few (seconds, peak RSS, the tokens it
made). EMULATION: the runner's times say what the artifact does on an x86 host, not how fast a Pi is; its
peak RSS is qemu's, which holds the emulated process (the memory-mapped weights.bin pages it touched
included).

    python bench/scale_rpi5.py CKPT.pth --work DIR [--presets int4,int8] [--run int4] [--tokens 1] [--logits]
        [--threads 2] [--lowering-peak] [--keep]
    python bench/scale_rpi5.py CKPT.pth --work DIR --parity int8,int4 [--parity-tokens 4]

--parity: each named recipe (PARITY: the tests/test_rpi5.py recipes whose activations both targets treat
alike) compiled for cpu and for rpi5, the same tokens through each step by step (rwkvc.load; the runner's
--step --dump-logits under qemu), each step's logits compared: max |difference| relative to max(1, max |cpu
logit|), against tests/helpers.py's bounds (1e-4; int8's rounding flips within 2e-2), and the top-1 tokens.

Each compile and each run is a fresh process under /usr/bin/time (its own ru_maxrss). Results: DIR/rpi5.jsonl
(one line per compile / run / lowering peak) and a markdown table on stdout (the lowering peaks only in the
jsonl). Artifacts are deleted after their step unless --keep.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

def timed(cmd: list[str], timeout: float | None = None) -> dict:
    """wall seconds, peak RSS (bytes) and output of cmd under /usr/bin/time -v; exits with one error line."""
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()[-30:]
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... failed ({r.returncode}):\n" + "\n".join(tail))
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    return {"seconds": round(wall, 1), "peak_rss": int(m.group(1)) * 1024, "stdout": r.stdout}


def compile_rpi5(ckpt: str, out: Path, preset: str) -> dict:
    res = timed(["rwkvc", "compile", ckpt, "--target", "rpi5", "--preset", preset, "-o", str(out), "--force", "-q"])
    res.pop("stdout")
    res["weights_bytes"] = (out / "weights.bin").stat().st_size
    res["library_bytes"] = (out / "model.so").stat().st_size
    return res


LOWERING_PEAK = """
import ctypes, gc, json, sys, time
from pathlib import Path
from rwkvc.artifact import compile_to_dir
from rwkvc.frontend import load_model
from rwkvc.passes import PassContext
from rwkvc.passes.presets import preset
from rwkvc.pipeline import parse_recipe, run_passes
from rwkvc.targets import get_target
import shutil, tempfile

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

ckpt, out, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
model = load_model(ckpt, lazy=True)
ctx = PassContext(progress=False)
ctx.spill_dir = tempfile.mkdtemp(prefix=out.name + '.spill-', dir=out.parent)   # the passes' scratch files
t = time.perf_counter()
model = run_passes(model, parse_recipe(preset(name)), ctx)
passes_s, passes_peak = time.perf_counter() - t, status("VmHWM")
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)    # the passes' freed heap back to the system
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                             # VmHWM restarts here
base = status("VmRSS")
t = time.perf_counter()
compile_to_dir(model, get_target("rpi5"), out, force=True)
print(json.dumps({"passes_seconds": round(passes_s, 1), "passes_peak": passes_peak, "lowering_seconds":
                  round(time.perf_counter() - t, 1), "lowering_start": base, "lowering_peak": status("VmHWM")}))
shutil.rmtree(ctx.spill_dir, ignore_errors=True)
"""


def lowering_peak(ckpt: str, out: Path, preset: str) -> dict:
    """The rpi5 lowering's own peak: the passes, then (same process, heap trimmed, VmHWM reset) the lowering:
    weights.bin, the Relax module, TVM's compile and export, the manifest."""
    r = subprocess.run([sys.executable, "-c", LOWERING_PEAK, ckpt, str(out), preset], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: the lowering-peak run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_runner(art: Path, prompt: str, tokens: int, threads: int, logits: bool) -> dict:
    """The runner under qemu (rwkvc.runtimes.tvm_native.runner_command): the prompt, then `tokens` greedy tokens,
    the ids it made; logits: a second run that dumps the prompt's logits (are they finite)."""
    import numpy as np

    from rwkvc.artifact import read_manifest
    from rwkvc.runtimes.tvm_native import runner_command
    ids, dump = art / "bench-ids.txt", art / "bench-logits.bin"
    cmd = runner_command(art, read_manifest(art)) + ["--artifact", str(art), "--prompt", prompt, "-n", str(tokens),
                                                     "--temperature", "0", "--threads", str(threads),
                                                     "--ids-out", str(ids)]
    res = timed(cmd)
    res["ids"] = [int(x) for x in ids.read_text().strip().split(",") if x]
    res.pop("stdout")
    if not logits:
        return res
    prompt_ids = [int(x) for x in subprocess.run(runner_command(art, read_manifest(art)) + [
        "--artifact", str(art), "--encode", prompt], capture_output=True, text=True).stdout.split(",") if x.strip()]
    one = timed(runner_command(art, read_manifest(art)) + ["--artifact", str(art), "--tokens",
                                                            ",".join(map(str, prompt_ids)), "--dump-logits",
                                                            str(dump), "--threads", str(threads)])
    lg = np.fromfile(dump, np.float32)
    res["prefill_only"] = {"seconds": one["seconds"], "peak_rss": one["peak_rss"]}
    res["logits_finite"] = bool(np.isfinite(lg).all()) and lg.size > 0
    return res


# recipe name -> passes: activations treated alike on both targets (tests/test_rpi5.py's compressed recipes)
PARITY = {"int8": "int8(accuracy_level=0),lazy-emb(storage=int8)",
          "int4": "int4(group=32,accuracy_level=1),lazy-emb(storage=float16)"}


def parity(ckpt: str, work: Path, name: str, n_tokens: int, threads: int) -> dict:
    """The PARITY recipe `name` for cpu and rpi5, n_tokens random tokens step by step through each, compared."""
    import numpy as np

    import rwkvc
    from rwkvc.artifact import read_manifest
    from rwkvc.runtimes.tvm_native import runner_command
    arts = {}
    for target in ("cpu", "rpi5"):
        arts[target] = work / f"parity-{name}-{target}"
        c = timed(["rwkvc", "compile", ckpt, "--target", target, "--passes", PARITY[name], "-o", str(arts[target]),
                   "--force", "-q"])
        print(f"{name} {target}: compiled in {c['seconds']} s, peak {c['peak_rss'] / 1e9:.2f} GB", file=sys.stderr)
    m = rwkvc.load(arts["cpu"], threads=threads)
    V = int(read_manifest(arts["cpu"])["model"]["vocab_size"])
    tokens = np.random.default_rng(3).integers(1, V, n_tokens).tolist()
    ref, st = [], None
    for t in tokens:
        lg, st = m.forward([t], st)
        ref.append(lg)
    del m
    ref = np.stack(ref)
    dump = arts["rpi5"] / "parity-logits.bin"
    art = arts["rpi5"]
    run = timed(runner_command(art, read_manifest(art)) + ["--artifact", str(art), "--tokens", ",".join(map(str, tokens)),
                                                           "--step", "--dump-logits", str(dump), "--threads", str(threads)])
    got = np.fromfile(dump, np.float32).reshape(len(tokens), V)
    rel = [float(np.abs(g - r).max()) / max(1.0, float(np.abs(r).max())) for g, r in zip(got, ref)]
    for a in arts.values():
        shutil.rmtree(a, ignore_errors=True)
    return {"recipe": PARITY[name], "tokens": tokens, "relative_max_diff": rel,
            "top1_agree": int(sum(int(np.argmax(g) == np.argmax(r)) for g, r in zip(got, ref))),
            "runner_seconds": run["seconds"], "runner_peak_rss": run["peak_rss"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--work", required=True, help="directory for the artifacts and rpi5.jsonl")
    ap.add_argument("--presets", default="int4,int8")
    ap.add_argument("--run", default="int4", help="presets whose runner is run under qemu (comma-separated, or none)")
    ap.add_argument("--tokens", type=int, default=1, help="tokens the runner generates after the prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default="The", help="the runner's prompt (default: one token)")
    ap.add_argument("--logits", action="store_true", help="also dump the prompt's logits in a second run (finite?)")
    ap.add_argument("--keep", action="store_true", help="keep the artifacts")
    ap.add_argument("--lowering-peak", action="store_true",
                    help="also the lowering's own peak: passes, then a VmHWM reset, then the rpi5 lowering (one process)")
    ap.add_argument("--parity", default="", help=f"compare cpu and rpi5 logits for these recipes ({', '.join(PARITY)})")
    ap.add_argument("--parity-tokens", type=int, default=4)
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.parity:
        print("| recipe | tokens | max relative difference a step | top-1 agreement | runner (qemu) s | runner peak RSS |")
        print("|---|---|---|---|---|---|")
        for name in a.parity.split(","):
            if name not in PARITY:
                raise SystemExit(f"error: --parity {name}: not one of {', '.join(PARITY)}")
            r = parity(a.ckpt, work, name, a.parity_tokens, a.threads)
            with open(work / "rpi5.jsonl", "a") as log:
                print(json.dumps({"ckpt": a.ckpt, "parity": name, **r}), file=log, flush=True)
            print(f"| `{r['recipe']}` | {len(r['tokens'])} | {', '.join(f'{x:.1e}' for x in r['relative_max_diff'])} | "
                  f"{r['top1_agree']}/{len(r['tokens'])} | {r['runner_seconds']} | {r['runner_peak_rss'] / 1e9:.2f} GB |")
        return 0
    runs = set(a.run.split(",")) if a.run != "none" else set()
    rows = []
    with open(work / "rpi5.jsonl", "a") as log:
        for p in a.presets.split(","):
            out = work / f"rpi5-{p}"
            c = compile_rpi5(a.ckpt, out, p)
            rec = {"ckpt": a.ckpt, "preset": p, "compile": c}
            print(json.dumps(rec), file=log, flush=True)
            if a.lowering_peak:
                rec["lowering"] = lowering_peak(a.ckpt, work / f"rpi5-{p}-lowering", p)
                shutil.rmtree(work / f"rpi5-{p}-lowering", ignore_errors=True)
                print(json.dumps({"ckpt": a.ckpt, "preset": p, "lowering": rec["lowering"]}), file=log, flush=True)
            if p in runs:
                rec["run"] = run_runner(out, a.prompt, a.tokens, a.threads, a.logits)
                print(json.dumps({"ckpt": a.ckpt, "preset": p, "run": rec["run"]}), file=log, flush=True)
            if not a.keep:
                shutil.rmtree(out, ignore_errors=True)
            rows.append(rec)
    print("| preset | compile s | compile peak RSS | weights.bin | model.so | runner (qemu): prompt + n tokens s | "
          "runner peak RSS | tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, run = r["compile"], r.get("run")
        tail = f"{run['seconds']} | {run['peak_rss'] / 1e9:.2f} GB | {run['ids']}" if run else "- | - | -"
        print(f"| {r['preset']} | {c['seconds']} | {c['peak_rss'] / 1e9:.2f} GB | {c['weights_bytes'] / 1e9:.2f} GB | "
              f"{c['library_bytes'] / 1e6:.1f} MB | {tail} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
