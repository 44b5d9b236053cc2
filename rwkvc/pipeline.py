"""The compile pipeline: load -> verify -> passes (each verified) -> target lowering -> artifact.

    recipe = parse_recipe("svd(rank=0.25),int4(group=32)")   # validated before any work
    compile_checkpoint("model.pth", "out/", target="cpu", passes=recipe)
"""
from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

from . import ir
from .errors import RwkvcError


def parse_recipe(text: str | None) -> list[tuple[str, dict]]:
    """"a(k=v,...),b" -> [("a", {"k": v}), ("b", {})], every name and argument checked."""
    from rwkvc.passes import PASSES
    if not text or not text.strip():
        return []
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out = []
    for item in (i.strip() for i in items):
        m = re.fullmatch(r"([A-Za-z0-9_-]+)\s*(?:\((.*)\))?", item, re.S)
        if not m:
            raise RwkvcError(f"cannot parse pass '{item}' in --passes; write name or name(key=value,...)")
        name, argtext = m.group(1), m.group(2)
        if name not in PASSES:
            known = ", ".join(sorted(PASSES)) or "none yet"
            raise RwkvcError(f"unknown pass '{name}'; known passes: {known}")
        p = PASSES[name]
        args = {k: prm.default for k, prm in p.params.items()}
        for kv in filter(None, (s.strip() for s in (argtext or "").split(","))):
            if "=" not in kv:
                raise RwkvcError(f"pass {name}: argument '{kv}' must be key=value")
            k, v = (s.strip() for s in kv.split("=", 1))
            if k not in p.params:
                raise RwkvcError(f"pass {name}: unknown argument '{k}' (it takes {', '.join(p.params) or 'none'})")
            prm = p.params[k]
            try:
                val = ast.literal_eval(v) if prm.type is not str else v
                val = prm.type(val)
            except (ValueError, SyntaxError, TypeError):
                raise RwkvcError(f"pass {name}: {k}={v} is not a {prm.type.__name__}") from None
            if not prm.check(val):
                raise RwkvcError(f"pass {name}: {k}={v} is out of range; it must be {prm.allowed}")
            args[k] = val
        out.append((name, args))
    check_order(out)
    return out


def check_order(recipe: list[tuple[str, dict]]) -> None:
    from rwkvc.passes import PASSES
    seen: list[str] = []
    for name, _ in recipe:
        p = PASSES[name]
        if name in seen:
            raise RwkvcError(f"pass {name} appears twice in the recipe")
        for r in getattr(p, "requires", ()):
            if r not in seen:
                raise RwkvcError(f"pass {name} needs {r} to run before it; reorder --passes")
        for f in getattr(p, "forbids_after", ()):
            if f in seen:
                raise RwkvcError(f"pass {name} cannot run after {f}; put {name} first")
        seen.append(name)


def run_passes(model: ir.Model, recipe, ctx=None) -> ir.Model:
    from rwkvc.passes import PASSES, PassContext
    ctx = ctx or PassContext()
    for i, (name, args) in enumerate(recipe):
        ctx.later = tuple(n for n, _ in recipe[i + 1:])
        model, report = PASSES[name].run(model, args, ctx)
        report = {"name": name, "args": args, **report}
        model.passes.append(report)
        try:
            ir.verify(model)
        except ValueError as e:
            raise RuntimeError(f"pass {name} produced an inconsistent IR: {e}") from e
        if ctx.dump_dir:
            Path(ctx.dump_dir).mkdir(parents=True, exist_ok=True)
            (Path(ctx.dump_dir) / f"{len(model.passes):02d}-{name}.txt").write_text(str(model))
    return model


