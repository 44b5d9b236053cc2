"""`rwkvc serve` with real clients on loopback: the official openai package (completions, chat, streaming,
stop strings, seeds), greedy text equal to `rwkvc run`'s, the prefix-state cache against cold prefills, a
bounded load test, and malformed requests answered with a 4xx and a message."""
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import rwkvc
from rwkvc.sampling import SamplingConfig
from rwkvc.serve import Engine, Job
from rwkvc.serve.chat import chat_prompt
from rwkvc.testing import save_random_v7

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CLI = [sys.executable, "-m", "rwkvc.cli"]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    ckpt = save_random_v7(d / "m.pth", n_layer=2, n_embd=64, head_size=32, vocab_size=65536, seed=5)
    return rwkvc.compile(ckpt, d / "art")


@pytest.fixture(scope="module")
def m(art):
    return rwkvc.load(art)


@pytest.fixture(scope="module")
def server(art):
    from rwkvc.serve.server import BackgroundServer
    eng = Engine(rwkvc.load(art), max_batch=8, cache_bytes=4 << 20)
    with BackgroundServer(eng, "tiny") as url:
        yield url, eng
    eng.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="none", max_retries=0, timeout=60)


def post(url, body: bytes):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_client_completion_chat_stream_stop_seed(client, m):
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0)
    want = m.generate("The quick brown", 12, temperature=0, token_stop=(0,))
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(m.encode("The quick brown"))
    # streaming gives the same text, in pieces
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="The quick brown",
                                                                   max_tokens=12, temperature=0, stream=True)]
    assert "".join(pieces) == want and len([p for p in pieces if p]) > 1
    # a stop string cuts the text before it
    stop = want[len(want) // 2:len(want) // 2 + 2]
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == want[:want.find(stop)] and r.choices[0].finish_reason == "stop"
    # chat: the World template, the same reply streamed or not; seeds reproducible
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\n\nthere"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    s = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True))
    assert a == b == s
    assert a == m.generate(chat_prompt(msgs), 10, temperature=1.0, top_p=0.9, seed=7, token_stop=(0,),
                           stop_strings=("\n\nUser:", "\n\n"))
    assert chat_prompt(msgs) == "System: Be brief.\n\nUser: Hello\nthere\n\nAssistant:"
    other = client.chat.completions.create(**{**kw, "seed": 8}).choices[0].message.content
    assert other != a
    models = client.models.list()
    assert [x.id for x in models.data] == ["tiny"]


def test_server_greedy_equals_rwkvc_run(art, client):
    prompt = "In the beginning"
    run = subprocess.run(CLI + ["run", str(art), "-p", prompt, "-n", "24", "--temperature", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert run.stdout == r.choices[0].text + "\n"


def test_prefix_cache_hit_equals_cold(art, m):
    """A request sharing a prefix resumes from the cached state: its logits and state are a cold prefill's
    (to the float rounding of prefilling in two calls instead of one)."""
    eng = Engine(m, max_batch=2, cache_bytes=64 << 20)
    try:
        enc = m.encode
        sys_ = tuple(enc("System: You answer questions about the weather in one sentence.\n\n"))
        q1, q2 = tuple(enc("User: Is it raining?\n\nAssistant:")), tuple(enc("User: Will it snow?\n\nAssistant:"))
        cfg = SamplingConfig(temperature=0)
        l1, s1, hit1 = eng.prefill(Job((sys_, q1), 4, cfg))
        l2, s2, hit2 = eng.prefill(Job((sys_, q2), 4, cfg))
        assert hit1 == 0 and hit2 == len(sys_)
        cold_l, cold_s = m.forward(list(sys_ + q2))
        tol = 1e-4 * max(1.0, float(np.abs(cold_l).max()))
        np.testing.assert_allclose(l2, cold_l, atol=tol, rtol=0)
        np.testing.assert_allclose(s2.wkv, cold_s.wkv, atol=1e-4, rtol=1e-4)
        # the same prompt again: the whole prompt from the cache, the logits exactly those cached
        l3, s3, hit3 = eng.prefill(Job((sys_, q2), 4, cfg))
        assert hit3 == len(sys_ + q2)
        np.testing.assert_array_equal(l3, l2)
        np.testing.assert_array_equal(s3.wkv, s2.wkv)
        st = eng.cache.stats()
        assert st["hits"] == 2 and st["misses"] == 1 and 0 < st["bytes"] <= st["max_bytes"]
    finally:
        eng.close()
    # a long prompt prefilled 4 tokens between steps while another sequence decodes: both get the text of
    # a separate greedy generation
    eng = Engine(m, max_batch=2, cache_bytes=0, prefill_chunk=4)
    try:
        events = {0: threading.Event(), 1: threading.Event()}
        texts = {}

        def done(i):
            return lambda kind, d: (texts.__setitem__(i, d.get("text")), events[i].set()) if kind == "done" else None
        long_prompt = "Then the people gathered at the river and spoke of the harvest to come."
        eng.submit(Job((tuple(m.encode("Short")),), 20, cfg), done(0))
        eng.submit(Job((tuple(m.encode(long_prompt)),), 6, cfg), done(1))
        assert events[0].wait(60) and events[1].wait(60)
        assert texts[0] == m.generate("Short", 20, temperature=0, token_stop=(0,))
        assert texts[1] == m.generate(long_prompt, 6, temperature=0, token_stop=(0,))
    finally:
        eng.close()


def test_load_32_clients(server, m):
    """32 concurrent clients (the openai package's async client), 256 short requests, half of them streamed:
    every one completes with its own prompt's text (greedy, so the expected text is known), within a time
    limit; sequences shared steps; the prefix cache stays within its bound."""
    import asyncio
    url, eng = server
    # 16 prompts, each sent by two clients: more distinct prompts than the cache holds (evictions), and
    # prompts another client sent a moment ago (hits)
    prompts = [f"Client {i % 16} asks about topic {i % 16 * 7 % 13}:" for i in range(32)]
    want = {p: m.generate(p, 4, temperature=0, token_stop=(0,)) for p in prompts}
    before = eng.stats()

    async def client_loop(c, i):
        out = []
        for j in range(8):
            if j % 2:
                r = await c.completions.create(model="tiny", prompt=prompts[i], max_tokens=4, temperature=0, stream=True)
                out.append("".join([ch.choices[0].text async for ch in r]))
            else:
                r = await c.completions.create(model="tiny", prompt=prompts[i], max_tokens=4, temperature=0)
                out.append(r.choices[0].text)
        return out

    async def main():
        c = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        return await asyncio.wait_for(asyncio.gather(*(client_loop(c, i) for i in range(32))), timeout=90)

    got = asyncio.run(main())
    for i, p in enumerate(prompts):
        assert got[i] == [want[p]] * 8, f"client {i}"
    st = eng.stats()
    assert st["completed"] - before["completed"] == 256
    assert st["running"] == 0 and st["waiting"] == 0 and st["failed"] == 0
    assert 4 <= st["peak_running"] <= 8 and st["mean_batch"] > 1      # sequences shared steps, at most max_batch
    pc = st["prefix_cache"]
    assert pc["bytes"] <= pc["max_bytes"] == 4 << 20 and pc["evictions"] > 0 and pc["hits"] > 0


@pytest.mark.parametrize("body, words", [
    (b"{nope", ["not valid JSON"]),
    (b'{"prompt": "x", "max_tokens": -1}', ["max_tokens"]),
    (b'{"prompt": "x", "temperature": "hot"}', ["temperature"]),
    (b'{"prompt": "x", "top_p": 0}', ["top_p"]),
    (b'{"prompt": "x", "n": 3}', ["n=1"]),
    (b'{"prompt": "x", "logprobs": 5}', ["logprobs"]),
    (b'{"prompt": [70000]}', ["70000", "vocabulary"]),
    (b'{"prompt": "x", "stop": [""]}', ["stop"]),
    (b'{"prompt": ["a", "b"]}', ["one prompt"]),
    (b'{"prompt": "x", "model": "gpt-9"}', ["gpt-9"]),
    (b'{"prompt": "x", "stop_token_ids": [99999]}', ["stop_token_ids", "99999"]),
    (b'{"prompt": "x", "ban_token_ids": [-1]}', ["ban_token_ids"]),
])
def test_malformed_completions_get_400(server, body, words):
    status, r = post(server[0] + "/completions", body)
    assert status == 400 and all(w in r["error"]["message"] for w in words), r


def test_malformed_chat_and_paths(server):
    url = server[0]
    for body, word in ((b'{"messages": []}', "messages"), (b'{"messages": [{"role": "robot", "content": "x"}]}', "role"),
                       (b'{"messages": "hi"}', "messages"), (b'[1, 2]', "body")):
        status, r = post(url + "/chat/completions", body)
        assert status == 400 and word in r["error"]["message"], r
    status, r = post(url + "/nowhere", b"{}")
    assert status == 404 and r["error"]["message"]
    status, r = post(url + "/completions", b'{"prompt": "still serving", "max_tokens": 2}')
    assert status == 200 and r["usage"]["completion_tokens"] <= 2


def test_cli_serve(art):
    p = subprocess.Popen(CLI + ["serve", str(art), "--port", "0", "--max-batch", "2", "--cache-mb", "8",
                                "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert port, line
        base = f"http://127.0.0.1:{port.group(1)}"
        for _ in range(200):
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        else:
            pytest.fail("rwkvc serve did not answer /health")
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_cli_serve_bad_options_are_one_line(art, capsys):
    from rwkvc.cli import main
    for args, words in ((["--max-batch", "0"], "--max-batch"), (["--port", "70000"], "--port"),
                        (["--cache-mb", "-1"], "--cache-mb")):
        with pytest.raises(SystemExit) as e:
            main(["serve", str(art), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and words in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# lm-evaluation-harness


MC_DOCS = [{"q": "The sky is", "choices": [" blue", " green", " loud"], "label": 0},
           {"q": "Two plus two is", "choices": [" four", " five"], "label": 0},
           {"q": "Fire is", "choices": [" cold", " hot", " wet"], "label": 1},
           {"q": "In the beginning God created", "choices": [" the heaven", " a cat"], "label": 0},
           {"q": "Water is", "choices": [" dry", " wet"], "label": 1}]


def by_hand_logprob(m, ctx: str, cont: str) -> float:
    """log p(cont | ctx) from a fresh forward over each prefix (the prefill graph, no state kept)."""
    c, whole = m.encode(ctx), m.encode(ctx + cont)
    total = 0.0
    for i in range(len(c), len(whole)):
        logits, _ = m.forward(whole[:i])
        x = logits.astype(np.float64)
        total += float(x[whole[i]] - x.max() - np.log(np.exp(x - x.max()).sum()))
    return total


def test_lm_eval_local_task_equals_accuracy_by_hand(art, m, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import rwkvc.serve.lm_eval  # noqa: F401 - registers --model rwkvc
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(
        f"task: rwkvc_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    higher_is_better: true\n")
    r = lm_eval.simple_evaluate(model="rwkvc", model_args=f"artifact={art}", tasks=["rwkvc_tiny_mc"],
                                task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    acc = r["results"]["rwkvc_tiny_mc"]["acc,none"]
    # lm-eval puts the choice after the context with a space (target_delimiter " "): " " + choice
    preds = [int(np.argmax([by_hand_logprob(m, d["q"], " " + c) for c in d["choices"]])) for d in MC_DOCS]
    assert acc == pytest.approx(np.mean([p == d["label"] for p, d in zip(preds, MC_DOCS)]))


def test_lm_eval_adapter_methods(art, m):
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace as Req

    from rwkvc.serve.lm_eval import RwkvcLM
    lm = RwkvcLM.create_from_arg_string(f"artifact={art}", {"batch_size": 1, "device": "cpu"})
    (lp, greedy), = lm.loglikelihood([Req(args=("The sky is", " blue"))])
    assert lp == pytest.approx(by_hand_logprob(m, "The sky is", " blue"), abs=1e-3)
    text = "Hello there, general"
    rolled, = lm.loglikelihood_rolling([Req(args=(text,))])
    toks = m.encode(text)
    want = sum(by_hand_logprob_tokens(m, [0] + toks[:i], toks[i]) for i in range(len(toks)))
    assert rolled == pytest.approx(want, abs=1e-3)
    gen = m.generate("Once upon", 12, temperature=0, token_stop=(0,))
    until = gen[3:5]
    out, = lm.generate_until([Req(args=("Once upon", {"until": [until], "max_gen_toks": 12}))])
    assert out == gen[:gen.find(until)]
    out, = lm.generate_until([Req(args=("Once upon", {"until": ["never appears"], "max_gen_toks": 12}))])
    assert out == gen


def by_hand_logprob_tokens(m, ctx: list, tok: int) -> float:
    x = m.forward(ctx)[0].astype(np.float64)
    return float(x[tok] - x.max() - np.log(np.exp(x - x.max()).sum()))


def test_demo_pack_round_trip(tmp_path):
    """The shipped demo model's packing: kept rows within int8 rounding, every other row their mean, the
    rest float16; and the shipped pack unpacks to a 4-layer World-vocabulary RWKV-7."""
    import torch

    from rwkvc.demo_pack import PACK, pack, unpack
    from rwkvc.testing import random_v7_state_dict
    sd = random_v7_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=300, seed=2)
    keep = np.array([5, 9, 100, 299])
    pack(sd, keep, tmp_path / "p.npz")
    back = torch.load(unpack(tmp_path / "m.pth", tmp_path / "p.npz"), weights_only=True)
    assert set(back) == set(sd)
    for name in ("emb.weight", "head.weight"):
        w, b = sd[name].numpy(), back[name].numpy()
        kept = np.r_[0, keep]
        assert np.abs(b[kept] - w[kept]).max() <= np.abs(w[kept]).max(axis=1).max() / 127 / 2 + 1e-6
        rest = np.setdiff1d(np.arange(300), kept)
        np.testing.assert_allclose(b[rest], np.broadcast_to(w[rest].mean(axis=0), b[rest].shape), rtol=1e-6, atol=1e-7)
    w = sd["blocks.0.att.receptance.weight"].numpy()
    np.testing.assert_allclose(back["blocks.0.att.receptance.weight"].numpy(), w, rtol=1e-3, atol=1e-4)
    with np.load(PACK, allow_pickle=False) as z:
        assert int(z["emb.weight.rows"]) == 65536 and z["emb.weight.q"].shape[1] == 128
        assert sum(k.startswith("t/blocks.") and k.endswith("ln1.weight") for k in z.files) == 4
    assert PACK.stat().st_size < 6e6


def test_client_gone_mid_stream_frees_its_slot(server, client):
    """A streaming client that goes away stops its generation: the engine drops it at the next step."""
    url, eng = server
    before = eng.stats()["cancelled"]
    stream = client.completions.create(model="tiny", prompt="Tell a long story:", max_tokens=5000, temperature=1.0,
                                       seed=1, stream=True, extra_body={"ban_token_ids": [0]})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    for _ in range(200):
        st = eng.stats()
        if st["cancelled"] > before and st["running"] == 0:
            break
        time.sleep(0.05)
    assert st["cancelled"] == before + 1 and st["running"] == 0      # long before its 5,000 tokens
