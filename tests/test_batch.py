"""The batched decode step (targets/onnx/batch.py, runtimes/ort_batch.py): B sequences, each with its own
state, joining and leaving between steps, give the logits of B separate decodes."""
import numpy as np
import onnx
import pytest

import rwkvc
from rwkvc.runtimes.ort_batch import BatchPool, has_batch_step
from rwkvc.testing import save_random_v7

from helpers import assert_logits_match


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    return save_random_v7(d / "m.pth", n_layer=2, n_embd=64, head_size=32, vocab_size=65536, seed=11), d


@pytest.fixture(scope="module", params=["fp32", "int4", "int8", "fp32-plain"])
def model(request, ckpt):
    """fp32-plain: compiled --no-fused, whose batched graphs do the element-wise work in plain operators."""
    path, d = ckpt
    passes = {"fp32": "", "int4": "int4(group=32)", "int8": "int8", "fp32-plain": ""}[request.param]
    options = {"fused": False} if request.param == "fp32-plain" else None
    return request.param, rwkvc.load(rwkvc.compile(path, d / request.param, passes=passes, options=options))


def separate(m, prompt, first, n):
    """Logits of n greedy steps of one sequence with the artifact's own step, the tokens fed, the last state."""
    _, st = m.forward(m.encode(prompt))
    out, toks, tok = [], [], first
    for _ in range(n):
        toks.append(tok)
        lg, st = m.forward([tok], st)
        out.append(lg.copy())
        tok = int(np.argmax(lg))
    return np.stack(out), toks, st


def assert_states_match(got, ref, what):
    np.testing.assert_allclose(got.shift, ref.shift, rtol=1e-4, atol=2e-5, err_msg=f"{what}: shift")
    np.testing.assert_allclose(got.wkv, ref.wkv, rtol=1e-4, atol=2e-5, err_msg=f"{what}: wkv")   # errors ~1e-6


def test_batch_step_runs_on_the_batched_kernels(model):
    """The fused artifacts' batched step does its element-wise work in the batched kernels (op set 8) and
    its 4-bit and int8 products in Rwkv7MatMulSet, no per-sequence plain-operator WKV left."""
    kind, m = model
    g = onnx.load(str(m.path / m.manifest["entry_points"]["batch_step"]), load_external_data=False)
    ops = {n.op_type for n in g.graph.node}
    L = m.config.n_layer
    if kind == "fp32-plain":
        assert not any(n.domain == "ai.rwkvc" for n in g.graph.node) and not BatchPool(m.runtime, 2).in_place
        return
    assert {"Rwkv7Mix6B", "Rwkv7Mix1B", "Rwkv7WkvStepB"} <= ops
    assert sum(n.op_type == "Rwkv7WkvStepB" for n in g.graph.node) == L
    assert not ops & {"Sub", "ReduceL2", "ReduceSum", "Exp"}                       # the plain operators' WKV, gone
    assert sum(n.op_type == "LayerNormalization" for n in g.graph.node) == 1       # ln_out's only
    if kind != "fp32":   # the quantised products: Rwkv7MatMulSet over the interleaved layouts
        assert "Rwkv7MatMulSet" in ops and not ops & {"Rwkv7MatVecQ16", "Rwkv7MatVecSet"}


def test_batched_decode_equals_separate_decodes(model):
    kind, m = model
    assert has_batch_step(m.manifest)
    g = onnx.load(str(m.path / m.manifest["entry_points"]["batch_step"]), load_external_data=False)
    assert not g.graph.initializer or all(t.data_location == onnx.TensorProto.EXTERNAL or t.name.startswith("c_")
                                          for t in g.graph.initializer)   # the weights are the prefill's, shared
    if kind == "fp32-plain":
        onnx.checker.check_model(str(m.path / "batch_step.onnx"), full_check=True)
    prompts = ["The quick brown fox", "Hello", "Once upon a time there was", "1 2 3", "Z"]
    n = 6
    refs = [separate(m, p, 100 + 7 * i, n) for i, p in enumerate(prompts)]
    # sequences ask to join at steps 0, 0, 0, 2, 3 (max 4 live: the last waits for room) and each leaves after
    # its n tokens, the live block compacted (the last slot's sequence moves into the freed one)
    join = [0, 0, 0, 2, 3]
    waiting = list(range(len(prompts)))
    pool = BatchPool(m.runtime, max_batch=4)
    live: list[list] = []            # [sequence, tokens fed so far]
    got = {i: [] for i in range(len(prompts))}
    for step in range(40):
        for i in [i for i in waiting if join[i] <= step]:
            if pool.n < pool.max_batch:
                waiting.remove(i)
                assert pool.add(m.forward(m.encode(prompts[i]))[1]) == len(live)
                live.append([i, 0])
        if not live and not waiting:
            break
        logits = pool.step([refs[i][1][k] for i, k in live])
        for slot, (i, k) in enumerate(live):
            got[i].append(logits[slot].copy())
            live[slot][1] += 1
        for slot in reversed(range(len(live))):
            if live[slot][1] == n:
                assert_states_match(pool.state(slot), refs[live[slot][0]][2], f"{kind} sequence {live[slot][0]}")
                moved = pool.remove(slot)
                live[slot] = live[moved]
                live.pop()
    for i in range(len(prompts)):
        assert_logits_match(np.stack(got[i]), refs[i][0], f"{kind} sequence {i}", flips=int(kind != "fp32"))
    assert pool.n == 0


