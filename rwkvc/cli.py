"""The `rwkvc` command line: inspect, compile, run, bench (and demo).

User errors (RwkvcError, bad options) print one line `error: ...` on stderr and exit 2, with no
traceback; generated text goes to stdout, diagnostics to stderr, so `rwkvc run` pipes cleanly.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .errors import RwkvcError
from .packages import PackageNameError


class _ReaderGone(Exception):
    """stdout's reader went away (`rwkvc run ... | head`)."""


def _out(text: str) -> None:
    """Generated text to stdout as it comes (click turns a broken pipe into exit status 1; a reader that has
    read enough is a normal end)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise _ReaderGone from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rwkvc")
def cli():
    """rwkvc: compile RWKV checkpoints into deployable artifacts, and run them."""


# ------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def inspect(path, as_json):
    """Describe a checkpoint (MODEL.pth/.safetensors) or a compiled artifact directory."""
    from .inspect import inspect_path
    info = inspect_path(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(info.pop("_text"))


# ------------------------------------------------------------------------------------------------
@cli.command(name="compile")
@click.argument("model")
@click.option("--target", "-t", default="cpu", show_default=True,
              help="cpu (ONNX Runtime), cuda (ONNX Runtime CUDA), rpi5 (TVM, aarch64 Cortex-A76), tvm-host (TVM, this CPU)")
@click.option("-o", "--out", "out", default=None, help="artifact directory [default: MODEL name + '-' + target]")
@click.option("--passes", default="", help='compression recipe, e.g. "svd(rank=0.25),int8"')
@click.option("--recipe", "recipe_file", default=None, help="a TOML recipe file (see docs/COMPRESSION.md)")
@click.option("--preset", "preset_name", default=None, help="a named recipe: int8, int4, int4-awq, lite, lite-max")
@click.option("--calib", default=None, help="calibration text (.txt, .npy token ids or binidx prefix) for passes that learn from data")
@click.option("--calib-tokens", type=int, default=4096, show_default=True, help="calibration tokens to use")
@click.option("--dtype", default=None, help="compute dtype (the target's default if omitted)")
@click.option("--force", is_flag=True, help="replace an existing output directory")
@click.option("--dump-ir", default=None, help="write the IR after each pass into this directory")
@click.option("--cluster-file", default=None, help="RWKV-Lite vocabulary clusters (*-cls.npy) for its hierarchical head")
@click.option("--state", "state_path", default=None,
              help="a tuned state (train.py --train_type states) baked in as the artifact's initial state")
@click.option("--fused/--no-fused", default=None,
              help="cpu target: run the step's element-wise work on rwkvc's fused kernels (RWKV-7, float32; "
                   "built once with g++) [default: where they apply and g++ exists]")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
def compile_cmd(model, target, out, passes, recipe_file, preset_name, calib, calib_tokens, dtype, force, dump_ir,
                cluster_file, state_path, fused, quiet):
    """Compile a checkpoint into an artifact directory."""
    from .pipeline import compile_checkpoint, parse_recipe
    from rwkvc.passes import PassContext
    from rwkvc.passes.presets import needs_calibration, resolve
    from rwkvc.targets import get_target
    get_target(target)  # unknown target: fail before reading anything
    from rwkvc.targets.gpt_onnx import export_gpt, is_gpt_checkpoint
    if is_gpt_checkpoint(model):   # train.py --model gpt: exported as it is (docs/COMPARISON.md)
        given = [n for n, v in (("--passes", passes), ("--recipe", recipe_file), ("--preset", preset_name),
                                ("--state", state_path), ("--cluster-file", cluster_file), ("--dump-ir", dump_ir),
                                ("--fused", fused), ("--dtype", dtype not in (None, "float32"))) if v]
        if target != "cpu" or given:
            raise RwkvcError(f"{model} is a GPT checkpoint: it compiles for --target cpu in float32 only, without "
                             f"{', '.join(given) or '--target ' + target}")
        path = export_gpt(model, out or f"{Path(model).stem}-{target}", force=force,
                          progress=None if quiet else lambda text: click.echo(text, err=True))
        click.echo(f"wrote {path}", err=True)
        return
    text, recipe_calib = resolve(passes, recipe_file, preset_name)
    recipe = parse_recipe(text)                       # unknown passes, bad arguments, bad order: before any work
    from .arch.hybrid import is_hybrid
    from .hf_tokenizer import HFTokenizer, source_tokenizer
    hf_tok = source_tokenizer(model)                  # a hybrid's teacher tokenizer.json (docs/DISTILLATION.md)
    if hf_tok is None and is_hybrid(model):
        click.echo("note: no tokenizer.json beside this hybrid checkpoint: the artifact uses the RWKV World tokenizer",
                   err=True)
    calib = calib or recipe_calib
    if calib_tokens < 16:
        raise RwkvcError("--calib-tokens must be >= 16")
    ctx = None
    if recipe:
        from .calib import default_calib_tokens, load_tokens
        tokens = None
        if calib:
            tokens = load_tokens(calib, limit=calib_tokens, tokenizer=HFTokenizer(hf_tok) if hf_tok else None)
        elif needs_calibration(recipe):
            tokens = default_calib_tokens(calib_tokens)
            click.echo(f"note: {', '.join(needs_calibration(recipe))} calibrate on the offline KJV text; "
                       "give --calib FILE to use your own", err=True)
        ctx = PassContext(calib_tokens=tokens, progress=not quiet, dump_dir=dump_ir)
    out = out or f"{Path(model).stem}-{target}"
    path = compile_checkpoint(model, out, target=target, passes=recipe, dtype=dtype, force=force,
                              progress=not quiet, dump_dir=dump_ir, ctx=ctx, cluster_file=cluster_file,
                              state_path=state_path, options=target_options(target, fused))
    click.echo(f"wrote {path}", err=True)


def target_options(target: str, fused: bool | None) -> dict:
    if fused is not None and target != "cpu":
        raise RwkvcError(f"--fused/--no-fused apply to --target cpu, not {target}")
    return {} if fused is None else {"fused": fused}


# ------------------------------------------------------------------------------------------------
@cli.command(name="eval")
@click.argument("artifact")
@click.option("--data", required=True, help="evaluation text (.txt), .npy token ids or binidx prefix")
@click.option("--ref", default=None, help="the uncompressed model: a checkpoint (.pth) or an artifact directory")
@click.option("--tokens", "n_tokens", type=int, default=2000, show_default=True, help="tokens to predict")
@click.option("--threads", type=int, default=None, help="CPU threads (default: RWKVC_THREADS, else one per core)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def eval_cmd(artifact, data, ref, n_tokens, threads, as_json):
    """Perplexity of an artifact; with --ref, its delta, top-1 agreement and mean KL against the reference."""
    from .eval import evaluate, format_report
    if n_tokens < 1:
        raise RwkvcError("--tokens must be >= 1")
    r = evaluate(artifact, data, ref=ref, n_tokens=n_tokens, threads=threads)
    click.echo(json.dumps(r, indent=2) if as_json else format_report(r))


# ------------------------------------------------------------------------------------------------
def _sampling_options(f):
    opts = [
        click.option("--temperature", type=float, default=1.0, show_default=True, help="0 = greedy"),
        click.option("--top-p", type=float, default=0.85, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off"),
        click.option("--presence", "alpha_presence", type=float, default=0.0, show_default=True,
                     help="presence penalty"),
        click.option("--frequency", "alpha_frequency", type=float, default=0.0, show_default=True,
                     help="frequency penalty"),
        click.option("--decay", "alpha_decay", type=float, default=0.996, show_default=True,
                     help="per-token decay of the penalties' counts"),
        click.option("--ban", "token_ban", type=int, multiple=True, help="token id never to sample (repeatable)"),
        click.option("--stop-token", "token_stop", type=int, multiple=True,
                     help="token id that ends generation (repeatable; default 0, end of document)"),
        click.option("--stop", "stop_strings", multiple=True, help="text that ends generation (repeatable)"),
        click.option("--seed", type=int, default=None, help="random seed for reproducible sampling"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _sampling_config(kw):
    from .sampling import SamplingConfig
    keys = ("temperature", "top_p", "top_k", "alpha_presence", "alpha_frequency", "alpha_decay",
            "token_ban", "token_stop", "stop_strings", "seed")
    args = {k: kw.pop(k) for k in keys}
    args["token_stop"] = tuple(args["token_stop"]) or (0,)
    args["token_ban"] = tuple(args["token_ban"])
    args["stop_strings"] = tuple(s.encode().decode("unicode_escape") for s in args["stop_strings"])
    return SamplingConfig(**args)


@cli.command()
@click.argument("artifact")
@click.option("--prompt", "-p", default="", help="text to continue")
@click.option("-n", "n_tokens", type=int, default=100, show_default=True, help="tokens to generate")
@_sampling_options
@click.option("--state", "tuned_state", default=None,
              help="start from this tuned state (.pth from train.py --train_type states) instead of the artifact's")
@click.option("--state-in", default=None, help="resume from a state saved with --state-out")
@click.option("--state-out", default=None, help="save the state after generation (.npz)")
@click.option("--chat", is_flag=True, help="interactive chat (User:/Assistant: turns) on stdin")
@click.option("--threads", type=int, default=None, help="CPU threads (default: RWKVC_THREADS, else one per core)")
def run(artifact, prompt, n_tokens, tuned_state, state_in, state_out, chat, threads, **kw):
    """Generate text from an artifact, streaming it to stdout."""
    from .api import load
    cfg = _sampling_config(kw)
    if n_tokens < 0:
        raise RwkvcError("-n must be >= 0")
    if state_out:
        from .api import Model
        Model.check_state_path(state_out)
    m = load(artifact, threads=threads)
    if state_out:
        m.check_state_path(state_out)   # again, on the artifact: one that cannot save its state says so now
    if tuned_state:
        m.use_state(tuned_state)
    state = m.load_state(state_in) if state_in else None
    if chat:
        state = _chat(m, cfg, n_tokens, state)
    else:
        result = []
        for piece in m.stream(prompt, n_tokens, state=state, sampling=cfg, result=result):
            _out(piece)
        _out("\n")
        state = result[0].state
    if state_out:
        m.save_state(state, state_out)
        click.echo(f"state saved to {state_out}", err=True)


def _chat(m, cfg, n_tokens, state):
    import dataclasses
    cfg = dataclasses.replace(cfg, stop_strings=tuple(cfg.stop_strings) + ("\n\nUser:", "\n\n"))
    click.echo("chat: type a message, an empty line or Ctrl-D ends", err=True)
    state = state if state is not None else m.init_state()
    while True:
        click.echo("User: ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return state
        prompt = f"User: {line.strip()}\n\nAssistant:"
        _out("Assistant:")
        result = []
        for piece in m.stream(prompt, n_tokens, state=state, sampling=cfg, result=result):
            _out(piece)
        _out("\n\n")
        state = result[0].state
        _, state = m.forward(m.encode("\n\n"), state)


# ------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("artifact")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
def verify(artifact, quiet):
    """Check every file of an artifact against its manifest's sha256; name the first damaged one."""
    from .integrity import verify_artifact
    r = verify_artifact(artifact, progress=not quiet)
    click.echo(f"{artifact}: {r['files']} files, {r['bytes'] / 1e6:.1f} MB verified in {r['seconds']:.2f} s")


