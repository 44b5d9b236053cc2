"""Calibration: token streams for the passes that learn from data, and an IR-level forward pass that
records what they need.

    tokens = load_tokens("calib.txt", limit=4096)       # .txt (World tokenizer), .npy / .npz ids, binidx prefix
    run = IRRunner(model)                                # RWKV-7 IR in PyTorch (float32), any weight kind
    for logits in run.forward(tokens, hooks=h): ...      # in chunks, carrying the state

`hooks` is any object with some of these methods (each gets torch float32 tensors of one chunk):

    linear(name, x)            the input (T, in) of every matrix, by its Linear name (before it is applied)
    ffn(i, xk, pre)            channel-mix i: its token-shifted input xk (T, C), key pre-activation (T, F)
    final(x)                   the final normalised hidden state (T, C), the head's input

The runner applies compressed representations as they will run: int8/int4 via their dequantised
matrices, low-rank factors with their activation, sparse FFNs through their predictors and clustered
heads with their cluster selection (`simulate=False` gives exact dense logits instead for the last two).
It is the "sim" counterpart of the compiled artifact, used for calibration and fast threshold search;
the accuracy numbers that matter are measured on the artifact (rwkvc.eval).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import ir
from .errors import RwkvcError
from .mapped import LazyArray

DECAY_SCALE = math.exp(-0.5)


# ----------------------------------------------------------------------------------------------
# token streams


def load_tokens(src, limit: int | None = None, tokenizer=None) -> np.ndarray:
    """Token ids (int64) from a text file (.txt or any UTF-8 file; World tokenizer), a .npy/.npz array of
    ids, a binidx prefix (PREFIX.bin + PREFIX.idx, or either file), or an array / list of ids."""
    if isinstance(src, (list, tuple, np.ndarray)):
        toks = np.asarray(src, np.int64).reshape(-1)
    else:
        p = Path(src)
        stem = p.with_suffix("") if p.suffix in (".bin", ".idx") else p
        if Path(f"{stem}.bin").is_file() and Path(f"{stem}.idx").is_file():
            from rwkvc.binidx import MMapIndexedDataset
            ds = MMapIndexedDataset(str(stem))
            toks = np.asarray(ds.tokens[: limit or len(ds.tokens)], np.int64)
        elif not p.is_file():
            raise RwkvcError(f"{p}: no such file; give a text file, a .npy of token ids or a binidx prefix")
        elif p.suffix in (".npy", ".npz"):
            toks = _token_array(p)
        else:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise RwkvcError(f"{p}: not UTF-8 text; give a text file, a .npy of token ids or a binidx prefix") from None
            if limit:  # no need to tokenise a whole book for a few thousand tokens
                text = text[: limit * 16]
            if tokenizer is None:
                from .tokenizer import WorldTokenizer
                tokenizer = WorldTokenizer()
            toks = np.asarray(tokenizer.encode(text), np.int64)
    if limit:
        toks = toks[:limit]
    if toks.size < 2:
        raise RwkvcError(f"{src}: gives {toks.size} tokens; calibration and evaluation need at least 2")
    return toks


def _token_array(p: Path) -> np.ndarray:
    """The integer token ids of a .npy (or the first array of a .npz); no pickles, no floats."""
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if not z.files:
                    raise ValueError("no arrays")
                arr = z[z.files[0]]
        else:
            arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise RwkvcError(f"{p}: not a NumPy array of token ids ({str(e).splitlines()[0][:120]}); "
                         "give integer ids saved with numpy.save") from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise RwkvcError(f"{p}: holds {arr.dtype} values, not integer token ids; save the ids as integers")
    return arr.astype(np.int64).reshape(-1)


def default_calib_tokens(n: int = 4096) -> np.ndarray:
    """Offline calibration text when none is given: the KJV (bible-kjv), else fortune/jargon if present."""
    import shutil
    import subprocess
    for cmd in (["bible", "gen1:1-gen50:26"], ["bible", "ps1:1-ps150:6"]):
        if shutil.which(cmd[0]):
            out = subprocess.run(cmd, capture_output=True, text=True).stdout
            if len(out) > 10_000:
                from .tokenizer import WorldTokenizer
                return np.asarray(WorldTokenizer().encode(out[: n * 16]), np.int64)[:n]
    raise RwkvcError("this pass needs calibration text: give --calib FILE (text, .npy token ids or a binidx prefix)")


def calib_tokens(ctx, n: int) -> np.ndarray:
    """The calibration tokens of a PassContext (at most n), or the offline default."""
    toks = getattr(ctx, "calib_tokens", None) if ctx is not None else None
    if toks is None:
        toks = default_calib_tokens(n)
        if ctx is not None:
            ctx.calib_tokens = toks
    return np.asarray(toks, np.int64)[:n]


# ----------------------------------------------------------------------------------------------
# the IR forward pass (RWKV-7)


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32)))


class IRRunner:
    def __init__(self, model: ir.Model, simulate: bool = True):
        if model.config.version not in TIME_MIXES:
            raise RwkvcError(f"calibration runs RWKV-{', '.join(sorted(TIME_MIXES))} models; this one is "
                             f"RWKV-v{model.config.version}")
        self.model, self.simulate = model, simulate
        self._fns: dict[str, object] = {}
        self.hooks = None
        self.counters: dict[str, list] = {}
        self.tokens = None                # the chunk's tokens (RWKV-7a's DeepEmbed tables are read by token)

    # -- matrices ----------------------------------------------------------------------------
    def _hook(self, name, x):
        h = self.hooks
        if h is not None and hasattr(h, "linear"):
            h.linear(name, x)

    def rep_fn(self, rep, name: str = ""):
        """A function x (T, in) -> y (T, out) (torch) applying a weight representation. The factors of a
        low-rank matrix report their own inputs to hooks.linear as NAME.a / NAME.b."""
        kind = rep.kind
        if kind in ("lowrank", "factored"):
            fa = self.rep_fn(rep.a if kind == "factored" else ir.Dense(rep.a), name + ".a")
            fb = self.rep_fn(rep.b if kind == "factored" else ir.Dense(rep.b), name + ".b")
            diag = None if rep.diag is None else _t(rep.diag)
            act = rep.act

            def f(x):
                self._hook(name + ".a", x)
                h = fa(x)
                if act in ("relu", "relu2"):
                    h = torch.relu(h)
                    if act == "relu2":
                        h = h * h
                self._hook(name + ".b", h)
                y = fb(h)
                return y + x * diag if diag is not None else y
            return f
        if kind == "clustered":
            return self._clustered_fn(rep)
        W = _t(rep.w if kind == "dense" else rep.to_dense())
        return lambda x: x @ W.T

    def lin(self, lin: ir.Linear, x: torch.Tensor, hooks=None) -> torch.Tensor:
        self._hook(lin.name, x)
        f = self._fns.get(lin.name)
        if f is None or f[0] is not lin.weight:
            f = (lin.weight, self.rep_fn(lin.weight, lin.name))
            self._fns[lin.name] = f
        return f[1](x)

    def _clustered_fn(self, ch):
        rows = _t(ch.rows_dense())
        cl = self.rep_fn(ch.cluster)
        inv = np.empty(len(ch.order), np.int64)
        inv[ch.order] = np.arange(len(ch.order))
        inv_t = torch.from_numpy(inv)
        rc = torch.from_numpy(ch.row_cluster())
        prior = torch.from_numpy(ch.row_log_prior())
        K = ch.n_clusters
        stats = self.counters.setdefault("head_rows", [0, 0])

        def f(x):
            exact = x @ rows.T                                          # (T, V) in row order
            if not self.simulate or (ch.top_p >= 1 and ch.max_k >= K) or ch.min_k >= K:
                stats[0] += exact.shape[0] * rows.shape[0]
                stats[1] += exact.shape[0]
                return exact[:, inv_t]
            logp = torch.log_softmax(cl(x), -1)                          # (T, K)
            prob = logp.exp()
            ps, ids = torch.sort(prob, -1, descending=True)
            n = (torch.cumsum(ps, -1) < ch.top_p).sum(-1) + 1
            n = n.clamp(min(ch.min_k, K), min(ch.max_k, K))
            chosen = torch.zeros_like(prob, dtype=torch.bool)
            chosen.scatter_(1, ids, torch.arange(K).expand_as(ids) < n[:, None])
            rowmask = chosen[:, rc]                                      # (T, V)
            lse = torch.logsumexp(exact.masked_fill(~rowmask, -torch.inf), -1, keepdim=True)
            log_chosen = torch.log((prob * chosen).sum(-1, keepdim=True))
            approx = logp + lse - log_chosen                            # (T, K)
            out = torch.where(rowmask, exact, approx[:, rc] + prior)
            stats[0] += int(rowmask.sum())
            stats[1] += x.shape[0]
            return out[:, inv_t]
        return f

    # -- the model -----------------------------------------------------------------------------
    def embed(self, tokens: np.ndarray) -> torch.Tensor:
        E = self.model.emb.weight
        rows = E.rows(tokens) if hasattr(E, "rows") else \
            E.w.take_rows(tokens) if isinstance(E.w, LazyArray) else np.asarray(E.w)[tokens]
        x = _t(rows)
        n = self.model.ln0
        if n is not None:
            x = torch.nn.functional.layer_norm(x, (x.shape[-1],), _t(n.weight), _t(n.bias), n.eps)
        return x

    def forward(self, tokens, state: ir.State | None = None, hooks=None, chunk: int = 256,
                want_logits: bool = True):
        """Yield the logits (T_chunk, V) (numpy float32, or None without want_logits) chunk by chunk;
        the final state is left in self.state."""
        m = self.model
        cfg = m.config
        st = state.copy() if state is not None else ir.State.zeros(cfg)
        shift = torch.from_numpy(st.shift.copy())
        wkv = torch.from_numpy(st.wkv.copy())
        tokens = self.check_tokens(tokens)
        self.hooks = hooks
        with torch.no_grad():
            for s in range(0, len(tokens), chunk):
                tk = tokens[s:s + chunk]
                self.tokens = tk                  # RWKV-7a's channel-mixes read their tables by token
                x = self.embed(tk)
                v_first = None
                for i in range(len(m.blocks)):
                    x, wkv[i], v_first = self.block(i, x, shift[i], wkv[i], v_first, hooks)
                xo = self.ln(x, m.ln_out)
                if hooks is not None and hasattr(hooks, "final"):
                    hooks.final(xo)
                logits = self.lin(m.head, xo, hooks).numpy() if want_logits else None
                yield logits
        self.state = ir.State(shift.numpy(), wkv.numpy())

    def block(self, i: int, x, shift, S, v_first, hooks=None):
        """Block i over one chunk x (T, C) of consecutive tokens (self.tokens: theirs) -> (x (T, C), S, v_first).
        shift (2, C): the block's token-shift state, updated in place; S: its wkv state, returned new;
        v_first: RWKV-7's value of block 0 for these tokens (None before block 0 and in other versions)."""
        blk = self.model.blocks[i]
        xa = self.ln(x, blk.ln1)
        dx, S, v_first = TIME_MIXES[self.model.config.version](self, blk.att, xa, shift[0], S, v_first, i, hooks)
        shift[0] = xa[-1]
        x = x + dx
        xf = self.ln(x, blk.ln2)
        x = x + self.channel_mix(blk.ffn, xf, shift[1], i, hooks)
        shift[1] = xf[-1]
        return x, S, v_first

    @staticmethod
    def ln(x, n: ir.Norm):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), _t(n.weight), _t(n.bias), n.eps)

    def check_tokens(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens, np.int64)
        V = self.model.config.vocab_size
        if tokens.size and (int(tokens.max()) >= V or int(tokens.min()) < 0):
            bad = int(tokens.max()) if int(tokens.max()) >= V else int(tokens.min())
            raise RwkvcError(f"calibration token id {bad} is outside the model's vocabulary "
                             f"({V}); calibrate with text in the model's tokenizer")
        return tokens

    @staticmethod
    def _mixes(mix: dict, x, prev):
        """xx = shift(x) - x (the first row's predecessor is prev) and x + xx * mix for each mix."""
        xx = torch.cat([prev[None], x[:-1]], 0) - x
        return xx, {k: x + xx * _t(v) for k, v in mix.items()}

    def time_mix(self, att: ir.TimeMix, x, prev, S, v_first, i, hooks):
        from rwkvc.reference.v7 import wkv7_chunked
        cfg = self.model.config
        H, N, C = cfg.n_head, cfg.head_size, cfg.n_embd
        T = x.shape[0]
        _, xm = self._mixes(att.mix, x, prev)
        L, V = att.lin, att.vec
        lin = lambda k, z: self.lin(L[k], z, hooks)  # noqa: E731
        r = lin("receptance", xm["x_r"])
        logw = -DECAY_SCALE * torch.sigmoid(_t(V["w0"]) + lin("w2", torch.tanh(lin("w1", xm["x_w"]))))
        k = lin("key", xm["x_k"])
        v = lin("value", xm["x_v"])
        iclr = torch.sigmoid(_t(V["a0"]) + lin("a2", lin("a1", xm["x_a"])))
        g = lin("g2", torch.sigmoid(lin("g1", xm["x_g"])))
        kk = torch.nn.functional.normalize((k * _t(V["k_k"])).view(T, H, N), dim=-1, p=2.0).view(T, C)
        k = k * (1 + (iclr - 1) * _t(V["k_a"]))
        if i == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(_t(V["v0"]) + lin("v2", lin("v1", xm["x_v"])))
        hv = lambda z: z.view(1, T, H, N)  # noqa: E731
        y, S2 = wkv7_chunked(hv(r), hv(torch.exp(logw)), hv(k), hv(v), hv(-kk), hv(kk * iclr), S[None].clone(),
                             chunk_len=16)
        y = y.view(T, H, N)
        y = torch.nn.functional.layer_norm(y, (N,), eps=att.ln_x.eps).view(T, C) * _t(att.ln_x.weight) + _t(att.ln_x.bias)
        bonus = (r.view(T, H, N) * k.view(T, H, N) * _t(V["r_k"]).view(H, N)).sum(-1, keepdim=True) * v.view(T, H, N)
        y = y + bonus.view(T, C)
        return lin("output", y * g), S2[0], v_first

    # -- RWKV-4, -5, -6: the projections here, the recurrences from rwkvc.reference -------------

    def time_mix_v4(self, att: ir.TimeMix, x, prev, S, v_first, i, hooks):
        _, xm = self._mixes(att.mix, x, prev)
        lin = lambda k, z: self.lin(att.lin[k], z, hooks)  # noqa: E731
        r = torch.sigmoid(lin("receptance", xm["x_r"]))
        k, v = lin("key", xm["x_k"]), lin("value", xm["x_v"])
        from rwkvc.reference.v4 import wkv4_recurrent
        w = -torch.exp(_t(att.vec["w0"]))
        y, S2 = wkv4_recurrent(w, _t(att.vec["u"]), k[None], v[None], S[None])
        return lin("output", r * y[0]), S2[0], v_first

    def _wkv5(self, att: ir.TimeMix, S, r, k, v, w):
        """The RWKV-5/6 recurrence (rwkvc.reference.v5.wkv5_recurrent), then ln_x. w: (C,) or (T, C)."""
        from rwkvc.reference.v5 import wkv5_recurrent
        cfg = self.model.config
        H, N, C = cfg.n_head, cfg.head_size, cfg.n_embd
        T = r.shape[0]
        hv = lambda z: z.reshape(1, T, H, N)  # noqa: E731
        w = w.view(H, N) if w.dim() == 1 else hv(w)
        y, S2 = wkv5_recurrent(hv(r), hv(k), hv(v), w, _t(att.vec["u"]).view(H, N), S[None])
        y = torch.nn.functional.layer_norm(y[0], (N,), eps=att.ln_x.eps).view(T, C)
        return y * _t(att.ln_x.weight) + _t(att.ln_x.bias), S2[0]

    def time_mix_v5(self, att: ir.TimeMix, x, prev, S, v_first, i, hooks):
        _, xm = self._mixes(att.mix, x, prev)
        lin = lambda k, z: self.lin(att.lin[k], z, hooks)  # noqa: E731
        r, k, v = lin("receptance", xm["x_r"]), lin("key", xm["x_k"]), lin("value", xm["x_v"])
        y, S2 = self._wkv5(att, S, r, k, v, torch.exp(-torch.exp(_t(att.vec["w0"]))))
        if "gate" in att.lin:
            y = y * torch.nn.functional.silu(lin("gate", xm["x_g"]))
        return lin("output", y), S2, v_first

    def time_mix_v6(self, att: ir.TimeMix, x, prev, S, v_first, i, hooks):
        from rwkvc.arch.v6 import MAA
        L = att.lin
        lin = lambda k, z: self.lin(L[k], z, hooks)  # noqa: E731
        D = L["maa1"].out_features // 5
        xx, _ = self._mixes({}, x, prev)
        h = torch.tanh(lin("maa1", x + xx * _t(att.mix["x_x"])))
        xm = {m: x + xx * (_t(att.mix["x_" + m]) + lin("maa2_" + m, h[:, j * D:(j + 1) * D]))
              for j, m in enumerate(MAA)}
        r, k, v = lin("receptance", xm["r"]), lin("key", xm["k"]), lin("value", xm["v"])
        gate = torch.nn.functional.silu(lin("gate", xm["g"]))
        w = torch.exp(-torch.exp(lin("w2", torch.tanh(lin("w1", xm["w"]))) + _t(att.vec["w0"])))
        y, S2 = self._wkv5(att, S, r, k, v, w)
        return lin("output", y * gate), S2, v_first

    def channel_mix(self, ffn: ir.ChannelMix, x, prev, i, hooks):
        _, xm = self._mixes(ffn.mix, x, prev)
        xk = xm["x_k"]
        pre = self.lin(ffn.lin["key"], xk, hooks)
        if hooks is not None and hasattr(hooks, "ffn"):
            hooks.ffn(i, xk, pre)
        h = torch.relu(pre) ** 2
        if ffn.deep is not None:   # RWKV-7a: the per-token DeepEmbed factor (rwkvc.weights.deepembed)
            de = ffn.deep
            rows = _t(de.table.merged_rows(self.tokens)).view(-1, de.rank, de.rank)     # (T, D, D), as stored
            ss = ((x @ _t(de.s1)).unsqueeze(1) @ rows).squeeze(1)                       # (T, D)
            h = h * (ss @ _t(de.s2) + _t(de.s0))
        if ffn.sparse is not None and self.simulate:
            mask = sparse_mask(ffn.sparse, xk)
            st = self.counters.setdefault(f"ffn.{i}", [0, 0])
            st[0] += int(mask.sum())
            st[1] += mask.numel()
            h = h * mask
        out = self.lin(ffn.lin["value"], h, hooks)
        if "receptance" in ffn.lin:   # RWKV-4/5/6
            out = torch.sigmoid(self.lin(ffn.lin["receptance"], xm["x_r"], hooks)) * out
        return out


