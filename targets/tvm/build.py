"""Build a TVM artifact from the IR: refuse what the lowering cannot lower, build the Relax module
(step + prefill), compile it with TVM for the target's LLVM triple, export the library and write the
parameters."""
from __future__ import annotations

import os

from rwkvc import ir
from rwkvc.errors import RwkvcError

from .base import KernelShape, import_tvm, relax
from .context import Ctx
from .graph import collect_params, emit_entry
from .kinds import EMBED_LOWERINGS, check_rep
from .params import Params


def check_lowerable(model: ir.Model) -> None:
    """What the kinds check of targets.base.unsupported cannot see (representations nested in others,
    the embedding, the sparse FFN's codes) is refused here, before any work, rather than silently dropped."""
    if model.emb.weight.kind not in EMBED_LOWERINGS:
        raise RwkvcError(f"the TVM targets have no lowering for a {model.emb.weight.kind} embedding "
                         f"(they lower {', '.join(sorted(EMBED_LOWERINGS))})")
    for i, blk in enumerate(model.blocks):
        for part, mix in (("att", blk.att), ("ffn", blk.ffn)):
            for m, lin in mix.lin.items():
                check_rep(f"blocks.{i}.{part}.{m}", lin.weight)
        sp = blk.ffn.sparse
        if sp is not None and sp.q_codes is not None and not 1 <= sp.q_bits <= 8:
            raise RwkvcError(f"the TVM targets read sparse-FFN key codes of 1..8 bits, not {sp.q_bits} (blocks.{i})")
    check_rep("head", model.head.weight)


def build_module(model: ir.Model, ks: KernelShape, P: Params | None = None):
    """The Relax IRModule (step + prefill) and its Params (collected in memory where none is given)."""
    import_tvm()
    check_lowerable(model)
    P = P or collect_params(model, ks)
    bb = relax.BlockBuilder()
    ctx = Ctx(bb, ks, model.config)
    emit_entry(ctx, model, P, prefill=False)
    emit_entry(ctx, model, P, prefill=True)
    return bb.get(), P


def write_params(model: ir.Model, out_dir: str, ks: KernelShape, weights: str = "weights.bin") -> Params:
    """weights.bin written parameter by parameter as they are made (big ones a block of rows at a time, from
    the IR's lazily read arrays): a compile holds about one block, not the model. The Params keeps each
    parameter's Spec for the Relax functions; write_index writes params.json."""
    path = os.path.join(out_dir, weights)
    with open(path, "wb") as f:
        return collect_params(model, ks, Params(f))


def compile_model(model: ir.Model, out_dir: str, target: dict, ks: KernelShape, lib_name: str = "model.so",
                  fcompile=None, progress=None) -> dict:
    """Lower, build and export: writes weights.bin (streamed), lib_name, params.json into out_dir; returns
    manifest fields. The Relax module takes the weights as its `params` argument (no constants), and its
    kernels are made once per shape (Ctx.kernel) and its layer functions once per signature (graph.py), so
    TVM's build holds the code, not the weights."""
    tvm = import_tvm()
    check_lowerable(model)
    P = write_params(model, out_dir, ks)
    if progress:
        progress("weights")
    mod, P = build_module(model, ks, P)
    if progress:
        progress("relax")
    tgt = tvm.target.Target(target)
    with tgt:
        ex = tvm.compile(mod, target=tgt)
    if progress:
        progress("build")
    kw = {"fcompile": fcompile} if fcompile is not None else {}
    ex.export_library(os.path.join(out_dir, lib_name), **kw)
    fields = P.write_index(out_dir)
    return {"library": lib_name, **fields, "entry_points": {"step": "step", "prefill": "prefill"},
            "tvm_target": target, "kernel": {"panel": ks.panel, "rows": ks.rows, "lanes": ks.lanes},
            "tvm_version": tvm.__version__, "dtype": "float32", "weight_dtype": ks.weights}
