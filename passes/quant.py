"""`int8` and `int4`: weight-only quantisation of every matrix (the head and low-rank factors included).

Each matrix becomes an rwkvc.weights kind (the weight math lives there):

    Int8      "int8"      per output channel, w ~ q * scale; accuracy_level 4 (default) or 0 says how the
                          cpu target computes with it (rwkvc.weights.int8.Int8)
    Int4      "int4"      group-wise 4-bit, stored as MatMulNBits reads it (block = group)
    Factored  "factored"  a low-rank matrix whose two factors were quantised

Matrices already quantised are left alone (a representation's `quantized` says what changes), so int8
and int4 combine. Matrices read row by row (a sparse FFN's key / value, a clustered head's rows) are int8
in an int4 pass too. Calibration-based variants (method=awq / gptq) live in rwkvc.passes.calib_quant and
produce the same kinds (awq: `Scaled`).
"""
from __future__ import annotations

import dataclasses

from rwkvc import ir
from rwkvc.errors import RwkvcError
from rwkvc.weights import Int4, Int8

from . import Param, calib_quant, register
from .common import check_layers, check_selector, fmt_bytes, nbytes, selected

METHODS = ("rtn", "awq", "gptq")


def quantizer(bits: int, args: dict, calib=None):
    """-> fn(name, w (N, K) float32, x_stats) -> representation. calib: passes.calib_quant statistics."""
    method = args.get("method", "rtn")
    acc = args.get("accuracy_level", 4)
    if bits == 8:
        acc = 4 if acc == 4 else 0   # int8 has levels 0 and 4; an int4 pass's rows quantiser passes 0/1/4
        if method == "rtn":
            return lambda name, w: Int8.from_dense(w, acc)
    else:
        group = args["group"]
        if method == "rtn":
            return lambda name, w: Int4.from_dense(w, group, acc)
    make = calib_quant.make_quantizer(bits, args, calib)
    if bits == 4:
        return make

    def with_level(*a):
        rep = make(*a)
        return dataclasses.replace(rep, accuracy_level=acc) if rep.kind == "int8" else rep
    return with_level


class QuantPass:
    """Matrices already quantised are left alone, so int8 and int4 combine: "int8(targets=head),int4"."""
    requires = ()
    forbids_after: tuple[str, ...] = ()

    def __init__(self, bits: int):
        self.bits = bits
        self.name = f"int{bits}"
        self.params = {
            "targets": Param(str, "all", check_selector, "a selector such as all, att+ffn, head (see docs/COMPRESSION.md)"),
            "layers": Param(str, "all", check_layers, "all, or block numbers/ranges joined by '+', e.g. 0-3+7"),
            "method": Param(str, "rtn", lambda v: v in METHODS, "one of " + ", ".join(METHODS)),
        }
        if bits == 4:
            # 128 by default: ONNX Runtime's MatMulNBits decoded faster at 128 than at 32 in two of the three
            # 0.1B runs in docs/BENCHMARKS.md, at +0.15 % vs +0.08 % perplexity on the demo (docs/COMPRESSION.md)
            self.params["group"] = Param(int, 128, lambda v: v in (16, 32, 64, 128, 256), "16, 32, 64, 128 or 256")
            self.params["accuracy_level"] = Param(int, 4, lambda v: v in (0, 1, 4),
                                                  "0 (float activations) or 4 (int8 activations, fastest)")
        else:
            self.params["accuracy_level"] = Param(int, 4, lambda v: v in (0, 4),
                                                  "4 (MatMulNBits, int8 activations per block, fastest) or 0 "
                                                  "(DynamicQuantizeLinear + MatMulInteger, plain ONNX)")

    @staticmethod
    def needs_calibration(args: dict) -> bool:
        return args.get("method", "rtn") != "rtn"

    def run(self, model: ir.Model, args: dict, ctx) -> tuple[ir.Model, dict]:
        sparse = {id(blk.ffn.lin) for blk in model.blocks if blk.ffn.sparse is not None}
        changed, total = [], [0, 0]

        def quantise(items, q, q_rows):
            for place, container, key, lin in items:
                qq = q_rows if (container is not None and id(container) in sparse) else q
                # a clustered head's rows are read row by row: the rows quantiser
                new, did = (lin.weight.quantized(q, lin.name, rows=q_rows) if lin.kind == "clustered"
                            else lin.weight.quantized(qq, lin.name))
                if not did:
                    continue
                total[0] += nbytes(lin.weight)
                total[1] += nbytes(new)
                new = ctx.keep(new) if hasattr(ctx, "keep") else new   # a compile's scratch file, not memory
                changed.append(lin.name)
                if container is None:
                    model.head = ir.Linear(lin.name, new)
                else:
                    container[key] = ir.Linear(lin.name, new)

        def quantizers(stats=None):
            q = quantizer(self.bits, args, stats)
            # matrices read row by row (sparse FFNs, clustered heads' rows) are int8: ONNX Runtime has no fast
            # kernel for gathered int4 rows (GatherBlockQuantized measured ~10x slower than MatMulNBits)
            return q, q if self.bits == 8 else quantizer(8, {**args, "method": "gptq" if args["method"] == "gptq" else "rtn"}, stats)

        items = list(selected(model, args["targets"], args["layers"]))
        calib = None
        if args.get("method", "rtn") == "rtn":
            quantise(items, *quantizers())
        else:
            # block by block, each block quantised from statistics of its inputs with the blocks before it
            # already quantised: one block's statistics and float weights exist at a time
            by_block = calib_quant.by_block(model, items)
            calib = calib_quant.calibrate(model, {i: {it[3].name for it in v} for i, v in by_block.items()},
                                          args, ctx, lambda i, stats: quantise(by_block[i], *quantizers(stats)))
        before, after = total
        if not changed:
            raise RwkvcError(f"pass {self.name}: no matrix to quantise (targets={args['targets']!r}, "
                             f"layers={args['layers']!r}); they may already be quantised")
        what = f"group {args['group']}, " if self.bits == 4 else "per-channel, "
        summary = (f"{len(changed)} matrices to int{self.bits} ({what}{args['method']}): "
                   f"{fmt_bytes(before)} -> {fmt_bytes(after)} ({before / max(after, 1):.2f}x)")
        return model, {"matrices": len(changed), "bytes_before": before, "bytes_after": after,
                       "names": changed if len(changed) <= 64 else changed[:64] + ["..."],
                       **({"calibration": calib.summary()} if calib is not None else {}), "summary": summary}


INT8 = register(QuantPass(8))
INT4 = register(QuantPass(4))
