"""The package's shape: every module imports alone, no import cycle (module-level or hidden in a
function), no heavy module behind ``import eqlosses_d2``, names that say what a thing is, no
reference to a file the repository does not have."""
import ast
import concurrent.futures
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "eqlosses_d2")


def _modules():
    """Dotted names of every module of the package (``configs`` is the shipped yaml's link)."""
    names = []
    for directory, subdirs, files in os.walk(PACKAGE):
        subdirs[:] = sorted(d for d in subdirs if d not in ("__pycache__", "configs"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.relpath(os.path.join(directory, name), ROOT)[:-3].split(os.sep)
            if path[-1] == "__init__":
                path = path[:-1]
            names.append(".".join(path))
    return names


MODULES = _modules()


def _package_of(module):
    path = os.path.join(ROOT, *module.split("."))
    return module if os.path.isdir(path) else module.rsplit(".", 1)[0]


def _resolve(module, node):
    """Package modules an import statement of ``module`` names (``from . import x``: x if a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "eqlosses_d2"]
    if node.level:
        base = _package_of(module).split(".")
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "eqlosses_d2":
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return out


def import_graph():
    """{module: {package modules it imports anywhere in its code, function bodies included}}.
    A package's ``__init__`` importing its own submodules (registration) is left out: those edges
    go down the tree; only the submodules' imports of other modules make a cycle."""
    graph = {}
    for module in MODULES:
        path = os.path.join(ROOT, *module.split("."))
        path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets.update(t for t in _resolve(module, node) if t != module)
        graph[module] = targets
    return graph


def _cycle(graph):
    """One cycle of ``graph`` as a list of modules, or None. A package stands for the package and
    its ``__init__``; an edge into a package from one of its own submodules is left out (Python
    runs the package's ``__init__`` before the submodule anyway)."""
    def edges(module):
        for target in sorted(graph.get(module, ())):
            if module.startswith(target + "."):
                continue  # a submodule importing its own package (its parent runs first)
            if target.startswith(module + "."):
                continue  # a package's __init__ importing its submodules
            yield target

    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in edges(module):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"p": {"p.x"}, "p.x": {"p"}}) is None  # package and its own submodule
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_config_imports_no_data_or_model_zoo():
    imported = import_graph()["eqlosses_d2.config"]
    bad = sorted(m for m in imported if m.startswith(("eqlosses_d2.data", "eqlosses_d2.model_zoo")))
    assert not bad, f"eqlosses_d2/config.py imports {', '.join(bad)}"


_PROBE = """
import sys, importlib
importlib.import_module({module!r})
print("LOADED", ",".join(sorted(m for m in sys.modules if m == "eqlosses_d2" or m.startswith("eqlosses_d2."))))
print("HEAVY", ",".join(m for m in ("eqlosses_d2.data.synthetic", "matplotlib") if m in sys.modules))
"""
#: modules that may load a heavy module: the generator itself
_MAY_BE_HEAVY = ("eqlosses_d2.data.synthetic",)


