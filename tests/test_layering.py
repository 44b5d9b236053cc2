"""The house's rules, checked: one import name per module, one tree, and layers that import only downwards.

Layers, lowest first (docs/ARCHITECTURE.md): the core (rwkvc/ but the front door) < passes < runtimes <
targets < training < the front door (the package's own `rwkvc.compile` / `rwkvc.load`, and rwkvc.pipeline,
api, cli, eval, bench, inspect). A module may import
its own layer and the layers below it, never one above.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rwkvc
from rwkvc.packages import STAGES

ROOT = Path(rwkvc.__file__).resolve().parents[1]
FRONT_DOOR = {"rwkvc", "rwkvc.pipeline", "rwkvc.api", "rwkvc.cli", "rwkvc.eval", "rwkvc.bench", "rwkvc.inspect",
              "rwkvc.serve"}
LAYERS = ("core", "passes", "runtimes", "targets", "training", "front door")


def layer(module: str) -> int:
    if module in FRONT_DOOR or any(module.startswith(m + ".") for m in FRONT_DOOR - {"rwkvc"}):
        return LAYERS.index("front door")
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in STAGES:
        return LAYERS.index(parts[1])
    return LAYERS.index("core")


def package_files() -> dict[str, Path]:
    """module name -> file, for every module of the package (the folders as rwkvc.<folder>)."""
    out = {}
    for top, name in [("rwkvc", "rwkvc")] + [(s, "rwkvc." + s) for s in STAGES]:
        for f in sorted((ROOT / top).rglob("*.py")):
            rel = f.relative_to(ROOT / top).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = f
    return out


def imports_of(module: str, path: Path) -> set[str]:
    """Every rwkvc module `path` imports (at any depth: function-level imports count too)."""
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[:len(base) - node.level + 1]
                mod = ".".join(pkg + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("rwkvc.")}   # `rwkvc` itself: the package every import loads


def test_no_module_imports_a_higher_layer():
    files = package_files()
    bad = []
    for mod, path in files.items():
        for dep in imports_of(mod, path):
            target = dep
            while target not in files and "." in target:   # `from rwkvc.x import name`: the module is rwkvc.x
                target = target.rsplit(".", 1)[0]
            if target not in files or target == "rwkvc":
                continue   # not a module of the tree (a data folder), or the package every import loads
            if layer(target) > layer(mod):
                bad.append(f"{path.relative_to(ROOT)} ({LAYERS[layer(mod)]}) imports {target} ({LAYERS[layer(target)]})")
    assert not bad, "imports that run upwards:\n" + "\n".join(sorted(set(bad)))


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check above can fail: a core module importing a pass is reported."""
    f = tmp_path / "ir_like.py"
    f.write_text("def f():\n    from rwkvc.passes.quant import QuantPass\n")
    deps = imports_of("rwkvc.ir_like", f)
    assert "rwkvc.passes.quant" in deps and layer("rwkvc.passes.quant") > layer("rwkvc.ir_like")


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_folder_has_one_import_name(stage):
    """From the repository root `import passes` would load a second copy of rwkvc.passes: it is refused."""
    r = _python(f"import {stage}", ROOT)
    assert r.returncode != 0
    assert f"import rwkvc.{stage}, not {stage}" in r.stderr.strip().splitlines()[-1]


def test_every_loaded_module_has_one_name_and_one_tree():
    """Import everything the CLI, the targets and the training module reach; each file of the tree is loaded
    once, under its rwkvc name, from this tree."""
    code = ("import sys, pkgutil, importlib, rwkvc\n"
            "import rwkvc.cli, rwkvc.passes, rwkvc.targets, rwkvc.runtimes, rwkvc.training\n"
            "for pkg in (rwkvc.passes, rwkvc.targets, rwkvc.runtimes, rwkvc.training):\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        if m.name.endswith(('__main__',)):\n"
            "            continue\n"
            "        try: importlib.import_module(m.name)\n"
            "        except ImportError as e:\n"
            "            if 'tvm' not in str(e) and 'deepspeed' not in str(e): raise\n"
            "for name, mod in sorted(sys.modules.items()):\n"
            "    f = getattr(mod, '__file__', None)\n"
            "    if f: print(name, f)\n")
    r = _python(code, Path("/"))
    assert r.returncode == 0, r.stderr
    by_file: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        name, f = line.split(" ", 1)
        p = Path(f)
        if not p.is_absolute():
            continue
        p = p.resolve()
        if name.startswith("rwkvc"):
            assert ROOT in p.parents, f"{name} loaded from {p}, outside {ROOT}"
        if ROOT in p.parents:
            assert name.startswith("rwkvc"), f"{p} loaded as {name}"
            by_file.setdefault(str(p), []).append(name)
    twice = {f: n for f, n in by_file.items() if len(n) > 1}
    assert not twice, f"files loaded under two names: {twice}"
    assert len(by_file) > 40   # the walk reached the whole package


def test_a_second_checkouts_core_does_not_mix_with_this_trees_stages(tmp_path):
    """With another checkout's rwkvc/ first on sys.path, rwkvc.passes (found through this tree's install)
    is refused instead of loading beside the other tree's core."""
    other = tmp_path / "other"
    shutil.copytree(ROOT / "rwkvc", other / "rwkvc", ignore=shutil.ignore_patterns("__pycache__", "data"))
    r = _python("import rwkvc.passes", other)
    assert r.returncode != 0
    assert "does not belong to the rwkvc core" in r.stderr.strip().splitlines()[-1]