# ------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("artifact")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--tokens", "n_decode", type=int, default=64, show_default=True, help="decode steps to time")
@click.option("--prefill", "n_prefill", type=int, default=512, show_default=True, help="prompt length for prefill")
@click.option("--threads", type=int, default=None, help="CPU threads (default: RWKVC_THREADS, else one per core)")
@click.option("--repeat", type=int, default=3, show_default=True, help="timed repetitions (best is reported)")
def bench(artifact, as_json, n_decode, n_prefill, threads, repeat):
    """Decode and prefill tokens/s, peak RSS and artifact bytes."""
    from .bench import bench_artifact
    if n_decode < 1 or n_prefill < 1 or repeat < 1:
        raise RwkvcError("--tokens, --prefill and --repeat must be >= 1")
    r = bench_artifact(artifact, n_decode=n_decode, n_prefill=n_prefill,
                       threads=threads, repeat=repeat)
    if as_json:
        click.echo(json.dumps(r, indent=2))
    else:
        click.echo(f"artifact        {r['artifact']}  ({r['target']}, {r['artifact_bytes'] / 1e6:.1f} MB)")
        click.echo(f"decode          {r['decode_tokens_per_s']:.1f} tokens/s  ({r['decode_ms_per_token']:.2f} ms/token)")
        click.echo(f"prefill ({r['prefill_tokens']})   {r['prefill_tokens_per_s']:.1f} tokens/s")
        click.echo(f"peak RSS        {r['peak_rss_bytes'] / 1e6:.1f} MB  (load {r['load_seconds']:.2f} s; "
                   f"{r['rss_start_bytes'] / 1e6:.0f} MB before it)")
        if "weight_bytes_resident" in r:
            click.echo(f"weights         {r['weight_bytes_resident'] / 1e6:.2f} MB resident, "
                       f"{r['weight_bytes_read_per_token'] / 1e6:.2f} MB read per decoded token "
                       f"({r['weight_bytes_mapped'] / 1e6:.2f} MB memory-mapped, read by rows)")
            held = r["weight_bytes_resident"] + r["state_bytes"]
            click.echo(f"peak / held     {(r['peak_rss_bytes'] - r['rss_start_bytes']) / max(held, 1):.2f}x the "
                       f"resident weights and state ({held / 1e6:.1f} MB), not counting the interpreter")
        if r.get("weight_bytes_huge_pages") is not None:
            click.echo(f"huge pages      {r['weight_bytes_huge_pages'] / 1e6:.1f} MB of the weights in 2 MiB pages "
                       "(copied from weights.bin at load; rwkvc.load(..., huge_pages=False) keeps the file's pages)")
        click.echo(f"threads         {r['threads']}")
        if r.get("prepack") is False:
            click.echo("pre-packing     off: float matrices read in place (rwkvc.load(..., prepack=True) for speed "
                       "where memory allows)")


