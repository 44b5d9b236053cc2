"""A/B of rwkvc's 4-bit step kernels (Rwkv7MatVecQ / Rwkv7MatVecSet, op set v3) against ONNX Runtime's
MatMulNBits: the same checkpoint and recipe compiled twice for the cpu target, LoweringPolicy.matvec_q on
and off, and the step graph timed alternately in prebound ONNX Runtime sessions (no Python runtime around it).

    python bench/ab_matvec.py --model 0.1b --recipe "int4(group=32)" --threads 2
    python bench/ab_matvec.py --model demo --recipe "int4(group=32)"
    python bench/ab_matvec.py --model 0.1b --matvec-small 0     # small products stay MatMulNBits too

Prints each variant's best and median microseconds a step over --reps alternations of --steps steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RWKV_V7_ON", "1")


def step_session(art: Path, threads: int):
    import onnxruntime as ort

    from rwkvc.runtimes import ortops
    man = json.loads((art / "manifest.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    ortops.register(so, threads)
    sess = ort.InferenceSession(str(art / man["entry_points"]["step"]), so, providers=["CPUExecutionProvider"])
    L = man["state"]["wkv"][0]
    feed = {"tokens": np.array([5]), "shift_in": np.zeros(man["state"]["shift"], np.float32),
            **{f"wkv_in.{i}": np.zeros(man["state"]["wkv"][1:], np.float32) for i in range(L)}}
    return sess, feed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="0.1b", help="demo, 0.1b, or a checkpoint path")
    ap.add_argument("--recipe", default="int4(group=32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--matvec-small", type=int, default=None,
                    help="LoweringPolicy.matvec_small for the rwkvc-kernels variant (default: rwkvc's)")
    a = ap.parse_args(argv)
    from bench_passes import checkpoint

    from rwkvc.calib import default_calib_tokens
    from rwkvc.passes import PassContext
    from rwkvc.pipeline import compile_checkpoint, parse_recipe
    from rwkvc.targets.onnx import LoweringPolicy
    with tempfile.TemporaryDirectory(prefix="rwkvc-ab-") as tmp:
        work = Path(tmp)
        ckpt = checkpoint(a.model, work)
        arts = {}
        kernels = LoweringPolicy(fused=True, matvec_q=True)
        if a.matvec_small is not None:
            kernels = dataclasses.replace(kernels, matvec_small=a.matvec_small)
        for name, policy in (("rwkvc kernels", kernels), ("MatMulNBits", LoweringPolicy(fused=True, matvec_q=False))):
            arts[name] = work / name.replace(" ", "-")
            compile_checkpoint(str(ckpt), arts[name], target="cpu", passes=parse_recipe(a.recipe), force=True,
                               ctx=PassContext(calib_tokens=default_calib_tokens(2048), progress=False),
                               options={"lowering": policy})
        sessions = {name: step_session(art, a.threads) for name, art in arts.items()}
        times = {name: [] for name in arts}
        for _ in range(a.reps):
            for name, (sess, feed) in sessions.items():
                for _ in range(3):
                    sess.run(None, feed)
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    sess.run(None, feed)
                times[name].append((time.perf_counter() - t0) / a.steps * 1e6)
        for name, t in times.items():
            print(f"{a.model} {a.recipe} threads={a.threads} {name}: best {min(t):.0f} us, median {np.median(t):.0f} us a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
