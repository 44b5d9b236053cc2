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

Every matrix is a `Linear` whose `weight` is a *representation* (`Dense`, `LowRank`, `ClusteredHead`;
quantised and other forms are further classes registered in `WEIGHT_KINDS`). Passes are IR -> IR
rewrites that replace representations and return a report; emitters dispatch on the representation
kind, and a target declares which kinds it can lower.

Matrices are stored (out, in) as in PyTorch: y = x @ W.T. Vectors are 1-D, shape (C,) (the official
checkpoints' (1, 1, C) mixing vectors are squeezed on import). Tensors are numpy arrays, in float32 or
float16 (as loaded); emitters convert to the target's compute dtype.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import numpy as np


# ----------------------------------------------------------------------------------------------
# Weight representations


@dataclass
class Dense:
    """W (out, in): y = x @ W.T."""
    w: np.ndarray
    kind: ClassVar[str] = "dense"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"w": self.w}

    def to_dense(self) -> np.ndarray:
        return np.asarray(self.w, dtype=np.float32)

    def describe(self) -> str:
        return f"dense {self.w.shape[0]}x{self.w.shape[1]} {self.w.dtype}"


# kind name -> representation class; passes add theirs (low-rank, quantised, ...)
WEIGHT_KINDS: dict[str, type] = {"dense": Dense}


def register_weight_kind(cls):
    WEIGHT_KINDS[cls.kind] = cls
    return cls


class TwoFactors:
    """Shape and rank of W ~ B act(A x) with a (rank, in) and b (out, rank), whatever a and b hold."""
    a: object
    b: object

    def check_factors(self):
        if self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"{type(self).__name__}: a {self.a.shape} and b {self.b.shape} disagree on the rank")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.b.shape[0], self.a.shape[1])

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@register_weight_kind
@dataclass
class LowRank(TwoFactors):
    """W ~ B act(A x) (+ diag * x): y = act(x @ A.T) @ B.T (+ x * diag).

    a (rank, in), b (out, rank). act: None, "relu" or "relu2" (squared relu), as RWKV-Lite's
    factorised projections use; diag (in,) only for square matrices.
    """
    a: np.ndarray
    b: np.ndarray
    act: str | None = None
    diag: np.ndarray | None = None
    kind: ClassVar[str] = "lowrank"

    def __post_init__(self):
        self.check_factors()
        if self.act not in (None, "relu", "relu2"):
            raise ValueError(f"LowRank.act must be None, 'relu' or 'relu2', got {self.act!r}")

    def arrays(self) -> dict[str, np.ndarray]:
        d = {"a": self.a, "b": self.b}
        if self.diag is not None:
            d["diag"] = self.diag
        return d

    def to_dense(self) -> np.ndarray:
        if self.act is not None:
            raise ValueError("a LowRank with an activation has no dense equivalent")
        w = np.asarray(self.b, np.float32) @ np.asarray(self.a, np.float32)
        if self.diag is not None:
            w = w + np.diag(np.asarray(self.diag, np.float32))
        return w

    def describe(self) -> str:
        extra = (f" act={self.act}" if self.act else "") + (" +diag" if self.diag is not None else "")
        return f"lowrank {self.shape[0]}x{self.shape[1]} rank {self.rank}{extra} {self.a.dtype}"