# ------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--prompt", "-p", default="And God said", show_default=True)
@click.option("-n", "n_tokens", type=int, default=120, show_default=True)
@click.option("--target", "-t", default="cpu", show_default=True)
@click.option("--passes", default="", help="compression recipe for the demo artifact")
@click.option("--cache-dir", default=None, help="where the demo model and artifact are kept [~/.cache/rwkvc/demo]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--train", is_flag=True,
              help="train the demo model here (training/demo.py: ~10 min on 2 idle cores, then cached) instead of "
                   "using the one shipped with rwkvc")
def demo(prompt, n_tokens, target, passes, cache_dir, seed, train):
    """The built-in default: a small RWKV-7 trained on the KJV bible, compiled and generating.

    The model shipped with rwkvc (rwkvc/data/demo-kjv.npz, made by training/demo.py) is used unless --train,
    or a model trained here by --train is cached."""
    from .api import load
    from .cache import cache_root
    from .pipeline import compile_checkpoint
    root = Path(cache_dir) if cache_dir else cache_root() / "demo"
    log = lambda *a: click.echo(" ".join(map(str, a)), err=True)   # noqa: E731
    ckpt = _trained_demo(root)
    if train or ckpt is not None:
        from rwkvc.training.demo import demo as train_demo
        ckpt, name = train_demo(cache_dir=root, log=log), "demo"
    else:
        from .demo_pack import PACK, unpack
        ckpt, name = root / "shipped" / "rwkv-demo.pth", "shipped"
        if not ckpt.is_file() or ckpt.stat().st_mtime < PACK.stat().st_mtime:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            unpack(ckpt)
        log("demo: the model shipped with rwkvc (trained by training/demo.py); `rwkvc demo --train` trains it here")
    tag = "".join(ch if ch.isalnum() else "_" for ch in passes)[:60]
    art = root / f"{name}-{target}{'-' + tag if tag else ''}"
    if not (art / "manifest.json").exists() or art.stat().st_mtime < Path(ckpt).stat().st_mtime:
        click.echo(f"compiling {ckpt} for {target} -> {art}", err=True)
        compile_checkpoint(ckpt, art, target=target, passes=passes, force=True, progress=True)
    m = load(art)
    click.echo(f"artifact: {art}  (serve it: rwkvc serve {art})\nprompt: {prompt!r}\n", err=True)
    _out(prompt)
    for piece in m.stream(prompt, n_tokens, temperature=1.0, top_p=0.7, seed=seed, token_stop=(0,)):
        _out(piece)
    _out("\n")