def test_batched_step_of_nine_sequences_at_different_positions(model):
    """Nine sequences (the batched kernels' 8-row pass and a 1-row rest), each after a prompt of another
    length, two steps together: each one's logits and state are its separate decode's."""
    kind, m = model
    prompts = [" ".join(["word"] * (i + 1)) + f" {i}" for i in range(9)]
    refs = [separate(m, p, 200 + i, 2) for i, p in enumerate(prompts)]
    pool = BatchPool(m.runtime, max_batch=9)
    for p in prompts:
        pool.add(m.forward(m.encode(p))[1])
    got = [pool.step([r[1][k] for r in refs]).copy() for k in range(2)]
    for i, r in enumerate(refs):
        assert_logits_match(np.stack([got[0][i], got[1][i]]), r[0], f"{kind} sequence {i}", flips=int(kind != "fp32"))
        assert_states_match(pool.state(i), r[2], f"{kind} sequence {i}")


def test_batch_pool_refuses_what_it_cannot_do(model):
    from rwkvc.errors import RwkvcError
    _, m = model
    pool = BatchPool(m.runtime, max_batch=1)
    pool.add(m.init_state())
    with pytest.raises(RwkvcError, match="full"):
        pool.add(m.init_state())
    with pytest.raises(RwkvcError, match="2 tokens for 1"):
        pool.step([1, 2])
    with pytest.raises(RwkvcError, match="not live"):
        pool.remove(3)
    np.testing.assert_array_equal(pool.state(0).wkv, m.init_state().wkv)


def test_batch_pool_outlives_the_model_it_was_made_from(ckpt):
    """A pool made from a runtime whose Model is gone still steps on the weights (the runtime's mappings, which
    the session reads, live as long as the pool), and its logits are those of a pool whose Model is kept."""
    import gc
    path, d = ckpt
    art = rwkvc.compile(path, d / "outlive", passes="int4(group=32)")
    kept = rwkvc.load(art)
    ref = BatchPool(kept.runtime, 2)
    pool = BatchPool(rwkvc.load(art).runtime, 2)
    gc.collect()
    for p in (ref, pool):
        p.add(kept.forward(kept.encode("one"))[1])
        p.add(kept.forward(kept.encode("two"))[1])
    toks = np.array([5, 6])
    for _ in range(3):
        a, b = ref.step(toks).copy(), pool.step(toks)
        np.testing.assert_array_equal(b, a)
        toks = a.argmax(1)


def test_batched_prefill_equals_separate_prefills(model):
    """B sequences with different incoming states advance by T tokens each in one batch_prefill call: each
    sequence's logits and state are those of the same call on that sequence alone (nothing mixes between
    sequences), and those of the artifact's own prefill graph to float rounding. In the quantised artifacts the
    prefill graph's fused kernels and the batched graph's plain operators round the float work before an
    8-bit activation quantisation differently by an ulp now and then, which can move a code by one: there a
    sequence may differ by such a flip (logits within FLIP_BOUND, the state within 3e-2, as the decode tests
    allow), a wrong state, position or sequence by far more."""
    from rwkvc.runtimes.ort_batch import has_batch_prefill, prefill_batch
    kind, m = model
    assert has_batch_prefill(m.manifest)
    if kind == "fp32-plain":
        onnx.checker.check_model(str(m.path / "batch_prefill.onnx"), full_check=True)
    states = [m.init_state()] + [m.forward(m.encode(p))[1] for p in ("Hello there", "Once upon a time", "1 2 3")]
    rng = np.random.default_rng(3)
    toks = rng.integers(0, m.config.vocab_size, size=(len(states), 37))
    logits, new = prefill_batch(m.runtime, toks, states)
    quantised = kind in ("int4", "int8")
    for b, st in enumerate(states):
        alone_logits, alone = prefill_batch(m.runtime, toks[b:b + 1], [st])
        assert_logits_match(logits[b][None], alone_logits, f"{kind} prefill sequence {b} batched / alone")
        np.testing.assert_allclose(new[b].shift, alone[0].shift, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new[b].wkv, alone[0].wkv, rtol=1e-5, atol=1e-6)
        ref_logits, ref = m.forward(toks[b], st)
        assert_logits_match(logits[b][None], ref_logits[None], f"{kind} prefill sequence {b}", flips=int(quantised))
        atol = 3e-2 if quantised else 2e-5   # float errors ~1e-6; |S| up to ~8
        np.testing.assert_allclose(new[b].shift, ref.shift, rtol=1e-4, atol=atol)
        np.testing.assert_allclose(new[b].wkv, ref.wkv, rtol=1e-4, atol=atol)


