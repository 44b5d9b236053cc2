"""rwkvc's IR: a typed, inspectable description of an RWKV model.

The IR is a tree of plain dataclasses:

    Model
      config: ModelConfig              version, dims (L, C, H, N, F, V, low-rank widths)
      emb:    Embedding                a Weight of shape (V, C)
      ln0:    Norm                     folded into the embedding rows by the emitters
      blocks: [Block]
        ln1, att: TimeMix, ln2, ffn: ChannelMix (+ sparse: SparseFFN, RWKV-Lite's activation predictors)
      ln_out: Norm
      head:   Linear                   (V, C)
      init_state: State | None         a tuned / time_state initial state

Every matrix is a `Linear` whose `weight` is a *representation* (a weight kind: `Dense`, `LowRank`,
`Int8`, `Int4`, `Factored`, `Scaled`, `ClusteredHead`; the embedding's may be a `LazyEmbedding`), one
module each in rwkvc.weights, closed in `WEIGHT_KINDS`. Passes are IR -> IR rewrites that replace
representations and return a report; each lowering dispatches on the representation kind through its own
table, and a target declares which kinds it can lower.

Matrices are stored (out, in) as in PyTorch: y = x @ W.T. Vectors are 1-D, shape (C,) (the official
checkpoints' (1, 1, C) mixing vectors are squeezed on import). Tensors are numpy arrays, in float32 or
float16 (as loaded); emitters convert to the target's compute dtype.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from rwkvc.weights import (WEIGHT_KINDS, ClusteredHead, DeepEmbed, Dense, Factored, Int4, Int8,  # noqa: F401
                           LazyEmbedding, LowRank, Scaled, SparseFFN, TwoFactors)


@dataclass
class Linear:
    """A matrix of the model. `name` is its official checkpoint key without `.weight`."""
    name: str
    weight: object  # one of WEIGHT_KINDS

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def kind(self) -> str:
        return self.weight.kind


@dataclass
class Embedding:
    weight: object  # Dense (V, C); the lazy-embedding pass swaps the representation
    name: str = "emb"


@dataclass
class Norm:
    """LayerNorm over C (or GroupNorm over heads for ln_x); weight/bias (C,)."""
    weight: np.ndarray
    bias: np.ndarray
    eps: float = 1e-5
    rms: bool = False                 # RMSNorm (no centring; bias zero): the RWKV-7 hybrids' Qwen2 / Llama norms


# ----------------------------------------------------------------------------------------------
# Mixers. One vocabulary across versions: a TimeMix holds token-shift mixing vectors ("mix"),
# per-channel vectors ("vec"), matrices ("lin") and the output norm; the version decides the math.


@dataclass
class TimeMix:
    version: str
    mix: dict[str, np.ndarray]        # token-shift interpolation x + (prev - x) * mix, e.g. x_r, x_w (C,)
    vec: dict[str, np.ndarray]        # other per-channel parameters, e.g. w0 (log-log decay), u (bonus), k_k (C,)
    lin: dict[str, Linear]            # every matrix: receptance, key, value, output, w1, w2, ...
    ln_x: Norm | None = None


@dataclass
class ChannelMix:
    version: str
    mix: dict[str, np.ndarray]        # x_k (and x_r before v7)
    lin: dict[str, Linear]            # key (F, C), value (C, F) (and receptance (C, C) before v7)
    sparse: SparseFFN | None = None   # activation-sparsity predictors (RWKV-Lite), None = dense
    bias: dict[str, np.ndarray] = field(default_factory=dict)  # per-matrix output biases (a hybrid's GPT MLP)
    deep: DeepEmbed | None = None     # RWKV-7a's per-token table and s0, s1, s2 (rwkvc.weights.deepembed)


@dataclass
class Block:
    ln1: Norm
    att: TimeMix
    ln2: Norm
    ffn: ChannelMix


@dataclass(frozen=True)
class ModelConfig:
    version: str          # "7", ...
    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int
    ffn_dim: int
    lora: tuple[tuple[str, int], ...] = ()   # low-rank widths, e.g. (("w", 64), ("a", 64), ...)

    def __post_init__(self):
        for f in ("n_layer", "n_embd", "head_size", "vocab_size", "ffn_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelConfig.{f} must be a positive int, got {v!r}")
        if self.n_embd % self.head_size:
            raise ValueError(f"ModelConfig.n_embd ({self.n_embd}) is not a multiple of head_size ({self.head_size})")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The recurrent state's arrays. shift: previous token's input to time-mix [0] / channel-mix [1];
        wkv: the matrix memory (H, N, N) per layer (v5+), or v4's running (aa, bb, pp) per channel."""
        L, C, H, N = self.n_layer, self.n_embd, self.n_head, self.head_size
        wkv = (L, 3, C) if self.version == "4" else (L, H, N, N)
        return {"shift": (L, 2, C), "wkv": wkv}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora"] = dict(self.lora)
        d["n_head"] = self.n_head
        return d

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        d = {k: v for k, v in d.items() if k != "n_head"}
        d["lora"] = tuple(sorted(d.get("lora", {}).items()))
        return ModelConfig(**d)


