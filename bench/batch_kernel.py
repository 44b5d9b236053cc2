"""One batched product on its own: B rows of x through rwkvc's Rwkv7MatMulQ16 (the batched step's 4-bit /
int8 kernel, op set 8) against one N x K matrix, hot in cache, in one ONNX Runtime session: microseconds a
call, multiply-adds per second and the cost against one row, for each B.

    python bench/batch_kernel.py [--shape 3072x768] [--group 128] [--bits 4] [--threads 1] [--reps 3]
        [--copies 1]

--copies N: N matrices of the shape (N products a call, the same x): with N times the codes over the last
level cache, each product reads its codes from memory, as in a step.
--variant=-DNAME=VALUE (several flags: in quotes after the =): also the kernels built with these extra
compiler flags, measured interleaved with the default build (each in its own session), both tables printed.

What it says: whether the kernel at B rows is bound by its arithmetic (GMAC/s flat in B, near what the
vector unit can do: AVX-512 VNNI's vpdpbusd does 64 multiply-adds an instruction) or by something else, and
so what B streams can cost at best against one (docs/benchmarks/serving.md).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def session(N: int, K: int, group: int, bits: int, threads: int, copies: int = 1, library: str | None = None):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from rwkvc.abi import FUSED_DOMAIN
    from rwkvc.runtimes import ortops
    w = np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)
    if bits == 4:
        from rwkvc.weights.int4 import Int4, interleave16
        q = Int4.from_dense(w, group, 4)
        arrays = interleave16(q.packed, q.scales, q.zeros, group)
        op = "Rwkv7MatMulQ16"
    else:
        from rwkvc.weights.int8 import Int8, interleave16_int8
        q = Int8.from_dense(w)
        arrays = interleave16_int8(q.q, q.scale, group)
        op = "Rwkv7MatMulQ16x8"
    nodes, inits, outs = [], [], []
    for c in range(copies):          # each copy its own initializers (the same values, other memory)
        names = [f"w{c}_{i}" for i in range(len(arrays))]
        inits += [onnx.numpy_helper.from_array(np.asarray(a), n) for a, n in zip(arrays, names)]
        nodes.append(helper.make_node(op, ["x", *names], [f"y{c}"], domain=FUSED_DOMAIN, n=N, block=group, bits=bits))
        outs.append(helper.make_tensor_value_info(f"y{c}", TensorProto.FLOAT, ["B", N]))
    graph = helper.make_graph(nodes, "batch_kernel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(FUSED_DOMAIN, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if library is None:
        ortops.register(so, threads)
    else:
        import ctypes
        so.register_custom_ops_library(library)
        ctypes.CDLL(library).rwkvc_ort_ops_set_threads(threads)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="3072x768", help="N x K of the matrix")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--copies", type=int, default=1, help="matrices a call (out of cache when they exceed it)")
    ap.add_argument("--variant", default="", help="extra compiler flags of a second build, measured beside the default")
    a = ap.parse_args(argv)
    N, K = (int(v) for v in a.shape.lower().split("x"))
    builds = {"default": None}
    if a.variant:
        from rwkvc.runtimes import ortops
        builds[a.variant] = ortops.build(ortops.FLAGS + a.variant.split())
    sessions = {name: session(N, K, a.group, a.bits, a.threads, a.copies, lib) for name, lib in builds.items()}
    batches = [int(b) for b in a.batches.split(",")]
    xs = {b: np.random.default_rng(b).standard_normal((b, K)).astype(np.float32) for b in batches}
    best: dict[tuple, float] = {}
    for _ in range(a.reps):          # the builds and batch sizes interleaved, best of the repetitions
        for b in batches:
            for name, sess in sessions.items():
                sess.run(None, {"x": xs[b]})
                t = time.perf_counter()
                for _ in range(a.calls):
                    sess.run(None, {"x": xs[b]})
                key = (name, b)
                best[key] = min(best.get(key, float("inf")), (time.perf_counter() - t) / (a.calls * a.copies))
    for name in sessions:
        one = best.get((name, 1))
        print(f"\n{name} build: {N} x {K}, int{a.bits}, block {a.group}, {a.threads} thread(s), {a.copies} "
              f"cop{'y' if a.copies == 1 else 'ies'}")
        print("| B | us a product | GMAC/s | x one row |" + (" x the default build's time |" if name != "default" else ""))
        print("|---|---|---|---|" + ("---|" if name != "default" else ""))
        for b in batches:
            t = best[(name, b)]
            ratio = f"{t / one:.2f}" if one else "-"
            vs = f" {t / best[('default', b)]:.3f} |" if name != "default" else ""
            print(f"| {b} | {t * 1e6:.0f} | {N * K * b / t / 1e9:.0f} | {ratio} |{vs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
