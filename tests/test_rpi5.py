"""`--target rpi5`: the aarch64 artifact (TVM model library + native C++ runner) against the cpu artifact.

Runs the runner under qemu-aarch64 on x86 hosts. Bounds: logits within 1e-4 * max(1, max |cpu logit|)
(fp32, the same bound as the cpu artifact against the official package), step by step and as prefill;
generated text identical to rwkvc's Python API on the cpu artifact, greedy and seeded (the runner
reimplements numpy's SeedSequence + PCG64 and the Sampler's algorithm).
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rwkvc
from rwkvc import ir
from rwkvc.errors import RwkvcError
from rwkvc.testing import save_random_v7

from helpers import INT8_FLIPS, MISSING, assert_logits_match, child_peak, compressed_ir, fp16_rounded_ir

needs_toolchain = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

L, C, N, V = 2, 128, 64, 1000
F_UNITS = 4 * C              # save_random_v7's FFN width
PROMPT = "a b c\nq"          # encodes to ids < 1000, so the small vocabulary can read it
EM_AARCH64 = 183


def bound(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    if MISSING:
        pytest.skip(MISSING)
    d = tmp_path_factory.mktemp("rpi5")
    ckpt = save_random_v7(d / "model.pth", n_layer=L, n_embd=C, head_size=N, vocab_size=V, seed=5)
    cpu = rwkvc.compile(ckpt, d / "cpu", target="cpu")
    pi = rwkvc.compile(ckpt, d / "pi", target="rpi5")
    tokens = np.random.default_rng(3).integers(0, V, 48).tolist()
    m = rwkvc.load(cpu)
    step_logits, st = [], None
    for t in tokens:
        lg, st = m.forward([t], st)
        step_logits.append(lg)
    return dict(dir=d, cpu=cpu, pi=pi, tokens=tokens, step_logits=np.stack(step_logits), cpu_state=st)


def runner(art, *args, check=True):
    from rwkvc.artifact import read_manifest
    from rwkvc.runtimes.tvm_native import runner_command
    cmd = runner_command(art, read_manifest(art)) + ["--artifact", str(art), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r


def elf_machine(path: Path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little")


@needs_toolchain
def test_artifact_is_aarch64_and_self_contained(arts):
    pi = arts["pi"]
    for f in ("model.so", "run", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so"):
        assert elf_machine(pi / f) == EM_AARCH64, f"{f} is not an aarch64 ELF"
    assert b"$ORIGIN/lib" in (pi / "run").read_bytes(), "the runner must find lib/ relative to itself"
    m = rwkvc.load(pi).manifest
    assert m["runtime"] == "tvm-native" and m["arch"] == "aarch64" and m["target"] == "rpi5"
    assert set(m["files"]) >= {"run", "model.so", "weights.bin", "params.json", "lib/libtvm_runtime.so",
                               "tokenizer/rwkv_vocab_v20230424.txt"}
    assert m["tvm_target"]["mcpu"] == "cortex-a76" and "+neon" in m["tvm_target"]["mattr"]


@needs_toolchain
def test_runner_step_by_step_matches_cpu(arts):
    out = arts["dir"] / "step.bin"
    toks = arts["tokens"]
    runner(arts["pi"], "--tokens", ",".join(map(str, toks)), "--step", "--dump-logits", out)
    got = np.fromfile(out, np.float32).reshape(len(toks), V)
    for i, ref in enumerate(arts["step_logits"]):
        diff = float(np.abs(got[i] - ref).max())
        assert diff <= bound(ref), f"token {i}: max |diff| {diff:.3g} > {bound(ref):.3g}"


@needs_toolchain
def test_runner_prefill_and_state_files_match_cpu(arts):
    d, toks = arts["dir"], arts["tokens"]
    half = len(toks) // 2
    runner(arts["pi"], "--tokens", ",".join(map(str, toks[:half])), "--state-out", d / "s1.bin",
           "--dump-logits", d / "p1.bin")
    runner(arts["pi"], "--tokens", ",".join(map(str, toks[half:])), "--state-in", d / "s1.bin",
           "--state-out", d / "s2.bin", "--dump-logits", d / "p2.bin")
    for f, i in (("p1.bin", half - 1), ("p2.bin", len(toks) - 1)):
        got, ref = np.fromfile(d / f, np.float32), arts["step_logits"][i]
        assert got.shape == (V,)
        assert float(np.abs(got - ref).max()) <= bound(ref), f
    st = np.fromfile(d / "s2.bin", np.float32)
    ref = arts["cpu_state"]
    ns = ref.shift.size
    assert st.size == ns + ref.wkv.size
    np.testing.assert_allclose(st[:ns].reshape(ref.shift.shape), ref.shift, rtol=0, atol=1e-4)
    np.testing.assert_allclose(st[ns:].reshape(ref.wkv.shape), ref.wkv, rtol=0,
                               atol=1e-4 * max(1.0, float(np.abs(ref.wkv).max())))


@needs_toolchain
@pytest.mark.parametrize("chunks", [[1, 7, 16, 24], [48]])
def test_python_runtime_under_qemu_matches_cpu(arts, chunks):
    m = rwkvc.load(arts["pi"])      # runtime tvm-native: one runner process, --serve
    toks, state, pos = arts["tokens"], None, 0
    for c in chunks:
        logits, state = m.forward(toks[pos:pos + c], state)
        pos += c
        ref = arts["step_logits"][pos - 1]
        assert logits.shape == (V,) and logits.dtype == np.float32
        assert float(np.abs(logits - ref).max()) <= bound(ref), f"after {pos} tokens"
    m.runtime.close()


GEN_CASES = {
    "greedy": (dict(temperature=0), ["--temperature", "0"]),
    "seeded": (dict(temperature=1.0, top_p=0.85, seed=7), ["--seed", "7"]),
    "seeded-penalties-topk": (dict(temperature=0.7, top_p=0.9, top_k=50, alpha_presence=0.4, alpha_frequency=0.3,
                                   alpha_decay=0.99, seed=3),
                              ["--temperature", "0.7", "--top-p", "0.9", "--top-k", "50", "--presence", "0.4",
                               "--frequency", "0.3", "--decay", "0.99", "--seed", "3"]),
}


@needs_toolchain
@pytest.mark.parametrize("case", list(GEN_CASES))
def test_generated_text_identical_to_python_api(arts, case):
    kw, args = GEN_CASES[case]
    res = []
    text = "".join(rwkvc.load(arts["cpu"]).stream(PROMPT, 40, token_stop=(0,), result=res, **kw))
    ids_file = arts["dir"] / f"ids-{case}.txt"
    r = runner(arts["pi"], "--prompt", PROMPT, "-n", 40, "--ids-out", ids_file, *args)
    ids = [int(x) for x in ids_file.read_text().strip().split(",") if x]
    assert ids == res[0].tokens
    assert r.stdout.decode("utf-8") == text + "\n"


@needs_toolchain
def test_rwkvc_run_cli_uses_qemu(arts):
    cmd = [sys.executable, "-m", "rwkvc.cli", "run", str(arts["pi"]), "-p", PROMPT, "-n", "12", "--temperature", "0"]
    r = subprocess.run(cmd, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    want = rwkvc.load(arts["cpu"]).generate(PROMPT, 12, temperature=0, token_stop=(0,))
    assert r.stdout.decode("utf-8") == want + "\n"


@needs_toolchain
def test_native_sampler_matches_python_sampler_on_the_same_logits(arts):
    """Same logits in, same tokens out: the C++ sampler against rwkvc.sampling.Sampler."""
    from rwkvc.sampling import Sampler, SamplingConfig
    from rwkvc.tokenizer import WorldTokenizer
    rng = np.random.default_rng(11)
    rows = (rng.standard_normal((64, V)) * rng.choice([0.5, 2.0, 6.0], (64, 1))).astype(np.float32)
    path = arts["dir"] / "logits.bin"
    rows.tofile(path)
    tok = WorldTokenizer()
    for kw, args in [(dict(seed=1), ["--seed", "1"]),
                     (dict(temperature=1.3, top_p=0.6, seed=2), ["--temperature", "1.3", "--top-p", "0.6", "--seed", "2"]),
                     (dict(temperature=0.8, top_k=5, alpha_presence=1.0, alpha_frequency=0.5, seed=2 ** 40 + 3),
                      ["--temperature", "0.8", "--top-k", "5", "--presence", "1.0", "--frequency", "0.5",
                       "--seed", str(2 ** 40 + 3)]),
                     (dict(temperature=0.0, alpha_frequency=2.0), ["--temperature", "0", "--frequency", "2.0"])]:
        s = Sampler(SamplingConfig(**kw), tokenizer=tok)
        want = []
        for row in rows:
            want.append(s.sample(row))
            s.observe(want[-1])
        got = runner(arts["pi"], "--sample-logits", path, *args).stdout.decode().strip()
        assert [int(x) for x in got.split(",")] == want, kw


@needs_toolchain
def test_native_rng_is_numpy_default_rng(arts):
    for seed in (0, 42, 2 ** 40 + 7):
        got = runner(arts["pi"], "--rng", seed, "-n", 6).stdout.decode().split()
        g = np.random.default_rng(seed)
        assert [float.fromhex(x) for x in got] == [g.random() for _ in range(6)]


@needs_toolchain
def test_native_tokenizer_matches_python(arts):
    from rwkvc.tokenizer import WorldTokenizer
    tok = WorldTokenizer()
    for text in ["Hello, world!", "中文 и русский 🎉\t\r\n\\'\"", "   x\u2002y\u200b", "\x01\x02\x7f"]:
        got = runner(arts["pi"], "--encode", text).stdout.decode().strip()
        assert [int(x) for x in got.split(",")] == tok.encode(text), text
    # invalid and truncated UTF-8 decode to U+FFFD exactly as Python's errors="replace"
    e2, e3, f0, bad = 0xE2 + 1, 0x82 + 1, 0xF0 + 1, 0xFF + 1   # single-byte tokens are byte + 1
    for ids in [[e2, e3], [e2, 66, e3, e3], [f0, 0x9F + 1, 67], [bad, 0xC0 + 1, 0x80 + 1, 65], [e2, e3, 0xAC + 1]]:
        got = runner(arts["pi"], "--decode", ",".join(map(str, ids))).stdout.decode("utf-8")
        assert got == tok.decode(ids), ids


@needs_toolchain
def test_fp16_weights_artifact_under_qemu(arts):
    """--dtype float16 on the Pi: fp16 panels widened in NEON registers; same numbers as the fp16-rounded IR."""
    from rwkvc.artifact import compile_to_dir
    from rwkvc.frontend import load_model
    from rwkvc.targets import get_target
    d = arts["dir"]
    model = fp16_rounded_ir(load_model(d / "model.pth"))
    cpu = compile_to_dir(model, get_target("cpu"), d / "cpu16")
    pi = compile_to_dir(model, get_target("rpi5"), d / "pi16", dtype="float16")
    toks = arts["tokens"][:16]
    runner(pi, "--tokens", ",".join(map(str, toks)), "--dump-logits", d / "l16.bin")
    ref, _ = rwkvc.load(cpu).forward(toks)
    got = np.fromfile(d / "l16.bin", np.float32)
    assert float(np.abs(got - ref).max()) <= bound(ref)


# ----------------------------------------------------------------------------------------------
# Compressed weights: packed in weights.bin, dequantised inside the kernels, against the cpu artifact.
# int8 matches the cpu artifact's integer math up to rare rounding flips (INT8_FLIPS, FLIP_BOUND: see
# tests/helpers.py); int4 (accuracy_level=1, fp32 activations) is continuous: strict 1e-4 on every token.

QUANT_CASES = {
    # name: (IR changes before the passes, recipe)
    "int8": (None, "int8(accuracy_level=0),lazy-emb(storage=int8)"),
    "int4": (None, "int4(group=32,accuracy_level=1),lazy-emb(storage=float16)"),
    # every kind at once: RWKV-Lite's FFN predictors, the clustered head (int8 rows), low-rank int8 factors
    "lite": ("sparse", "svd(rank=0.25,targets=att.r+att.k+att.v+att.o),hhead(k=24,p=0.9,min_k=2,max_k=12),"
                       "int8(accuracy_level=0),lazy-emb(storage=int8)"),
}
# Generated text is compared for int8 and int4 only: the sparse FFN's masks and the head's top-p cluster choice
# are discontinuous, so after a rounding flip (above) moves the state by an ulp, a later token can choose
# another unit or cluster and the logits then differ by percents on any two runtimes (a PyTorch emulation
# of the IR differs from ONNX Runtime the same way); the step-by-step check from a shared state covers them.
TEXT_CASES = ("int8", "int4")


@pytest.fixture(scope="module", params=list(QUANT_CASES))
def qarts(request, arts):
    from rwkvc.artifact import compile_to_dir
    from rwkvc.targets import get_target
    prep, recipe = QUANT_CASES[request.param]
    d = arts["dir"] / f"q-{request.param}"
    d.mkdir()
    model = compressed_ir(arts["dir"] / "model.pth", prep, recipe, V)
    cpu = compile_to_dir(model, get_target("cpu"), d / "cpu")
    pi = compile_to_dir(model, get_target("rpi5"), d / "pi")
    toks = arts["tokens"][:32]
    m = rwkvc.load(cpu)
    step_logits, states, st = [], [], None
    for t in toks:
        states.append(st)
        lg, st = m.forward([t], st)
        step_logits.append(lg)
    return dict(name=request.param, dir=d, cpu=cpu, pi=pi, model=model, tokens=toks, states=states,
                step_logits=np.stack(step_logits), flips=0 if request.param == "int4" else INT8_FLIPS)


@needs_toolchain
def test_compressed_weights_stay_packed(qarts, arts):
    """weights.bin holds the codes (int8: 1 byte, int4: half a byte per weight), not float copies."""
    import json
    idx = {e["name"]: e for e in json.loads((qarts["pi"] / "params.json").read_text())["params"]}
    dense_bytes = (arts["pi"] / "weights.bin").stat().st_size
    got = (qarts["pi"] / "weights.bin").stat().st_size
    big_floats = [n for n, e in idx.items()                      # float arrays other than the scales
                  if e["dtype"] == "float32" and e["nbytes"] > 8 * V and not n.endswith(("scale", "scales"))]
    if qarts["name"] == "int4":
        e = idx["blocks.0.ffn.key.q4p"]
        assert e["dtype"] == "uint8" and e["shape"][1] == C // 2              # (NB, K/2, P): two codes per byte
        assert idx["blocks.0.ffn.key.q4scales"]["shape"][1] == C // 32       # a scale per group of 32
        assert idx["emb.folded"]["dtype"] == "float16"
        assert not big_floats and got < 0.25 * dense_bytes
    else:
        assert idx["blocks.0.att.output.q8p" if qarts["name"] == "int8" else "blocks.0.att.w1.q8p"]["dtype"] == "int8"
        assert idx["emb.q8"]["dtype"] == "int8"
        assert got < 0.4 * dense_bytes
        if qarts["name"] == "lite":
            assert idx["blocks.0.att.receptance.a.q8p"]["dtype"] == "int8"     # a low-rank factor
            assert idx["head.rows.q8"]["dtype"] == "int8" and idx["head.order"]["dtype"] == "int32"
            assert idx["head.bounds"]["dtype"] == "int64"
            for m in ("key", "value"):            # sparse layers: one int8 row per unit (key, value.T), read by unit
                assert idx[f"blocks.0.ffn.{m}.q8rows"]["dtype"] == "int8"
                assert idx[f"blocks.0.ffn.{m}.q8rows"]["shape"] == [F_UNITS, C]
            codes = idx["blocks.0.ffn.sparse.codes"]                           # 1-bit key predictor, 8 per byte
            assert codes["dtype"] == "uint8" and codes["nbytes"] == F_UNITS * C // 8
            assert all(n.endswith(("sparse.fc1p", "sparse.fc2p")) for n in big_floats), big_floats  # the MLP
        else:
            assert not big_floats, big_floats
    assert rwkvc.load(qarts["pi"]).manifest["passes"], "the passes' reports are in the manifest"


@needs_toolchain
def test_compressed_step_by_step_matches_cpu(qarts):
    """Each token from the cpu artifact's state, through the runner's --serve protocol under qemu."""
    m = rwkvc.load(qarts["pi"])
    got = np.stack([m.forward([t], st)[0] for t, st in zip(qarts["tokens"], qarts["states"])])
    m.runtime.close()
    assert_logits_match(got, qarts["step_logits"], f"{qarts['name']} step by step", qarts["flips"])


@needs_toolchain
def test_compressed_prefill_matches_cpu(qarts):
    """Prefill: int8 quantises each matrix's input over the whole chunk, as the cpu artifact's prefill graph."""
    d, toks = qarts["dir"], qarts["tokens"]
    runner(qarts["pi"], "--tokens", ",".join(map(str, toks)), "--dump-logits", d / "prefill.bin")
    ref, _ = rwkvc.load(qarts["cpu"]).forward(toks)
    assert_logits_match(np.fromfile(d / "prefill.bin", np.float32)[None], ref[None], f"{qarts['name']} prefill",
                        qarts["flips"])


@needs_toolchain
@pytest.mark.parametrize("qarts", TEXT_CASES, indirect=True)
def test_compressed_seeded_text_identical(qarts):
    kw, args = GEN_CASES["seeded-penalties-topk"]
    res = []
    text = "".join(rwkvc.load(qarts["cpu"]).stream(PROMPT, 24, token_stop=(0,), result=res, **kw))
    ids_file = qarts["dir"] / "ids.txt"
    r = runner(qarts["pi"], "--prompt", PROMPT, "-n", 24, "--ids-out", ids_file, *args)
    assert [int(x) for x in ids_file.read_text().strip().split(",") if x] == res[0].tokens
    assert r.stdout.decode("utf-8") == text + "\n"


# ----------------------------------------------------------------------------------------------
# Streamed weights: the lowering writes weights.bin parameter by parameter, big ones a block of rows at a
# time from the lazily read checkpoint and spilled quantised arrays; the bytes equal the in-memory path's.

STREAM_CASES = {
    # name: (IR changes before the passes, recipe, weight dtype)
    "dense": (None, None, "float32"),
    "fp16": (None, None, "float16"),
    "int8": (None, "int8,lazy-emb(storage=int8)", "float32"),
    "int4": (None, "int8(targets=head),int4(group=32),lazy-emb(storage=float16)", "float32"),
    "lite": ("sparse", "svd(rank=0.25,targets=att.r+att.k+att.v+att.o),hhead(k=24,p=0.9,min_k=2,max_k=12,steps=2),"
                       "int8,lazy-emb(storage=int8)", "float32"),
}


def test_panels_by_blocks_equal_whole_packing(monkeypatch):
    from rwkvc.mapped import LazyArray
    from rwkvc.targets.tvm import params
    from rwkvc.weights.int8 import quantize_int8
    rng = np.random.default_rng(0)
    w = rng.standard_normal((70, 24)).astype(np.float32)          # 70 rows: the last panel of 16 is padded
    lazy = LazyArray(lambda: w.copy(), w.shape, np.float32, rows=lambda a, b: w[a:b].copy())
    monkeypatch.setattr(params, "BLOCK_BYTES", 1)                    # a panel (or a row) per block
    for src in (w, lazy):
        assert np.array_equal(params.panels(src, 16, np.float16, np.float32).load(), params.pack_panels(w, 16, np.float16))
        q, s = params.int8_rows(src)
        q0, s0 = quantize_int8(w)
        assert np.array_equal(q.load(), q0) and np.array_equal(s.load(), s0[:, None])
    codes = rng.integers(0, 256, (33, 5, 4)).astype(np.uint8)
    assert np.array_equal(params.panels(codes, 16, np.uint8).load(), params.pack_panels_raw(codes.reshape(33, 20), 16))


@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_streamed_weights_are_the_in_memory_bytes(tmp_path, monkeypatch, case):
    """A lazily read bf16 checkpoint, every tensor lazy and every quantised array spilled, blocks of one panel:
    weights.bin and params.json byte for byte those of the eagerly loaded IR packed whole in memory."""
    import filecmp

    from helpers import with_sparse_predictors
    from rwkvc import mapped
    from rwkvc.frontend import load_model
    from rwkvc.passes import PassContext
    from rwkvc.pipeline import parse_recipe, run_passes
    from rwkvc.targets.rpi5 import TARGET
    from rwkvc.targets.tvm import KernelShape, params
    from rwkvc.targets.tvm.build import write_params
    from rwkvc.targets.tvm.graph import collect_params
    prep, recipe, dtype = STREAM_CASES[case]
    ckpt = save_random_v7(tmp_path / "m.pth", n_layer=2, n_embd=128, head_size=64, vocab_size=V, seed=1,
                          dtype="bf16", dims={"w": 32, "a": 32, "v": 32, "g": 64})
    ks = KernelShape(**TARGET.capabilities.extras["kernel"], weights=dtype)
    calib = np.random.default_rng(1).integers(0, V, 128)

    def ir_of(lazy: bool, spill: str | None):
        model = load_model(ckpt, lazy=lazy)
        if prep == "sparse":
            model = with_sparse_predictors(model)
        ctx = PassContext(calib_tokens=calib, progress=False)
        ctx.spill_dir = spill
        return run_passes(model, parse_recipe(recipe), ctx) if recipe else model

    (tmp_path / "eager").mkdir()
    monkeypatch.setattr(params, "BLOCK_BYTES", 1 << 40)              # each parameter whole
    collect_params(ir_of(False, None), ks).write(str(tmp_path / "eager"))
    monkeypatch.setattr(mapped, "MIN_ELEMENTS", 1)                   # every tensor lazy, every quantised array spilled
    monkeypatch.setattr(mapped, "SPILL_BYTES", 1)
    monkeypatch.setattr(params, "BLOCK_BYTES", 1)                    # a panel (or a row) per block
    (tmp_path / "spill").mkdir()
    (tmp_path / "streamed").mkdir()
    write_params(ir_of(True, str(tmp_path / "spill")), str(tmp_path / "streamed"), ks).write_index(str(tmp_path / "streamed"))
    assert any((tmp_path / "spill").iterdir()) or not recipe         # the passes' arrays did go to scratch files
    for n in ("weights.bin", "params.json"):
        assert filecmp.cmp(tmp_path / "eager" / n, tmp_path / "streamed" / n, shallow=False), n


WRITE_SETUP = """
import torch, numpy
import rwkvc.frontend, rwkvc.targets.tvm.build
model = rwkvc.frontend.load_model(sys.argv[1], lazy=True)   # the imports and the load are not the lowering
"""
WRITE_PARAMS = """
ks = rwkvc.targets.tvm.KernelShape(panel=16, rows=4, lanes=4)
rwkvc.targets.tvm.build.write_params(model, sys.argv[2], ks).write_index(sys.argv[2])
"""


def test_weights_written_in_bounded_memory(tmp_path):
    # fp32 weights: emb + head 2 x 65536 x 512 x 4 B = 268 MB, two layers ~25 MB; the bf16 file ~150 MB. Holding
    # the packed parameters until the write peaks ~440 MB above the load, the streamed lowering ~60 MB (one block
    # of rows, its conversion and its panels); the bound is half the float32 weights.
    ckpt = save_random_v7(tmp_path / "big.pth", n_layer=2, n_embd=512, head_size=64, vocab_size=65536, seed=0,
                          dtype="bf16")
    fp32 = 2 * Path(ckpt).stat().st_size
    (tmp_path / "out").mkdir()
    base, peak = child_peak(WRITE_SETUP, WRITE_PARAMS, ckpt, tmp_path / "out")
    assert (tmp_path / "out" / "weights.bin").stat().st_size > 0.95 * fp32
    extra = peak - base
    assert extra < fp32 / 2, f"writing the weights took {extra / 1e6:.0f} MB for {fp32 / 1e6:.0f} MB of float32 weights"


def test_refuses_a_weight_kind_it_has_no_kernel_for(tmp_path):
    """Capabilities are data: an IR with an unknown representation is refused before any work."""
    from dataclasses import dataclass
    from typing import ClassVar

    from rwkvc.artifact import compile_to_dir
    from rwkvc.frontend import load_model
    from rwkvc.targets import get_target

    @dataclass
    class Int3:
        w: np.ndarray
        kind: ClassVar[str] = "int3"
        shape = property(lambda self: self.w.shape)

    model = load_model(save_random_v7(tmp_path / "m.pth", n_layer=1, n_embd=64, head_size=32, vocab_size=300))
    w = model.blocks[0].ffn.lin["key"].weight.w
    model.blocks[0].ffn.lin["key"].weight = Int3(w)
    for name in ("rpi5", "tvm-host"):
        with pytest.raises(RwkvcError, match="no kernel for weight representation.*int3"):
            compile_to_dir(model, get_target(name), tmp_path / name)
        assert not (tmp_path / name).exists()
    # nested in a kind the targets lower (a low-rank matrix whose factor was quantised to it): the
    # lowering's own check names where it is
    from rwkvc.weights.factored import Factored
    model.blocks[0].ffn.lin["key"].weight = Factored(Int3(w[:8].copy()), ir.Dense(w[:, :8].copy()))
    for name in ("rpi5", "tvm-host"):
        with pytest.raises(RwkvcError, match=r"no kernel for weight representation int3 \(blocks\.0\.ffn\.key\.a"):
            compile_to_dir(model, get_target(name), tmp_path / name)
        assert not (tmp_path / name).exists()


def test_missing_qemu_is_one_clear_line(tmp_path):
    from rwkvc.runtimes.tvm_native import runner_command
    with pytest.raises(RwkvcError) as e:
        runner_command(tmp_path, {"runner": "run"}, which=lambda _: None, machine="x86_64")
    msg = str(e.value)
    assert "\n" not in msg and "qemu-user" in msg and "apt-get install" in msg


def test_runner_sources_ship_with_the_target():
    """The runner's C++ sources and Makefile are where the target builds them from (targets/rpi5/runner/)."""
    from rwkvc.targets.rpi5 import RUNNER_DIR, RUNNER_SOURCES
    for f in (*RUNNER_SOURCES, "Makefile"):
        assert (RUNNER_DIR / f).is_file(), f"{RUNNER_DIR / f} is missing"
    make = (RUNNER_DIR / "Makefile").read_text()
    assert all(f in make for f in RUNNER_SOURCES), "the Makefile's prerequisites are the runner's sources"