@register_weight_kind
@dataclass
class ClusteredHead:
    """The hierarchical (clustered) head of RWKV-Lite: W (V, C) with its rows grouped into K clusters.

    order (V,) int64    token ids sorted by cluster (a permutation of 0..V-1)
    bounds (K+1,) int64 cluster k owns rows order[bounds[k]:bounds[k+1]]
    rows (V, C)         W[order]: the head's rows, cluster by cluster (an array, or a weight representation
                        such as a quantised one: only the chosen clusters' rows are read, via emit_onnx.ROWS_MATMUL)
    cluster             a weight representation (K, C) giving cluster logits (Dense, or LowRank with
                        act "relu" for RWKV-Lite's MLP variant head_l1fc2(relu(head_l1fc1 x)))
    top_p, min_k, max_k which clusters get exact logits, per token: the most probable ones until their
                        cumulative probability reaches top_p, at least min_k and at most max_k of them

    Inference (one token, x (C,)):  p = softmax(cluster x); S = the chosen clusters;
        logit_t = rows_t . x                                           for t in a cluster of S
        logit_t = logsumexp_{s in S} logit_s + log p_c - log sum_{S} p + log q_t     for t in cluster c not in S
    so the non-chosen clusters share the mass the cluster head gives them, spread over their tokens by
    q_t = exp(log_prior_t), a fixed distribution within each cluster (rwkvc's hhead pass: the tokens' mean
    probability on calibration text), or evenly (q_t = 1/|c|, RWKV-Lite) when log_prior is None.
    With top_p >= 1 or min_k >= K every logit is exact (`to_dense` is that exact matrix).
    """
    order: np.ndarray
    bounds: np.ndarray
    rows: np.ndarray
    cluster: object
    top_p: float = 0.95
    min_k: int = 3
    max_k: int = 100
    log_prior: np.ndarray | None = None   # (V,) float32 in row order, sums to 1 (as exp) within each cluster
    kind: ClassVar[str] = "clustered"

    def __post_init__(self):
        V = self.rows.shape[0]
        if self.order.shape != (V,) or self.bounds.ndim != 1 or int(self.bounds[0]) != 0 or int(self.bounds[-1]) != V:
            raise ValueError(f"ClusteredHead: order {self.order.shape} / bounds {self.bounds.shape} do not describe {V} rows")
        if np.any(np.diff(self.bounds) < 0):
            raise ValueError("ClusteredHead.bounds must be non-decreasing")
        if tuple(self.cluster.shape) != (self.n_clusters, self.rows.shape[1]):
            raise ValueError(f"ClusteredHead: cluster head shape {tuple(self.cluster.shape)} != (K, C) = "
                             f"{(self.n_clusters, self.rows.shape[1])}")
        if self.log_prior is not None and self.log_prior.shape != (V,):
            raise ValueError(f"ClusteredHead.log_prior {self.log_prior.shape} != ({V},)")
        if not (0 < self.top_p <= 1) or self.min_k < 1 or self.max_k < self.min_k:
            raise ValueError(f"ClusteredHead: need 0 < top_p <= 1 and 1 <= min_k <= max_k, got "
                             f"top_p={self.top_p} min_k={self.min_k} max_k={self.max_k}")

    @property
    def n_clusters(self) -> int:
        return len(self.bounds) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rows.shape)

    def row_cluster(self) -> np.ndarray:
        """(V,) int64: the cluster of each row of `rows`."""
        return np.repeat(np.arange(self.n_clusters, dtype=np.int64), np.diff(self.bounds))

    def arrays(self) -> dict[str, np.ndarray]:
        d = {"order": self.order, "bounds": self.bounds}
        if isinstance(self.rows, np.ndarray):
            d["rows"] = self.rows
        else:
            d.update({"rows." + k: v for k, v in self.rows.arrays().items()})
        d.update({"cluster." + k: v for k, v in self.cluster.arrays().items()})
        if self.log_prior is not None:
            d["log_prior"] = self.log_prior
        return d

    def row_log_prior(self) -> np.ndarray:
        """(V,) log q_t in row order: log_prior, or -log |c| (uniform within each cluster)."""
        if self.log_prior is not None:
            return np.asarray(self.log_prior, np.float32)
        return -np.log(np.maximum(np.diff(self.bounds), 1)).astype(np.float32)[self.row_cluster()]

    def rows_dense(self) -> np.ndarray:
        return self.rows if isinstance(self.rows, np.ndarray) else self.rows.to_dense()

    def to_dense(self) -> np.ndarray:
        w = np.empty(tuple(self.rows.shape), np.float32)
        w[self.order] = self.rows_dense()
        return w

    def describe(self) -> str:
        rows = self.rows.dtype if isinstance(self.rows, np.ndarray) else self.rows.describe()
        return (f"clustered {self.shape[0]}x{self.shape[1]} K={self.n_clusters} (cluster head "
                f"{self.cluster.describe()}) top_p={self.top_p} k={self.min_k}..{self.max_k} rows {rows}")


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
class SparseFFN:
    """Activation sparsity of a channel-mix (RWKV-Lite): per token, predict which of the F hidden units
    fire and compute only those rows of `key` and columns of `value`.

    With xk (C,) the token-shifted input of `key`:
        mlp   = sigmoid(fc2 @ relu(fc1 @ xk)) > mlp_threshold                       (F,)  if fc1 is set
        q     = q_scale * (q_codes @ xk) + q_zero * sum(xk)                          (F,)  if q_codes is set
        quant = q > quantile(q, q_quantile)     (linear interpolation, as torch.quantile)
        active = mlp | quant
        h = relu(key @ xk)^2 where active, 0 elsewhere;   y = value @ h
    q_codes are the `key` weight quantised to q_bits (RWKV-Lite: 1 bit, one scale and zero point for the
    whole matrix), so q approximates key @ xk. A unit the predictors miss is dropped: lossy by design.
    fc1_scale / fc2_scale: the MLP predictor stored in int8 (the sparse-ffn pass's default): fc1 and fc2 are then
    exactly int8 codes times one float32 scale per output row (fc1_scale (D,), fc2_scale (F,)), the values
    every consumer computes with; a target may store the codes and scales instead.
    """
    fc1: np.ndarray | None = None          # (D, C) MLP predictor, first layer
    fc2: np.ndarray | None = None          # (F, D)
    fc1_scale: np.ndarray | None = None    # (D,) with fc2_scale: fc1 = int8 codes * fc1_scale[:, None]
    fc2_scale: np.ndarray | None = None    # (F,)
    mlp_threshold: float = 0.7
    q_codes: np.ndarray | None = None      # (F, C) uint8 codes in [0, 2^q_bits)
    q_scale: float = 1.0
    q_zero: float = 0.0
    q_bits: int = 1
    q_quantile: float = 0.95

    def __post_init__(self):
        if (self.fc1 is None) != (self.fc2 is None):
            raise ValueError("SparseFFN needs both fc1 and fc2 (or neither)")
        if self.fc1 is None and self.q_codes is None:
            raise ValueError("SparseFFN needs at least one predictor (fc1/fc2 or q_codes)")
        if self.fc1 is not None and self.fc1.shape[0] != self.fc2.shape[1]:
            raise ValueError(f"SparseFFN: fc1 {self.fc1.shape} and fc2 {self.fc2.shape} disagree on the hidden width")
        if not (0.0 <= self.q_quantile <= 1.0):
            raise ValueError(f"SparseFFN.q_quantile must be in [0, 1], got {self.q_quantile}")
        if (self.fc1_scale is None) != (self.fc2_scale is None) or (self.fc1_scale is not None and self.fc1 is None):
            raise ValueError("SparseFFN: an int8 MLP predictor needs fc1, fc2 and both scales")
        if self.fc1_scale is not None and (self.fc1_scale.shape != self.fc1.shape[:1] or self.fc2_scale.shape != self.fc2.shape[:1]):
            raise ValueError(f"SparseFFN: scales {self.fc1_scale.shape}/{self.fc2_scale.shape} do not match fc1 "
                             f"{self.fc1.shape}/fc2 {self.fc2.shape}")

    def fc_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """An int8 MLP predictor's codes: fc1 / fc1_scale, fc2 / fc2_scale (exact), int8."""
        return tuple(np.rint(np.asarray(w, np.float32) / np.where(sc == 0, 1, sc)[:, None]).astype(np.int8)
                     for w, sc in ((self.fc1, self.fc1_scale), (self.fc2, self.fc2_scale)))

    @staticmethod
    def code_bytes(F: int, C: int, bits: int) -> int:
        """The key copy's codes as a target stores them: each of F rows' C codes packed to `bits`."""
        return F * -(-C * bits // 8)

    def stored_bytes(self) -> int:
        """What a target stores of the predictors: an int8 MLP as codes and scales, key codes packed to
        q_bits (the fused kernels' layout)."""
        n = 0
        if self.fc1_scale is not None:
            n += self.fc1.size + self.fc2.size + 4 * (self.fc1_scale.size + self.fc2_scale.size)
        elif self.fc1 is not None:
            n += 4 * (self.fc1.size + self.fc2.size)
        if self.q_codes is not None:
            n += self.code_bytes(*self.q_codes.shape, self.q_bits)
        return n

    def arrays(self) -> dict[str, np.ndarray]:
        d = {}
        if self.fc1 is not None:
            d["fc1"], d["fc2"] = self.fc1, self.fc2
        if self.fc1_scale is not None:
            d["fc1_scale"], d["fc2_scale"] = self.fc1_scale, self.fc2_scale
        if self.q_codes is not None:
            d["q_codes"] = self.q_codes
        return d

    def describe(self) -> str:
        parts = []
        if self.fc1 is not None:
            parts.append(f"{'int8 ' if self.fc1_scale is not None else ''}mlp predictor "
                         f"{self.fc1.shape[1]}->{self.fc1.shape[0]}->{self.fc2.shape[0]} > {self.mlp_threshold}")
        if self.q_codes is not None:
            parts.append(f"{self.q_bits}-bit key predictor top {1 - self.q_quantile:.0%}")
        return "sparse ffn: " + " | ".join(parts)


@dataclass
class ChannelMix:
    version: str
    mix: dict[str, np.ndarray]        # x_k (and x_r before v7)
    lin: dict[str, Linear]            # key (F, C), value (C, F) (and receptance (C, C) before v7)
    sparse: SparseFFN | None = None   # activation-sparsity predictors (RWKV-Lite), None = dense


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
    def zeros(cfg: ModelConfig) -> "State":
        shp = cfg.state_shapes()
        st = State(np.zeros(shp["shift"], np.float32), np.zeros(shp["wkv"], np.float32))
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
        sp = blk.ffn.sparse
        if sp is not None:
            if sp.fc1 is not None and (sp.fc1.shape[1] != C or sp.fc2.shape[0] != F):
                raise ValueError(f"blocks.{i} sparse-ffn predictor {sp.fc1.shape}/{sp.fc2.shape} disagrees with F={F}, C={C}")
            if sp.q_codes is not None and sp.q_codes.shape != (F, C):
                raise ValueError(f"blocks.{i} sparse-ffn key codes {sp.q_codes.shape} != (F, C) = {(F, C)}")
