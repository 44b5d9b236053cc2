"""RWKV-4, -5.2 and -6 on the TVM targets (`tvm-host` in-process, `rpi5` under qemu-aarch64) against the
official `rwkv` package ('cpu fp32'), and RWKV-Lite's 5.2 layouts on `rpi5` against the cpu artifact.

Bound: max |logit diff| <= 1e-4 * max(1, max |official logit|), token by token and after each prefill chunk,
and the final state as the official package's. Checkpoints:
    v4, v5.2, v6          fp32, the parity matrix's (tests/test_parity.py: the same state dicts, so a test
                          session compiles each TVM artifact once for both modules), on both targets
    v5.2-fp16-ts          an fp16 file with a tuned state (time_state), 4 heads of 16, on rpi5; the runner
                          alone (no Python) starts from that state
The official package runs the fp16 file's values from an fp32 copy: loading RWKV-5 it rounds its decay
exp(-exp(time_decay)) to the file's dtype, which rwkvc keeps in float32 (as it does for fp32 files).

RWKV-Lite (x059: factorised projections with diagonals, MLP + 1-bit key predictors, a clustered head): the rpi5
artifact equals the same IR's cpu artifact to float tolerance, and holds the FFN's key and value.T and the
head one row per unit / token, which its kernels read only for the predicted units and the chosen clusters.
The Pi artifact stores its weights in float16 (half the bytes, widened in registers), so both artifacts are
compiled from the IR with every stored float rounded to float16 values (the ln0-folded embedding included),
which the cpu artifact holds in float32: the same numbers.
"""
import json
import subprocess

import numpy as np
import pytest

import rwkvc
from rwkvc.testing import (random_v4_state_dict, random_v5_state_dict, random_v6_state_dict, run_official_many,
                           save_state_dict)

from helpers import INT8_FLIPS, MISSING, assert_logits_match, compile_shared, compressed_ir

T = 24
CHUNKS = [1, 9, 14]
HOST, PI = "tvm-host", "rpi5"

CASES = {
    # name: (state-dict maker, kwargs, [targets]); the first three are the parity matrix's checkpoints
    "v4": (random_v4_state_dict, dict(n_layer=2, n_embd=64, vocab_size=1000, seed=sum(map(ord, "v4"))), [HOST, PI]),
    "v5.2": (random_v5_state_dict, dict(n_layer=2, n_embd=64, head_size=32, vocab_size=1000,
                                        seed=sum(map(ord, "v5.2"))), [HOST, PI]),
    "v6": (random_v6_state_dict, dict(n_layer=2, n_embd=64, head_size=32, vocab_size=1000,
                                      seed=sum(map(ord, "v6"))), [HOST, PI]),
    "v5.2-fp16-ts": (lambda **kw: with_time_state(random_v5_state_dict(**kw), 16),
                     dict(n_layer=2, n_embd=64, head_size=16, vocab_size=500, dtype="fp16", seed=11), [PI]),
}
CELLS = [(name, tgt) for name, (_, _, targets) in CASES.items() for tgt in targets]


