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


@pytest.fixture(scope="module", params=["fp32", "int4"])
def model(request, ckpt):
    path, d = ckpt
    passes = "" if request.param == "fp32" else "int4(group=32)"
    return request.param, rwkvc.load(rwkvc.compile(path, d / request.param, passes=passes))


def separate(m, prompt, first, n):
    """Logits of n greedy steps of one sequence with the artifact's own step, and the tokens fed."""
    _, st = m.forward(m.encode(prompt))
    out, toks, tok = [], [], first
    for _ in range(n):
        toks.append(tok)
        lg, st = m.forward([tok], st)
        out.append(lg.copy())
        tok = int(np.argmax(lg))
    return np.stack(out), toks


def test_batched_decode_equals_separate_decodes(model):
    kind, m = model
    assert has_batch_step(m.manifest)
    g = onnx.load(str(m.path / m.manifest["entry_points"]["batch_step"]), load_external_data=False)
    assert not g.graph.initializer or all(t.data_location == onnx.TensorProto.EXTERNAL or t.name.startswith("c_")
                                          for t in g.graph.initializer)   # the weights are the prefill's, shared
    if kind == "fp32":
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
                moved = pool.remove(slot)
                live[slot] = live[moved]
                live.pop()
    for i in range(len(prompts)):
        assert_logits_match(np.stack(got[i]), refs[i][0], f"{kind} sequence {i}", flips=1 if kind == "int4" else 0)
    assert pool.n == 0


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