TIME_MIXES = {"7": IRRunner.time_mix, "7a": IRRunner.time_mix, "6": IRRunner.time_mix_v6,
              "5.2": IRRunner.time_mix_v5,
              "5.1": IRRunner.time_mix_v5, "5.0": IRRunner.time_mix_v5, "4": IRRunner.time_mix_v4}


def sparse_mask(sp: ir.SparseFFN, xk: torch.Tensor) -> torch.Tensor:
    """The (T, F) bool mask of ir.SparseFFN's predictors (its docstring's maths)."""
    masks = []
    if sp.fc1 is not None:
        h = torch.relu(xk @ _t(sp.fc1).T)
        masks.append(torch.sigmoid(h @ _t(sp.fc2).T) > sp.mlp_threshold)
    if sp.q_codes is not None:
        est = sp.q_scale * (xk @ _t(sp.q_codes).T) + sp.q_zero * xk.sum(-1, keepdim=True)
        thr = torch.quantile(est, sp.q_quantile, dim=-1, keepdim=True)
        masks.append(est > thr)
    return masks[0] if len(masks) == 1 else masks[0] | masks[1]


def ir_logits(model: ir.Model, tokens, simulate: bool = True) -> np.ndarray:
    """All logits (T, V) of the IR for a token sequence (small T: it holds them all)."""
    run = IRRunner(model, simulate=simulate)
    return np.concatenate(list(run.forward(tokens)), 0)