def _trained_demo(root: Path):
    """The demo model trained here (rwkvc demo --train) with today's recipe, if cached; else None."""
    final, report = root / "model" / "rwkv-final.pth", root / "report.json"
    if not (final.is_file() and report.is_file()):
        return None
    from rwkvc.training.demo import RECIPE, RECIPE_VERSION
    try:
        r = json.loads(report.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return final if r.get("recipe") == RECIPE and r.get("recipe_version", 1) == RECIPE_VERSION else None


# ------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("artifact")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (0.0.0.0: every interface)")
@click.option("--port", type=int, default=8000, show_default=True, help="port (0: any free one, printed)")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="sequences decoded together per step (continuous batching)")
@click.option("--cache-mb", type=float, default=256, show_default=True,
              help="memory for the prefix-state cache (MiB; 0 = off)")
@click.option("--model-name", default=None, help="the model id clients name [default: the artifact's folder name]")
@click.option("--state", "tuned_state", default=None,
              help="every request starts from this tuned state (.pth from train.py --train_type states)")
@click.option("--threads", type=int, default=None, help="CPU threads (default: RWKVC_THREADS, else one per core)")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(artifact, host, port, max_batch, cache_mb, model_name, tuned_state, threads, log_level):
    """Serve an artifact over the OpenAI API (/v1/completions, /v1/chat/completions; docs/SERVING.md)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise RwkvcError("rwkvc serve needs FastAPI and uvicorn: pip install 'rwkvc[serve]'") from None
    from .serve.server import serve as run_server
    if not 0 <= port < 65536:
        raise RwkvcError(f"--port must be 0..65535, got {port}")
    if max_batch < 1 or cache_mb < 0:
        raise RwkvcError(f"--max-batch must be >= 1 (got {max_batch}) and --cache-mb >= 0 (got {cache_mb:g})")
    run_server(artifact, host=host, port=port, max_batch=max_batch, cache_mb=cache_mb, threads=threads,
               model_name=model_name, log_level=log_level, echo=lambda m: click.echo(m, err=True), state=tuned_state)


# ------------------------------------------------------------------------------------------------
def main(argv=None):
    try:
        cli.main(args=argv, prog_name="rwkvc", standalone_mode=False)
    except RwkvcError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:   # a bad option: one line, like rwkvc's own errors
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except PackageNameError as e:   # an installation mixing two checkouts
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except MemoryError:
        click.echo("error: out of memory; use a smaller model or recipe, or a machine with more memory", err=True)
        sys.exit(2)
    except (_ReaderGone, BrokenPipeError):   # the reader went away: a normal end
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nothing left to flush at exit
        sys.exit(0)
    except OSError as e:      # the environment: no space, permissions, a missing directory
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"error: {where}{e.strerror or e}; free some space, fix the permissions or choose another "
                   "path, then run again", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
