"""rwkvc.onnx_index reads what the runtime needs of an artifact's graphs as onnx.load does."""
import onnx
import pytest

import rwkvc
from rwkvc.errors import RwkvcError
from rwkvc.onnx_index import read_graph
from rwkvc.pipeline import compile_checkpoint
from rwkvc.testing import save_random_v7


def _same(path):
    ref = onnx.load(str(path), load_external_data=False).graph
    got = read_graph(path)
    assert [(n.op_type, n.domain, list(n.input), list(n.output)) for n in ref.node] == \
           [(n.op_type, n.domain, n.input, n.output) for n in got.node]
    assert len(got.initializer) == len(ref.initializer) > 0
    for r, g in zip(ref.initializer, got.initializer):
        assert (r.name, list(r.dims), r.data_type, r.data_location) == (g.name, g.dims, g.data_type, g.data_location)
        assert {e.key: e.value for e in r.external_data} == g.external()
        assert g.dtype == onnx.helper.tensor_dtype_to_np_dtype(r.data_type)
    return got


@pytest.mark.parametrize("passes", ["", "sparse-ffn,hhead,int4(group=32),lazy-emb(storage=int8)"])
def test_graphs_read_as_onnx_reads_them(tmp_path, passes):
    ckpt = save_random_v7(tmp_path / "m.pth", n_layer=2, n_embd=64, head_size=32, vocab_size=65536, seed=1)
    out = tmp_path / "a"
    compile_checkpoint(ckpt, out, passes=passes or None)
    entries = rwkvc.artifact.read_manifest(out)["entry_points"]
    external = 0
    for fn in entries.values():
        g = _same(out / fn)
        external += sum(t.data_location == 1 for t in g.initializer)
    assert external > 0


def test_a_damaged_graph_is_one_error(tmp_path):
    ckpt = save_random_v7(tmp_path / "m.pth", n_layer=1, n_embd=64, head_size=32, vocab_size=256, seed=1)
    compile_checkpoint(ckpt, tmp_path / "a")
    data = (tmp_path / "a" / "step.onnx").read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(RwkvcError, match="not a readable ONNX graph"):
        read_graph(bad)


def test_prepack_only_where_the_packed_copies_fit(monkeypatch):
    """runtimes/ort_weights.prepack_fits: ONNX Runtime pre-packs the float matrices (a copy a session) only
    where the weights and two such copies take at most half the available memory; the held dense embedding
    and tables read by rows are never packed, and a quantised artifact (no float matrices) always may."""
    import numpy as np
    from rwkvc.runtimes import ort_weights as W
    f32, u8 = np.dtype(np.float32), np.dtype(np.uint8)
    idx = W.GraphIndex(weights={
        "emb": W.Weight("emb", f32, (65536, 64), "weights.bin", 0, 0),            # 16 MiB, held
        "head": W.Weight("head", f32, (65536, 64), "weights.bin", 0, 0),          # 16 MiB, packed
        "rows": W.Weight("rows", f32, (4096, 256), "weights.bin", 0, 0),          # 4 MiB, read by rows
        "q": W.Weight("q", u8, (4096, 4096), "weights.bin", 0, 0),                 # 16 MiB of codes
        "vec": W.Weight("vec", f32, (64,), "weights.bin", 0, 0)})
    idx.rows = {"rows"}
    total, floats = W.float_matrix_bytes(idx, {"emb": None})
    assert floats == 16 << 20 and total == (52 << 20) + 256
    monkeypatch.setattr(W, "mem_available", lambda: 2 * (total + 2 * floats))
    assert W.prepack_fits(idx, {"emb": None})
    monkeypatch.setattr(W, "mem_available", lambda: 2 * (total + 2 * floats) - 2)
    assert not W.prepack_fits(idx, {"emb": None})
    del idx.weights["head"]
    assert W.prepack_fits(idx, {"emb": None})       # no float matrix left to pack