def _import_alone(module):
    """Import ``module`` in a fresh interpreter: (return code, stderr's last line, modules of the
    package it loaded, heavy modules it loaded)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", _PROBE.format(module=module)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in result.stdout.splitlines())
    err = result.stderr.strip().splitlines()
    return (result.returncode, err[-1] if err else "", set(filter(None, lines.get("LOADED", "").split(","))),
            set(filter(None, lines.get("HEAVY", "").split(","))))


def import_each_module_alone(modules=None):
    """Every module of the package as if imported alone in a fresh interpreter. Python runs the
    ``__init__`` of every package above a module first, so importing a module alone differs from
    importing its package alone only when that package's ``__init__`` does not load it: one
    fresh interpreter per package first, then one per module none of them loaded (the same
    outcome as one per module, in a few interpreters instead of ~70). Scripts (``__main__``)
    are left out: importing them runs them. Returns {imported module: (rc, error, loaded, heavy)}."""
    modules = [m for m in (modules or MODULES) if not m.endswith(".__main__")]
    covered, results = set(), {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        while True:
            left = [m for m in modules if m not in covered and m not in results]
            if not left:
                return results
            # this round: the shallowest modules left, and none below another of them
            depth = min(m.count(".") for m in left)
            batch = [m for m in left if m.count(".") == depth]
            for module, outcome in zip(batch, pool.map(_import_alone, batch)):
                results[module] = outcome
                if outcome[0] == 0:
                    covered |= outcome[2]


def test_every_module_imports_alone(capsys):
    """No cycle breaks an import, whatever module is imported first; ``import eqlosses_d2`` and
    every module but the generator's bring no synthetic generator and no matplotlib."""
    results = import_each_module_alone()
    failures = [f"{module}: {error}" for module, (rc, error, _, _) in results.items() if rc != 0]
    heavy = [f"{module}: {', '.join(sorted(found))}" for module, (rc, _, _, found) in results.items()
             if found and module not in _MAY_BE_HEAVY]
    loaded = set().union(*(outcome[2] for outcome in results.values()))
    with capsys.disabled():
        print(f"\nimported alone: {len(results)} fresh interpreters ({', '.join(results)}) covered "
              f"{len(loaded)} modules; failures: {len(failures)}; heavy: {len(heavy)}")
    assert not failures, "modules that do not import alone:\n" + "\n".join(failures)
    assert not heavy, "modules that import the synthetic generator or matplotlib:\n" + "\n".join(heavy)
    missing = [m for m in MODULES if m not in loaded and not m.endswith(".__main__")]
    assert not missing, missing
    # ``import eqlosses_d2`` itself: the dataset specs, not the generator
    assert "eqlosses_d2.data.synthetic_spec" in results["eqlosses_d2"][2]


def test_import_alone_finds_a_cycle(tmp_path, monkeypatch):
    """The probe itself: a package whose two modules import each other's names fails alone."""
    package = tmp_path / "cyclepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import B\nA = 1\n")
    (package / "b.py").write_text("from .a import A\nB = 2\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    rc, error, _, _ = _import_alone("cyclepkg.a")
    assert rc != 0 and "circular import" in error


# -- names and references ------------------------------------------------------------------


def test_renamed_and_removed():
    from eqlosses_d2.losses import fused
    from eqlosses_d2.losses.pcb import PairwiseClassBalanceLoss
    from eqlosses_d2.modeling.memory import FeatureMemory

    assert hasattr(fused, "weighted_sigmoid_bce") and not hasattr(fused, "masked_sigmoid_bce")
    assert hasattr(PairwiseClassBalanceLoss, "update_confusion_and_gather")
    assert not hasattr(PairwiseClassBalanceLoss, "update")
    assert not hasattr(FeatureMemory, "jittered_targets")  # unused


_REPO_DIRS = ("benchmarks", "configs", "eqlosses_d2", "model_zoo", "tests", "tools")


def test_no_reference_to_missing_files():
    """Docstrings and comments of the package name only documents (``*.md``) and repository
    paths (``tools/...``, ``benchmarks/...``) that exist."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    names = {os.path.basename(path) for path in tracked} | {"README.md", "MODEL_ZOO.md"}
    missing = []
    for module in MODULES:
        path = os.path.join(ROOT, *module.split("."))
        path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for ref in set(re.findall(r"\b[A-Z][A-Z0-9_]*\.md\b", text)):
            if os.path.basename(ref) not in names:
                missing.append(f"{module}: {ref}")
        for ref in set(re.findall(r"\b(?:%s)/[A-Za-z0-9_./-]+\.(?:py|sh|yaml)\b" % "|".join(_REPO_DIRS), text)):
            if ref not in tracked and not os.path.exists(os.path.join(ROOT, ref)) and "NAME" not in ref:
                missing.append(f"{module}: {ref}")
    assert not missing, "references to files not in the repository:\n" + "\n".join(sorted(missing))
