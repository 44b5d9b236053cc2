"""Named compression recipes (`rwkvc compile --preset NAME`) and recipe files (`--recipe FILE`).

A recipe file is TOML, either one string

    passes = "svd(rank=0.25),int4(group=32),lazy-emb"
    calib = "calib.txt"          # optional: calibration text for the passes that learn from data

or a list of tables, one per pass, in order:

    [[pass]]
    name = "svd"
    rank = 0.25
    [[pass]]
    name = "int4"
    group = 32

Either way the recipe goes through the same parser as --passes, so unknown passes, bad arguments
and impossible orders are refused before any work.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from rwkvc.errors import RwkvcError

PRESETS: dict[str, tuple[str, str]] = {
    # name: (recipe, what it is for)
    "int8": ("int8,lazy-emb(storage=int8)",
             "every matrix int8 per channel, embedding memory-mapped: ~4x smaller, near-lossless"),
    "int4": ("int4(group=128),lazy-emb(storage=int8)",
             "every matrix int4 (group 128: ONNX Runtime's fastest 4-bit kernel here), embedding memory-mapped: "
             "~7x smaller"),
    "int4-awq": ("int4(group=32,method=awq),lazy-emb(storage=int8)",
                 "int4 with activation-aware scaling (needs calibration text)"),
    "lite": ("svd(rank=0.25,targets=att.r+att.k+att.v+att.o),sparse-ffn(recall=0.99),"
             "hhead(k=200,p=0.95,min_k=3,max_k=100),int8",
             "RWKV-Lite's choices: low-rank time-mix projections, sparse FFN with MLP + 1-bit predictors, "
             "hierarchical head (200 clusters, top-p 0.95, 3..100 clusters), int8"),
    "lite-max": ("svd(rank=0.25,targets=att.r+att.k+att.v+att.o),sparse-ffn(recall=0.99),"
                 "hhead(k=200,p=0.95,min_k=3,max_k=100),int4(group=32),lazy-emb(storage=int8)",
                 "everything: RWKV-Lite's structure, int4 weights and a memory-mapped int8 embedding"),
}


def preset(name: str) -> str:
    if name not in PRESETS:
        raise RwkvcError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)}")
    return PRESETS[name][0]


def _value(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        if any(ch in v for ch in ",()="):
            raise RwkvcError(f"recipe value {v!r} contains one of , ( ) =")
        return v
    raise RwkvcError(f"recipe value {v!r}: use numbers, booleans or strings")


def load_recipe_file(path) -> tuple[str, str | None]:
    """-> (recipe string for parse_recipe, calibration file or None)."""
    p = Path(path)
    if not p.is_file():
        raise RwkvcError(f"{p}: no such recipe file")
    try:
        d = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RwkvcError(f"{p}: not a valid TOML recipe ({e})") from None
    unknown = sorted(set(d) - {"passes", "pass", "calib", "description", "preset"})
    if unknown:
        raise RwkvcError(f"{p}: unknown key '{unknown[0]}' (a recipe has passes, pass, preset, calib, description)")
    given = [k for k in ("passes", "pass", "preset") if k in d]
    if len(given) != 1:
        raise RwkvcError(f"{p}: give exactly one of 'passes = \"...\"', [[pass]] tables or 'preset = NAME'")
    if "preset" in d:
        text = preset(d["preset"])
    elif "passes" in d:
        if not isinstance(d["passes"], str):
            raise RwkvcError(f"{p}: 'passes' must be a string like \"svd(rank=0.25),int4\"")
        text = d["passes"]
    else:
        items = []
        for i, t in enumerate(d["pass"]):
            if "name" not in t:
                raise RwkvcError(f"{p}: [[pass]] number {i + 1} has no name")
            args = ",".join(f"{k}={_value(v)}" for k, v in t.items() if k != "name")
            items.append(f"{t['name']}({args})" if args else t["name"])
        text = ",".join(items)
    calib = d.get("calib")
    if calib is not None:
        calib = str((p.parent / calib) if not Path(calib).is_absolute() else calib)
    return text, calib


def needs_calibration(recipe) -> list[str]:
    """Names of the passes in a parsed recipe that learn from calibration text."""
    from . import PASSES
    out = []
    for name, args in recipe:
        need = getattr(PASSES[name], "needs_calibration", False)
        if callable(need):
            need = need(args)
        if need:
            out.append(name)
    return out


def resolve(passes: str | None = None, recipe_file=None, preset_name: str | None = None) -> tuple[str, str | None]:
    """The recipe text from exactly one of --passes / --recipe / --preset, and a calibration file the
    recipe file names (or None)."""
    given = [n for n, v in (("--passes", passes), ("--recipe", recipe_file), ("--preset", preset_name)) if v]
    if len(given) > 1:
        raise RwkvcError(f"give one of --passes, --recipe, --preset (got {' and '.join(given)})")
    if recipe_file:
        return load_recipe_file(recipe_file)
    if preset_name:
        return preset(preset_name), None
    return passes or "", None