@dataclass
class State:
    """The recurrent state, float32: shift (L, 2, C) and wkv (see ModelConfig.state_shapes)."""
    shift: np.ndarray
    wkv: np.ndarray

    @staticmethod
    def zeros(cfg: ModelConfig, zeros=lambda shape: np.zeros(shape, np.float32)) -> "State":
        """The zero state; zeros(shape) makes each float32 array (rwkvc.mapped.zero_pages for a runtime's)."""
        shp = cfg.state_shapes()
        st = State(zeros(shp["shift"]), zeros(shp["wkv"]))
        if cfg.version == "4":
            st.wkv[:, 2] = -1e38  # pp: the running max exponent starts at -inf
        return st

    def copy(self) -> "State":
        return State(self.shift.copy(), self.wkv.copy())


@dataclass
class Model:
    config: ModelConfig
    emb: Embedding
    ln0: Norm | None
    blocks: list[Block]
    ln_out: Norm
    head: Linear
    init_state: State | None = None
    passes: list[dict] = field(default_factory=list)   # reports of the passes applied, in order

    # -- walking -------------------------------------------------------------------------------
    def linears(self) -> Iterator[Linear]:
        """Every matrix of the blocks and the head (not the embedding), in model order."""
        for blk in self.blocks:
            yield from blk.att.lin.values()
            yield from blk.ffn.lin.values()
        yield self.head

    def component_params(self) -> dict[str, tuple[int, int]]:
        """(parameter count, bytes as stored) per component: embedding, time-mix, channel-mix, head, other."""
        out = {k: [0, 0] for k in ("embedding", "time-mix", "channel-mix", "head", "norms")}
        if any(blk.ffn.deep is not None for blk in self.blocks):
            out["deep-embed"] = [0, 0]    # RWKV-7a's per-token tables (s_emb and s_emb_x as loaded)

        def add(comp, arrays):
            for a in arrays:
                out[comp][0] += int(a.size)
                out[comp][1] += int(a.nbytes)

        add("embedding", self.emb.weight.arrays().values())
        add("head", self.head.weight.arrays().values())
        for blk in self.blocks:
            add("time-mix", list(blk.att.mix.values()) + list(blk.att.vec.values()))
            for lin in blk.att.lin.values():
                add("time-mix", lin.weight.arrays().values())
            if blk.att.ln_x is not None:
                add("time-mix", [blk.att.ln_x.weight, blk.att.ln_x.bias])
            add("channel-mix", blk.ffn.mix.values())
            for lin in blk.ffn.lin.values():
                add("channel-mix", lin.weight.arrays().values())
            if blk.ffn.sparse is not None:
                add("channel-mix", blk.ffn.sparse.arrays().values())
            if blk.ffn.deep is not None:
                add("channel-mix", blk.ffn.deep.arrays().values())
                add("deep-embed", blk.ffn.deep.table.arrays().values())
            add("norms", [blk.ln1.weight, blk.ln1.bias, blk.ln2.weight, blk.ln2.bias])
        add("norms", [self.ln_out.weight, self.ln_out.bias] + ([self.ln0.weight, self.ln0.bias] if self.ln0 else []))
        return {k: (v[0], v[1]) for k, v in out.items()}

    # -- printing ------------------------------------------------------------------------------
    def __str__(self) -> str:
        c = self.config
        lines = [f"Model RWKV-v{c.version}: L={c.n_layer} C={c.n_embd} H={c.n_head} N={c.head_size} "
                 f"F={c.ffn_dim} V={c.vocab_size}" + (f" lora={dict(c.lora)}" if c.lora else ""),
                 f"  emb: {self.emb.weight.describe()}" + ("  (+ln0)" if self.ln0 is not None else "")]
        for i, blk in enumerate(self.blocks):
            lines.append(f"  block {i}:")
            lines.append(f"    att v{blk.att.version}: mix[{', '.join(blk.att.mix)}] vec[{', '.join(blk.att.vec)}]")
            for k, lin in blk.att.lin.items():
                lines.append(f"      {k:<11} {lin.weight.describe()}")
            lines.append(f"    ffn: mix[{', '.join(blk.ffn.mix)}]")
            for k, lin in blk.ffn.lin.items():
                lines.append(f"      {k:<11} {lin.weight.describe()}")
            if blk.ffn.sparse is not None:
                lines.append(f"      {blk.ffn.sparse.describe()}")
            if blk.ffn.deep is not None:
                lines.append(f"      {'deep':<11} {blk.ffn.deep.describe()}")
        lines.append(f"  ln_out, head: {self.head.weight.describe()}")
        if self.init_state is not None:
            lines.append("  init_state: tuned")
        for p in self.passes:
            lines.append(f"  pass {p.get('name')}: {p.get('summary', '')}")
        return "\n".join(lines)


