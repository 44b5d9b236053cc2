"""Rwkv7MatVecSet: the quantised products of one layer of the fused step gathered into one node of rwkvc's
kernels (op sets 3 and 7), each computed as Rwkv7MatVecQ computes it."""
from __future__ import annotations

from rwkvc import ir
from rwkvc.abi import FUSED_DOMAIN

from . import kinds
from .graph import Graph, f32
from .quant import matvec_fusable

MATVEC_ACTS = {None: 0, "tanh": 1, "sigmoid": 2, "relu": 3, "relu2": 4}   # Rwkv7MatVecSet's acts attribute


class MatVecSet:
    """Products of one layer gathered into one Rwkv7MatVecSet node, each computed as Rwkv7MatVecQ computes
    it: 4-bit matrices (matvec_fusable), and pairs of them with nothing, tanh, sigmoid, relu or relu squared
    between (the dense FFN; svd-factored projections; the LoRAs). The set's tanh and sigmoid are libm's, an
    ulp or two from ONNX Runtime's approximations: rarely, that flips one of the next product's 8-bit
    activation codes (the flips the fused step's tests allow).

        ms = MatVecSet(g); h = ms.add(lin, x) or ms.add((first, second), x, "relu2"); ...; ms.resolve({...})

    add() returns a handle, or None when the matrix cannot join (the caller emits it as usual)."""

    class Handle(int):
        pass

    def __init__(self, g: Graph):
        self.g, self.xs, self.ins, self.prog, self.outs = g, [], [], [], None
        self.layouts, self.ns = [], []

    def _spec(self, lin: ir.Linear):
        f = kinds.NBITS.get(lin.kind)
        spec = f[0](lin.weight) if f is not None else None
        ok = spec is not None and matvec_fusable(self.g, spec[0], spec[1], 4, lin.weight.shape[1], lin.weight.shape[0])
        return spec if ok else None

    def _product(self, lin: ir.Linear, src: int, act: str | None, emit: bool) -> int:
        bits, block = self._spec(lin)
        _, inputs, layout16, inputs16 = kinds.NBITS[lin.kind]
        i16 = layout16(self.g, lin.weight)
        self.ins += (inputs16 if i16 else inputs)(self.g, lin)
        self.layouts.append(int(i16))
        self.ns.append(int(lin.weight.shape[0]))
        self.prog.append((src, MATVEC_ACTS[act], bits, block, int(emit)))
        return len(self.prog) - 1

    def add(self, lin, x: str, act: str | None = None) -> "MatVecSet.Handle | None":
        """lin: a Linear, or a (first, second) pair with `act` between them; else `act` on the result. An
        svd-factored Linear (no diagonal) is the pair of its factors with its own activation between."""
        if not isinstance(lin, tuple) and lin.kind == "factored" and lin.weight.diag is None:
            if act is not None:
                return None
            w = lin.weight
            lin, act = (ir.Linear(lin.name + ".a", w.a), ir.Linear(lin.name + ".b", w.b)), w.act
        pair = lin if isinstance(lin, tuple) else (lin,)
        if act not in MATVEC_ACTS or any(self._spec(m) is None for m in pair):
            return None
        if x not in self.xs:
            self.xs.append(x)
        src = self.xs.index(x)
        if len(pair) == 2:
            src = -self._product(pair[0], src, act, False) - 1
            act = None
        self._product(pair[-1], src, act, True)
        return MatVecSet.Handle(sum(p[4] for p in self.prog) - 1)

    def resolve(self, values: dict) -> dict:
        """Emit the node (once) and replace the handles among `values` by its outputs."""
        if self.outs is None:
            self.outs = []
            if self.prog:
                src, acts, bits, blocks, emits = (list(c) for c in zip(*self.prog))
                n = sum(emits)
                # op set 7's interleaved products (absent when there are none: the op set 3-6 form)
                extra = {"layouts": self.layouts, "ns": self.ns} if any(self.layouts) else {}
                # inputs are indexed by position: the x's first (their indices fixed before the weights)
                outs = self.g.op("Rwkv7MatVecSet", *(f32(self.g, x) for x in self.xs), *self.ins,
                                 domain=FUSED_DOMAIN, n_out=n, n_x=len(self.xs), src=src, acts=acts,
                                 bitss=bits, blocks=blocks, emits=emits, **extra)
                self.outs = [outs] if n == 1 else list(outs)
        return {k: self.outs[v] if isinstance(v, MatVecSet.Handle) else v for k, v in values.items()}


def matvec_product(g: Graph, lin, x: str, act: str | None = None) -> str | None:
    """One matrix (an svd-factored one: its two factors), or a (first, second) pair with `act` between, as a
    one-entry Rwkv7MatVecSet; None when it cannot join (MatVecSet.add)."""
    ms = MatVecSet(g)
    h = ms.add(lin, x, act)
    return ms.resolve({"y": h})["y"] if h is not None else None