def check_dump_dir(d: Path) -> None:
    """--dump-ir's directory: one that exists or can be made (checked before any work)."""
    if d.exists() and not d.is_dir():
        raise RwkvcError(f"{d}: --dump-ir names a file; give a directory for the IR dumps")
    parent = next((p for p in [d, *d.parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        raise RwkvcError(f"{d}: cannot create the --dump-ir directory there (not writable); choose another")


# targets whose native runner has only the World tokenizer built in (a Hugging Face tokenizer.json is refused)
WORLD_TOKENIZER_ONLY = frozenset({"rpi5"})


def compile_checkpoint(model_path, out_dir, target: str = "cpu", passes=None, dtype: str | None = None,
                       force: bool = False, progress: bool = False, dump_dir: str | None = None,
                       state_path: str | None = None, ctx=None, cluster_file: str | None = None,
                       options: dict | None = None):
    """Checkpoint file -> artifact directory. Every user error is raised before anything is written."""
    from rwkvc.targets import get_target, unsupported
    from .artifact import check_output_dir, compile_to_dir, resolve_dtype
    from .frontend import load_model
    tgt = get_target(target)
    dtype = resolve_dtype(dtype, options)
    recipe = parse_recipe(passes) if isinstance(passes, str) or passes is None else passes
    out = Path(out_dir)
    check_output_dir(out, force)
    dump_dir = dump_dir or (ctx.dump_dir if ctx is not None else None)
    if dump_dir is not None:
        check_dump_dir(Path(dump_dir))
    from .hf_tokenizer import check_source_tokenizer, source_tokenizer
    hf_tok = source_tokenizer(model_path)   # a hybrid's teacher tokenizer.json, carried by the artifact
    if hf_tok is not None and tgt.name in WORLD_TOKENIZER_ONLY:
        raise RwkvcError(f"{model_path}: this hybrid has a Hugging Face tokenizer.json, but the {tgt.name} target's "
                         "native runner has only the RWKV World tokenizer; compile it for --target cpu")
    bar = _Progress(enabled=progress, total=2 + len(recipe))
    bar.step("load checkpoint")
    model = load_model(model_path, cluster_file=cluster_file, lazy=True)   # matrices read as they are used
    if hf_tok is not None:
        check_source_tokenizer(hf_tok, model.config.vocab_size)
    if state_path is not None:  # a tuned state becomes the artifact's initial state (validated here)
        from .states import apply_state
        apply_state(model, state_path)
    why = unsupported(tgt, model, dtype or tgt.capabilities.dtypes[0]) if not recipe else None
    if why:
        raise RwkvcError(why)
    scratch = None
    try:
        if recipe:
            from rwkvc.passes import PassContext
            ctx = ctx or PassContext(progress=progress, dump_dir=dump_dir)
            if getattr(ctx, "spill_dir", None) is None:   # the passes' new weights wait on disk, not in memory
                scratch = ctx.spill_dir = _scratch_dir(out)
            for item in recipe:
                bar.step(f"pass {item[0]}")
                model = run_passes(model, [item], ctx)
        bar.step(f"lower for {tgt.name}")
        path = compile_to_dir(model, tgt, out, dtype=dtype, source=str(model_path), force=force, options=options,
                              progress=lambda entry: None, tokenizer=hf_tok)
    finally:
        if scratch is not None:
            import shutil
            ctx.spill_dir = None
            shutil.rmtree(scratch, ignore_errors=True)
    bar.step("done")
    bar.close()
    return path


def _scratch_dir(out: Path) -> str:
    """A scratch directory beside the artifact (the same disk, which has room for it), else the system's."""
    import tempfile
    parent = out.resolve().parent
    try:
        return tempfile.mkdtemp(prefix=f".{out.name}.spill-", dir=parent if parent.is_dir() else None)
    except OSError:
        return tempfile.mkdtemp(prefix="rwkvc-spill-")


class _Progress:
    """A stage progress bar on stderr (tqdm), silent when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.bar, self.started = None, False
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=sys.stderr, unit="stage", dynamic_ncols=True,
                            bar_format="{desc:<28} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")

    def step(self, desc: str):
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.started = True
            self.bar.set_description_str(desc)

    def close(self):
        if self.bar is not None:
            self.bar.close()