def verify(model: Model) -> None:
    """Check the IR's internal consistency (shapes agree with the config); raises ValueError."""
    c = model.config
    C, V, F = c.n_embd, c.vocab_size, c.ffn_dim
    if len(model.blocks) != c.n_layer:
        raise ValueError(f"IR has {len(model.blocks)} blocks, config says n_layer={c.n_layer}")
    if tuple(model.emb.weight.shape) != (V, C):
        raise ValueError(f"emb shape {model.emb.weight.shape} != (V, C) = {(V, C)}")
    if tuple(model.head.weight.shape) != (V, C):
        raise ValueError(f"head shape {model.head.weight.shape} != (V, C) = {(V, C)}")
    for i, blk in enumerate(model.blocks):
        for n, v in list(blk.att.mix.items()) + list(blk.ffn.mix.items()):
            if v.shape != (C,):
                raise ValueError(f"blocks.{i} mixing vector {n} has shape {v.shape}, expected ({C},)")
        k, vv = blk.ffn.lin["key"], blk.ffn.lin["value"]
        if k.weight.shape != (F, C) or vv.weight.shape != (C, F):
            raise ValueError(f"blocks.{i}.ffn key/value shapes {k.weight.shape}/{vv.weight.shape} disagree with F={F}, C={C}")
        if "receptance" in blk.ffn.lin and blk.ffn.lin["receptance"].weight.shape != (C, C):
            raise ValueError(f"blocks.{i}.ffn receptance shape {blk.ffn.lin['receptance'].weight.shape} != (C, C) = {(C, C)}")
        de = blk.ffn.deep
        if de is not None:
            D = de.rank
            if (de.s1.shape != (C, D) or de.s2.shape != (D, F) or de.s0.shape != (F,)
                    or tuple(de.table.shape) != (V, D * D) or tuple(de.table.s_emb_x.shape) != (D * D, C)):
                raise ValueError(f"blocks.{i} deep-embed shapes s0 {de.s0.shape}, s1 {de.s1.shape}, s2 {de.s2.shape}, "
                                 f"table {tuple(de.table.shape)}, s_emb_x {tuple(de.table.s_emb_x.shape)} disagree "
                                 f"with C={C}, F={F}, V={V}, D={D}")
        sp = blk.ffn.sparse
        if sp is not None:
            if sp.fc1 is not None and (sp.fc1.shape[1] != C or sp.fc2.shape[0] != F):
                raise ValueError(f"blocks.{i} sparse-ffn predictor {sp.fc1.shape}/{sp.fc2.shape} disagrees with F={F}, C={C}")
            if sp.q_codes is not None and sp.q_codes.shape != (F, C):
                raise ValueError(f"blocks.{i} sparse-ffn key codes {sp.q_codes.shape} != (F, C) = {(F, C)}")