def test_engine_prefills_joining_prompts_together(model):
    """Concurrent prompts of different lengths in the serving engine: their equal-length chunks go through
    the batched prefill (the ragged tails one by one), and each request's greedy tokens are those of the
    engine prefilling them one by one."""
    import threading

    from rwkvc.sampling import SamplingConfig
    from rwkvc.serve import Engine, Job
    _, m = model
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(1, 1000, size=n)] for n in (70, 45, 100)]
    cfg = SamplingConfig(temperature=0, token_stop=(0,))

    def run(batch_prefill):
        eng = Engine(m, max_batch=4, prefill_chunk=96, batch_prefill=batch_prefill, batch_prefill_min=32)
        done, out = [threading.Event() for _ in prompts], {}
        with eng.cv:   # the worker takes all three in one turn
            for i, p in enumerate(prompts):
                eng.submit(Job((tuple(p),), 4, cfg),
                           lambda kind, d, i=i: (out.__setitem__(i, d), done[i].set()) if kind in ("done", "error")
                           else None)
        for d in done:
            assert d.wait(60)
        st = eng.stats()
        eng.close()
        return [out[i]["tokens"] for i in range(len(prompts))], st

    got, st = run(True)
    ref, st_ref = run(False)
    assert st["batched_prefills"] >= 1 and st["batched_prefill_tokens"] >= 3 * 32
    assert st_ref["batched_prefills"] == 0
    assert got == ref


def test_batch_pool_runs_a_step_graph_declaring_the_state_four_dimensional(ckpt, tmp_path):
    """Artifacts compiled before the step's shift state was (B, 2L, C) declare it (B, L, 2, C) (a Reshape after
    the Concat): BatchPool binds whatever its graph declares, and both give the same logits and states."""
    import shutil
    path, d = ckpt
    art = rwkvc.compile(path, d / "fourdim", passes="int4(group=32)")
    old = tmp_path / "old"
    shutil.copytree(art, old)
    g = onnx.load(str(old / "batch_step.onnx"), load_external_data=False)
    cat = next(n for n in g.graph.node if "shift_out" in n.output)
    assert cat.op_type == "Concat"
    cat.output[0] = "shift_rows"
    L, _, C = rwkvc.artifact.read_manifest(art)["state"]["shift"]
    g.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1, L, 2, C], np.int64), "four_dims"))
    g.graph.node.append(onnx.helper.make_node("Reshape", ["shift_rows", "four_dims"], ["shift_out"]))
    for v in (*g.graph.input, *g.graph.output):
        if v.name in ("shift_in", "shift_out"):
            v.type.CopyFrom(onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, ["B", L, 2, C]))
    onnx.save(g, str(old / "batch_step.onnx"))
    import json

    from rwkvc.integrity import file_sha256
    man = json.loads((old / "manifest.json").read_text())
    man["files"]["batch_step.onnx"] = {"sha256": file_sha256(old / "batch_step.onnx"),
                                       "bytes": (old / "batch_step.onnx").stat().st_size}
    (old / "manifest.json").write_text(json.dumps(man))
    pools = []
    for a in (art, old):
        m = rwkvc.load(a)
        pool = BatchPool(m.runtime, 3)
        for p in ("one", "two", "three"):
            pool.add(m.forward(m.encode(p))[1])
        pools.append(pool)
    assert pools[0].shift_dims == [2 * L, C] and pools[1].shift_dims == [L, 2, C]
    toks = np.array([5, 6, 7])
    for _ in range(4):
        a, b = pools[0].step(toks).copy(), pools[1].step(toks)
        np.testing.assert_array_equal(b, a)
        toks = a.argmax(1)
    for s in range(3):
        np.testing.assert_array_equal(pools[1].state(s).shift, pools[0].state(s).shift)