def with_time_state(sd: dict, N: int) -> dict:
    """sd with a random tuned state blocks.N.att.time_state (H, N, N) in sd's dtype."""
    import torch
    C, dt = sd["emb.weight"].shape[1], sd["emb.weight"].dtype
    g = torch.Generator().manual_seed(1)
    L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(L):
        sd[f"blocks.{i}.att.time_state"] = (torch.randn(C // N, N, N, generator=g) / N ** 0.5).to(dt)
    return sd


def bound(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def missing(target: str) -> str | None:
    if target == "rpi5":
        return MISSING
    try:
        import tvm  # noqa: F401
    except ImportError:
        return "Apache TVM is not installed (scripts/setup_tvm.sh)"
    return None


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Every case's checkpoint, tokens and the official package's results (one subprocess for all)."""
    import torch
    out = {}
    for name, (make, kw, _) in CASES.items():
        d = tmp_path_factory.mktemp(name)
        sd = make(**kw)
        ckpt = save_state_dict(sd, d / "model.pth")
        # the official package reads the same values in float32
        ref_ckpt = ckpt if kw.get("dtype", "fp32") == "fp32" else save_state_dict(
            {k: v.to(torch.float32) for k, v in sd.items()}, d / "model-fp32.pth")
        tokens = np.random.default_rng(len(name)).integers(0, kw["vocab_size"], T).tolist()
        out[name] = dict(name=name, dir=d, sd=sd, ckpt=ckpt, ref_ckpt=ref_ckpt, tokens=tokens, runs={})
    offs = run_official_many([(c["ref_ckpt"], c["tokens"], [CHUNKS]) for c in out.values()])
    for c, off in zip(out.values(), offs):
        c["off"] = off
    return out


def artifact(c, target: str):
    return compile_shared(c["sd"], c["ckpt"], c["dir"] / target, target)


@pytest.fixture(scope="module", params=CELLS, ids=[f"{n}-{t}" for n, t in CELLS])
def cell(request, cases):
    """(case, target): the artifact fed token by token and in CHUNKS, once."""
    name, target = request.param
    why = missing(target)
    if why:
        pytest.skip(why)
    c = cases[name]
    key = target
    if key not in c["runs"]:
        art = artifact(c, target)
        m = rwkvc.load(art)
        try:
            steps, st = [], None
            for t in c["tokens"]:
                lg, st = m.forward([t], st)
                steps.append(lg)
            chunks, cst, pos = [], None, 0
            for n in CHUNKS:
                lg, cst = m.forward(c["tokens"][pos:pos + n], cst)
                pos += n
                chunks.append(lg)
        finally:
            close = getattr(m.runtime, "close", None)
            if close is not None:
                close()
        c["runs"][key] = dict(art=art, manifest=m.manifest, config=m.config, steps=np.stack(steps), state=st,
                              chunks=np.stack(chunks), chunk_state=cst)
    return dict(case=c, target=target, **c["runs"][key])


def official_state(cfg, state) -> np.ndarray:
    """Our state in the official package's flattened per-layer order (v5/v6 wkv as [key, value])."""
    parts = []
    for i in range(cfg.n_layer):
        wkv = state.wkv[i] if cfg.version == "4" else np.swapaxes(state.wkv[i], -1, -2)
        parts += [state.shift[i, 0], wkv.reshape(-1), state.shift[i, 1]]
    return np.concatenate(parts)


def test_step_by_step_matches_official(cell):
    off = cell["case"]["off"]
    for i, (got, ref) in enumerate(zip(cell["steps"], off["steps"])):
        assert got.shape == ref.shape and got.dtype == np.float32
        diff = float(np.abs(got - ref).max())
        assert diff <= bound(ref), f"token {i}: max |logit diff| {diff:.3g} > {bound(ref):.3g}"
    ours, ref = official_state(cell["config"], cell["state"]), off["state"]
    assert ours.shape == ref.shape
    diff = float(np.abs(ours - ref).max())
    assert diff <= bound(ref), f"final state: max |diff| {diff:.3g} > {bound(ref):.3g}"


def test_prefill_chunks_match_official(cell):
    off, ends = cell["case"]["off"], np.cumsum(CHUNKS) - 1
    for j, got in enumerate(cell["chunks"]):
        for ref in (off["chunks0"][j], off["steps"][ends[j]]):
            diff = float(np.abs(got - ref).max())
            assert diff <= bound(ref), f"after {ends[j] + 1} tokens (chunks {CHUNKS}): {diff:.3g} > {bound(ref):.3g}"
    ours, ref = official_state(cell["config"], cell["chunk_state"]), off["state"]
    assert float(np.abs(ours - ref).max()) <= bound(ref)


def test_manifest_records_the_version(cell):
    m = cell["manifest"]
    assert m["target"] == cell["target"] and m["model"]["version"] == cell["case"]["name"].split("-")[0][1:]


def test_runner_starts_from_the_tuned_state(cases):
    """The rpi5 runner alone (no Python): without --state-in it starts from the compiled time_state."""
    if MISSING:
        pytest.skip(MISSING)
    from rwkvc.artifact import read_manifest
    from rwkvc.runtimes.tvm_native import runner_command
    c = cases["v5.2-fp16-ts"]
    art = artifact(c, PI)
    man = read_manifest(art)
    assert man["init_state_raw"] == "init_state.bin"
    out = c["dir"] / "logits.bin"
    cmd = runner_command(art, man) + ["--artifact", str(art), "--tokens", ",".join(map(str, c["tokens"])),
                                      "--step", "--dump-logits", str(out)]
    r = subprocess.run(cmd, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    got = np.fromfile(out, np.float32).reshape(T, -1)
    for i, ref in enumerate(c["off"]["steps"]):
        assert float(np.abs(got[i] - ref).max()) <= bound(ref), f"token {i}"


def test_targets_declare_every_rwkv_version():
    """Capabilities are data: both TVM targets declare RWKV-4, 5.0-5.2, 6 and 7."""
    from rwkvc.targets import get_target
    for name in ("tvm-host", "rpi5"):
        assert get_target(name).capabilities.versions >= {"4", "5.0", "5.1", "5.2", "6", "7"}


def test_compressed_v5_on_tvm_host_matches_cpu(cases):
    """The passes' kinds on RWKV-5.2 (sparse FFN predictors with int8 rows, the clustered head with int8 rows,
    svd's factors and the other matrices in int8, the int8 lazy embedding) on tvm-host against the cpu artifact
    of the same IR, each token from the cpu artifact's state (int8 rounding flips: tests/helpers.py)."""
    if missing(HOST):
        pytest.skip(missing(HOST))
    from rwkvc.artifact import compile_to_dir
    from rwkvc.targets import get_target
    c = cases["v5.2"]
    model = compressed_ir(c["ckpt"], "sparse", "svd(rank=0.25),hhead(k=24,p=0.9,min_k=2,max_k=12),"
                                               "int8(accuracy_level=0),lazy-emb(storage=int8)", 1000)
    att = model.blocks[0].att.lin
    assert att["key"].kind == "factored" and att["key"].weight.a.kind == "int8" and model.blocks[0].ffn.sparse
    assert model.head.kind == "clustered" and model.head.weight.rows.kind == "int8"
    cpu = rwkvc.load(compile_to_dir(model, get_target("cpu"), c["dir"] / "q-cpu"))
    host = rwkvc.load(compile_to_dir(model, get_target(HOST), c["dir"] / "q-host"))
    got, ref, st = [], [], None
    for t in c["tokens"][:16]:
        got.append(host.forward([t], st)[0])
        lc, st = cpu.forward([t], st)
        ref.append(lc)
    assert_logits_match(np.stack(got), np.stack(ref), "v5.2 compressed", INT8_FLIPS)


# ----------------------------------------------------------------------------------------------
# RWKV-Lite on the Pi

LITE_V, LITE_K = 1000, 24
LITE_ATT = ("att.receptance", "att.key", "att.value", "att.gate", "ffn.receptance")


def fp16_values(model):
    """The IR with every float the float16 storage holds (matrices and their factors, the clustered head's
    rows and cluster head, the predictors' MLP, the ln0-folded embedding) rounded to float16 values."""
    import dataclasses

    from rwkvc import ir
    from rwkvc.weights.embedding import folded_embedding
    r16 = lambda a: np.asarray(a, np.float16).astype(np.float32)  # noqa: E731

    def rounded(rep):
        if rep.kind == "dense":
            return ir.Dense(r16(rep.w))
        if rep.kind == "lowrank":
            return dataclasses.replace(rep, a=r16(rep.a), b=r16(rep.b))
        assert rep.kind == "clustered", rep.kind
        return dataclasses.replace(rep, rows=r16(rep.rows), cluster=rounded(rep.cluster))
    model.emb.weight = ir.Dense(r16(folded_embedding(model)))
    model.ln0 = None
    for lin in model.linears():
        lin.weight = rounded(lin.weight)
    for blk in model.blocks:
        sp = blk.ffn.sparse
        sp.fc1, sp.fc2 = r16(sp.fc1), r16(sp.fc2)
    return model


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    if MISSING:
        pytest.skip(MISSING)
    from rwkvc.artifact import compile_to_dir
    from rwkvc.frontend import load_model
    from rwkvc.targets import get_target
    d = tmp_path_factory.mktemp("lite")
    sd = random_v5_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=LITE_V, seed=9, mlp_dim=16,
                              head_clusters=LITE_K, factorised=tuple((n, 16, True) for n in LITE_ATT))
    ckpt = save_state_dict(sd, d / "model.pth")
    cls = d / "model-cls.npy"
    np.save(cls, np.random.default_rng(7).integers(0, LITE_K, LITE_V))
    model = fp16_values(load_model(ckpt, cluster_file=cls))
    cpu = compile_to_dir(model, get_target("cpu"), d / "cpu")
    pi = compile_to_dir(model, get_target("rpi5"), d / "pi", dtype="float16")
    return dict(model=model, cpu=rwkvc.load(cpu), pi=pi,
                tokens=np.random.default_rng(5).integers(0, LITE_V, T).tolist())


def test_lite_holds_rows_the_kernels_read_selectively(lite):
    """The IR is RWKV-Lite's (factorised, predictors, clustered head) and the artifact stores the sparse FFN's
    key and value.T one row per unit and the head one row per token in cluster order, not as panels."""
    m = lite["model"]
    blk = m.blocks[0]
    assert blk.att.lin["key"].kind == "lowrank" and blk.att.lin["key"].weight.diag is not None
    assert blk.ffn.sparse is not None and blk.ffn.sparse.fc1 is not None and blk.ffn.sparse.q_bits == 1
    assert m.head.kind == "clustered"
    idx = {e["name"]: e for e in json.loads((lite["pi"] / "params.json").read_text())["params"]}
    F, C = blk.ffn.lin["key"].out_features, m.config.n_embd
    for i in range(m.config.n_layer):
        for part in ("key", "value"):
            assert idx[f"blocks.{i}.ffn.{part}.rows"]["shape"] == [F, C]
            assert f"blocks.{i}.ffn.{part}.wp" not in idx
        assert idx[f"blocks.{i}.ffn.sparse.codes"]["nbytes"] == F * C // 8      # 1-bit key codes, packed
        assert f"blocks.{i}.att.key.ap" in idx and f"blocks.{i}.att.key.diag" in idx
    assert idx["head.rows"]["shape"] == [LITE_V, C] and idx["head.bounds"]["shape"] == [LITE_K + 1]
    for name in ("head.rows", "blocks.0.ffn.key.rows", "blocks.0.att.key.ap", "emb.folded"):
        assert idx[name]["dtype"] == "float16", name                        # float16 storage
    assert idx["blocks.0.att.key.diag"]["dtype"] == idx["ln_out.weight"]["dtype"] == "float32"


def test_lite_rpi5_matches_cpu(lite):
    """Step by step from the cpu artifact's state (the masks and the cluster choice are discontinuous: a shared
    state keeps an ulp from choosing another unit later), then prefill chunks."""
    pi, cpu, toks = rwkvc.load(lite["pi"]), lite["cpu"], lite["tokens"]
    try:
        st = None
        for i, t in enumerate(toks[:12]):      # emulated steps are slow; the prefill below covers all T
            got, _ = pi.forward([t], st)
            ref, st = cpu.forward([t], st)
            assert float(np.abs(got - ref).max()) <= bound(ref), f"token {i}"
        pst = cst = None
        pos = 0
        for n in CHUNKS:
            got, pst = pi.forward(toks[pos:pos + n], cst)
            ref, cst = cpu.forward(toks[pos:pos + n], cst)
            pos += n
            assert float(np.abs(got - ref).max()) <= bound(ref), f"prefill after {pos} tokens"
        np.testing.assert_allclose(pst.wkv, cst.wkv, rtol=0, atol=1e-4 * max(1.0, float(np.abs(cst.wkv).max())))
    finally:
        pi.runtime.close()
