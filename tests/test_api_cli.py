"""The Python API and the CLI on a small random World-vocabulary RWKV-7."""
import json
import subprocess
import sys

import numpy as np
import pytest

import rwkvc
from rwkvc.artifact import verify_hashes
from rwkvc.testing import save_random_v7


CLI = [sys.executable, "-m", "rwkvc.cli"]


def rwkvc_cli(*args, inp=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, input=inp, timeout=300)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    ckpt = save_random_v7(d / "m.pth", n_layer=2, n_embd=64, head_size=32, vocab_size=65536, seed=3)
    return rwkvc.compile(ckpt, d / "art"), ckpt


@pytest.fixture(scope="module")
def m(art):
    return rwkvc.load(art[0])


def test_forward_semantics(m):
    toks = m.encode("The quick brown fox")
    logits, state = m.forward(toks)
    assert logits.shape == (65536,) and logits.dtype == np.float32
    before = state.copy()
    l1, s1 = m.forward([42], state)
    l2, s2 = m.forward([42], state)          # the state given is not mutated, so it can be reused
    np.testing.assert_array_equal(state.wkv, before.wkv)
    np.testing.assert_array_equal(l1, l2)
    # one call over all tokens == two calls continuing the state
    l_all, _ = m.forward(toks + [42])
    np.testing.assert_allclose(l_all, l1, atol=1e-4 * max(1, np.abs(l1).max()))
    with pytest.raises(rwkvc.errors.RwkvcError):
        m.forward([])
    with pytest.raises(rwkvc.errors.RwkvcError):
        m.forward([70000])


def test_step_buffers_are_reused_only_once_dropped(m):
    """A step writes into reused buffers (runtimes.onnxruntime._StepSlots): logits and states the caller
    keeps are never overwritten, and a chain that drops them as it goes computes the same numbers."""
    from rwkvc.runtimes.onnxruntime import _StepSlots
    _, state = m.forward(m.encode("Once upon"))
    toks = list(range(11, 11 + _StepSlots.MAX + 3))    # more kept states than buffers: the rest bind per call
    kept, st = [], state
    for t in toks:
        lg, st = m.forward([t], st)
        kept.append((lg, st, lg.copy(), st.copy()))
    slots = m.runtime._slots["step"]
    assert len(slots.slots) == _StepSlots.MAX
    for lg, st, lg0, st0 in kept:
        np.testing.assert_array_equal(lg, lg0)
        np.testing.assert_array_equal(st.wkv, st0.wkv)
        np.testing.assert_array_equal(st.shift, st0.shift)
    del lg, st, kept[1:]
    st = state
    for i, t in enumerate(toks):
        lg, st = m.forward([t], st)
        if i == 0:
            np.testing.assert_array_equal(lg, kept[0][2])
    np.testing.assert_array_equal(st.wkv, st0.wkv)     # the last kept state, recomputed through reused buffers
    assert len(slots.slots) == _StepSlots.MAX
    branch = kept[0][1]                                 # two steps from one kept state
    la, _ = m.forward([5], branch)
    lb, _ = m.forward([6], branch)
    la2, _ = m.forward([5], branch)
    np.testing.assert_array_equal(la, la2)
    assert not np.array_equal(la, lb)
    np.testing.assert_array_equal(branch.wkv, kept[0][3].wkv)


def test_greedy_generation_is_the_argmax_chain(m):
    res = []
    text = "".join(m.stream("Hello", n=12, temperature=0, token_stop=(), result=res))
    logits, state = m.forward(m.encode("Hello"))
    want = []
    for _ in range(12):
        logits[list(m.tokenizer.unused_ids)] = -np.inf
        t = int(np.argmax(logits))
        want.append(t)
        logits, state = m.forward([t], state)
    assert res[0].tokens == want
    assert text == m.decode(want)
    np.testing.assert_allclose(res[0].state.wkv, state.wkv, atol=1e-5)


def test_seeded_sampling_is_reproducible(m):
    a = m.generate("Once", n=20, temperature=1.0, top_p=0.9, seed=7, token_stop=())
    b = m.generate("Once", n=20, temperature=1.0, top_p=0.9, seed=7, token_stop=())
    c = m.generate("Once", n=20, temperature=1.0, top_p=0.9, seed=8, token_stop=())
    assert a == b and a != c


