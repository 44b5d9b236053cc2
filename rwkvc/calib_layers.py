"""Layer-wise calibration: the model run one block at a time over all the calibration tokens, so a pass
that learns from activations holds one block's float weights and statistics, not the model's.

    run = LayerRunner(model, tokens)     # embeds every token once: x (T, C) (and RWKV-7's v_first (T, C))
    run.run(visit)                       # block 0, 1, ..., n_layer - 1, then the final norm

`visit` is any object with two methods:

    hooks(i)          -> rwkvc.calib hooks for block i (linear / ffn), or None when block i has nothing to
                         collect; i = n_layer is the final norm (hooks.final(x), the head's input)
    done(i, hooks)    -> bool. Block i's statistics are complete (over all tokens): change the block (e.g.
                         quantise its matrices in the model). True when its weights changed: the block is
                         run again to give the next block its inputs (GPTQ's sequential order: each block
                         is calibrated on the outputs of the blocks already changed)

For each block, the tokens go through it in chunks carrying that block's own state (token shift and wkv),
the same chunks and arithmetic as rwkvc.calib.IRRunner.forward (whose per-block code this reuses), so
block 0 sees exactly the inputs a whole-model forward gives it. Once a block has run, its float copies (the
runner's matrix cache) are dropped, before the visit uses its statistics; a lazily read checkpoint's pages were handed back when each matrix was
read (rwkvc.mapped.from_torch). Held across blocks: x, the next x and v_first, (T, C) float32 each.
"""
from __future__ import annotations

import torch

from . import ir
from .calib import IRRunner
from .mapped import trim_heap


class LayerRunner:
    def __init__(self, model: ir.Model, tokens, simulate: bool = True, chunk: int = 256,
                 progress: bool = False, desc: str = "calibrating"):
        self.runner = IRRunner(model, simulate=simulate)
        self.model, self.chunk, self.progress, self.desc = model, chunk, progress, desc
        self.tokens = self.runner.check_tokens(tokens)
        self.state0 = ir.State.zeros(model.config)

    def _spans(self):
        T = len(self.tokens)
        return [(s, min(s + self.chunk, T)) for s in range(0, T, self.chunk)]

    @torch.no_grad()
    def embed(self) -> torch.Tensor:
        """The embedded tokens x (T, C) (ln0 applied), chunk by chunk as IRRunner.forward embeds them."""
        return torch.cat([self.runner.embed(self.tokens[a:b]) for a, b in self._spans()], 0)

    @torch.no_grad()
    def block(self, i: int, x: torch.Tensor, v_first: torch.Tensor | None, hooks=None):
        """Block i over all tokens from a zero state: x (T, C) -> (y (T, C), v_first (T, C) or None)."""
        r = self.runner
        r.hooks = hooks
        shift = torch.from_numpy(self.state0.shift[i].copy())           # (2, C)
        S = torch.from_numpy(self.state0.wkv[i].copy())
        y = torch.empty_like(x)
        firsts = []
        for a, b in self._spans():
            r.tokens = self.tokens[a:b]
            y[a:b], S, vf = r.block(i, x[a:b], shift, S, None if v_first is None else v_first[a:b], hooks)
            if v_first is None and vf is not None:
                firsts.append(vf)
        r.hooks = None
        return y, (torch.cat(firsts, 0) if firsts else v_first)

    def run(self, visit) -> torch.Tensor:
        """Visit every block, then the final norm (see the module docstring) -> the final normalised hidden
        states (T, C)."""
        from tqdm import tqdm
        m, r = self.model, self.runner
        L = len(m.blocks)
        x = self.embed()
        v_first = None
        for i in tqdm(range(L), desc=self.desc, unit="block", disable=not self.progress, leave=False):
            hooks = visit.hooks(i)
            y, vf = self.block(i, x, v_first, hooks)
            r._fns.clear()                     # drop block i's float copies: the visit reads the model's own
            if hooks is not None and visit.done(i, hooks):     # (the visit runs outside no_grad: it may train)
                y, vf = self.block(i, x, v_first)    # the block's weights changed: run it again on them
                r._fns.clear()
            trim_heap()                        # the block's freed buffers back to the system
            x, v_first = y, vf
        del v_first
        with torch.no_grad():
            xo = torch.cat([r.ln(x[a:b], m.ln_out) for a, b in self._spans()], 0)
        hooks = visit.hooks(L)
        if hooks is not None:
            if hasattr(hooks, "final"):
                for a, b in self._spans():
                    hooks.final(xo[a:b])
            visit.done(L, hooks)
        return xo