def test_stop_string_and_token(m):
    full = m.generate("Once", n=30, temperature=0, token_stop=())
    stop = full[5:8]
    cut = m.generate("Once", n=30, temperature=0, token_stop=(), stop_strings=(stop,))
    assert cut == full[: full.index(stop)]
    res = []
    list(m.stream("Once", n=30, temperature=0, result=res))
    first = res[0]
    greedy_tokens = []
    list(m.stream("Once", n=30, temperature=0, token_stop=(), result=greedy_tokens))
    stop_tok = greedy_tokens[0].tokens[3]
    res2 = []
    list(m.stream("Once", n=30, temperature=0, token_stop=(stop_tok,), result=res2))
    assert res2[0].tokens == greedy_tokens[0].tokens[:greedy_tokens[0].tokens.index(stop_tok)]
    assert res2[0].stop_reason == "stop_token" and first.stop_reason in ("length", "stop_token")


def test_manifest_hashes_and_inspect(art):
    path, ckpt = art
    assert verify_hashes(path) == []
    man = json.loads((path / "manifest.json").read_text())
    assert man["target"] == "cpu" and man["model"]["n_layer"] == 2 and man["entry_points"]["step"] == "step.onnx"
    r = rwkvc_cli("inspect", ckpt, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    import torch
    sd = torch.load(ckpt, weights_only=True)
    unused = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}   # layer 0 has no value residual
    used = sum(v.numel() for k, v in sd.items() if k not in unused)
    assert info["version"] == "v7" and info["params"] == used
    assert info["components"]["embedding"]["params"] == 65536 * 64 == info["components"]["head"]["params"]
    r = rwkvc_cli("inspect", path, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["target"] == "cpu"
    r = rwkvc_cli("inspect", path)
    assert "RWKV-v7" in r.stdout and "weights.bin" in r.stdout


def test_cli_run_streams_what_the_api_generates(art, m):
    path, _ = art
    r = rwkvc_cli("run", path, "--prompt", "Once upon", "-n", "16", "--seed", "3", "--top-p", "0.9")
    assert r.returncode == 0, r.stderr
    want = m.generate("Once upon", n=16, seed=3, top_p=0.9, token_stop=(0,))
    assert r.stdout == want + "\n"
    assert "Traceback" not in r.stderr


def test_cli_state_out_in_continues(art, m, tmp_path):
    path, _ = art
    r1 = rwkvc_cli("run", path, "--prompt", "In the beginning", "-n", "0", "--state-out", tmp_path / "s.npz")
    assert r1.returncode == 0, r1.stderr
    r2 = rwkvc_cli("run", path, "--prompt", " God", "-n", "8", "--temperature", "0", "--state-in", tmp_path / "s.npz")
    r3 = rwkvc_cli("run", path, "--prompt", "In the beginning God", "-n", "8", "--temperature", "0")
    assert r2.returncode == 0 and r3.returncode == 0
    assert r2.stdout == r3.stdout


def test_cli_chat(art):
    path, _ = art
    r = rwkvc_cli("run", path, "--chat", "-n", "5", "--temperature", "0", inp="Hi there\nHow are you?\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Assistant:") == 2


def test_bench_json(art):
    r = rwkvc_cli("bench", art[0], "--json", "--tokens", "4", "--prefill", "16", "--repeat", "1")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    assert b["decode_tokens_per_s"] > 0 and b["prefill_tokens_per_s"] > 0
    assert b["peak_rss_bytes"] > 0 and b["artifact_bytes"] == sum(
        f["bytes"] for f in json.loads((art[0] / "manifest.json").read_text())["files"].values())


def test_dense_embedding_is_held_in_memory(art, m):
    """The dense embedding is only gathered, so ONNX Runtime would leave it memory-mapped (a page fault
    on the file for each new token's row); the runtime reads it into memory once, shared by both graphs,
    and the bench accounting counts it as resident with one row read per token."""
    from rwkvc.bench import weight_traffic
    from rwkvc.runtimes.onnxruntime import DENSE_EMBEDDING
    held = m.runtime.held[DENSE_EMBEDDING]
    assert held.shape == (65536, 64) and held.dtype == np.float32
    from rwkvc.weights.embedding import folded_embedding
    from rwkvc.frontend import load_model
    np.testing.assert_array_equal(held, folded_embedding(load_model(art[1])))
    w = weight_traffic(art[0])
    assert w["weight_bytes_resident"] >= held.nbytes and w["weight_bytes_mapped"] == 0
    assert w["weight_bytes_read_per_token_by_part"]["embedding"] == 64 * 4


def test_huge_pages_collapse_keeps_contents():
    """runtimes/hugepages.py advises and collapses large anonymous mappings; the contents stay the same,
    and the region is then backed by huge pages (where the kernel can: THP on, Linux >= 6.1)."""
    from rwkvc.runtimes import hugepages
    if not hugepages.enabled():
        pytest.skip("transparent huge pages are off on this machine")
    import mmap
    buf = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # its own private mapping
    a = np.frombuffer(buf, np.float32)
    a[:] = np.arange(1, a.size + 1, dtype=np.float32)
    lo_a, hi_a = a.ctypes.data, a.ctypes.data + a.nbytes
    overlap = lambda lo, hi: max(0, min(hi, hi_a) - max(lo, lo_a))  # noqa: E731
    # anonymous_regions() sees it (the kernel may have merged it with a neighbouring mapping)
    assert sum(overlap(lo, hi) for lo, hi in hugepages.anonymous_regions()) >= 48 << 20
    done = hugepages.collapse({(lo_a, hi_a)})
    np.testing.assert_array_equal(a[:5], [1, 2, 3, 4, 5])
    assert a[-1] == (16 << 20)
    if done == 0:
        pytest.skip("MADV_COLLAPSE is not supported by this kernel")
    huge = hugepages.huge_bytes(lo_a, hi_a)
    assert huge >= 32 << 20


def test_unknown_runtime_option_is_a_clear_error(art):
    with pytest.raises(rwkvc.errors.RwkvcError, match="option 'hugepages' is not one the onnxruntime runtime"):
        rwkvc.load(art[0], hugepages=False)
    assert rwkvc.load(art[0], huge_pages=False).runtime.huge_pages is False


def test_manifest_records_the_lowering_policy(art):
    """The cpu target builds its LoweringPolicy once, from the options and this host's CPU, and records it."""
    from rwkvc.host import cpu_flags
    from rwkvc.runtimes import ortops
    from rwkvc.targets.onnx import LoweringPolicy
    man = json.loads((art[0] / "manifest.json").read_text())
    fused = ortops.compiler() is not None
    assert man["lowering"] == LoweringPolicy.for_host(fused, cpu_flags()).to_dict()
    assert man["lowering"]["fused"] == ("custom_ops" in man)


def test_compile_options_are_typed(art, tmp_path):
    from rwkvc.targets.onnx import LoweringPolicy
    ckpt = art[1]
    with pytest.raises(rwkvc.errors.RwkvcError, match="unknown compile option 'fuse'"):
        rwkvc.compile(ckpt, tmp_path / "a", options={"fuse": True})
    with pytest.raises(rwkvc.errors.RwkvcError, match="fused must be True, False or None"):
        rwkvc.compile(ckpt, tmp_path / "b", options={"fused": "yes"})
    with pytest.raises(rwkvc.errors.RwkvcError, match="disagree"):
        rwkvc.compile(ckpt, tmp_path / "c", options={"fused": True, "lowering": LoweringPolicy(fused=False)})
    for field, bad in (("matvec_q", 1), ("matvec_small", -1), ("matvec_min_k", 0), ("rescale_every", 2.0)):
        with pytest.raises(rwkvc.errors.RwkvcError, match=f"LoweringPolicy.{field} must be"):
            LoweringPolicy(**{field: bad})
    pinned = LoweringPolicy(matvec_small=0)
    path = rwkvc.compile(ckpt, tmp_path / "d", options={"lowering": pinned})
    man = json.loads((path / "manifest.json").read_text())
    assert man["lowering"] == pinned.to_dict() and "custom_ops" not in man
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
