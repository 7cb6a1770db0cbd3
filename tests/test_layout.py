"""The house rules: layers import only downward, no import circles, modules stay small, and
one analysis call builds one model view."""

import ast
from pathlib import Path

import pytest

import mechcna
from mechcna.models import architecture as architecture_module
from mechcna.models import fingerprint
from mechcna.models.scope import one_view

PACKAGE = Path(mechcna.__file__).parent
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every mechcna module ``name`` imports (lazy and TYPE_CHECKING imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_anywhere_in_the_package():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # the package root re-exports the public API; nothing inside may import it back
    importers_of_root = sorted(m for m, deps in graph.items() if "mechcna" in deps)
    assert importers_of_root == ["mechcna.__main__"] or importers_of_root == []
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_is_at_most_600_lines():
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_every_subpackage_says_what_it_owns_and_may_import():
    for path in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if path.parent.name in ("checkpoints",):
            continue
        assert "May import" in doc or path.parent.name in ("tasks", "reproduce", "cli"), path


def _count_builds(monkeypatch) -> list[int]:
    calls = [0]
    original = architecture_module.Architecture.__init__

    def counting(self, model):
        calls[0] += 1
        original(self, model)

    monkeypatch.setattr(architecture_module.Architecture, "__init__", counting)
    return calls


@pytest.mark.parametrize(
    "analysis",
    [
        lambda m: mechcna.neuron_importance(m, ["3 + 4 ="]),
        lambda m: mechcna.attention_neuron_importance(m, ["3 + 4 ="]),
        lambda m: mechcna.layer_importance(m, ["3 + 4 ="]),
        lambda m: mechcna.query_neurons(m, ["3 + 4 ="], k=5),
    ],
    ids=["neuron_importance", "attention_neuron_importance", "layer_importance", "query"],
)
def test_one_architecture_view_per_analysis_call(model, monkeypatch, analysis):
    calls = _count_builds(monkeypatch)
    analysis(model)
    assert calls[0] == 1
    analysis(model)  # a second call builds its own view (nothing is kept between calls)
    assert calls[0] == 2


def test_weights_are_fingerprinted_once_per_call_and_afresh_between_calls(model, monkeypatch):
    seen: list[int] = []
    original = fingerprint._tensor_state

    def counting(t):
        seen.append(id(t))
        return original(t)

    monkeypatch.setattr(fingerprint, "_tensor_state", counting)
    mechcna.neuron_importance(model, ["3 + 4 ="])
    assert seen and len(seen) == len(set(seen))  # each tensor once within the call
    first = len(seen)
    with one_view():
        w = model.W_U
        fingerprint.tensor_state(w)
        model.W_U.data.mul_(2.0)  # an edit bypassing the version counter...
        assert fingerprint.tensor_state(w) == fingerprint.tensor_state(w)
    # ...is seen by the next call, which fingerprints afresh
    before = fingerprint.tensor_state(w)
    model.W_U.data.mul_(0.5)
    assert fingerprint.tensor_state(w) != before
    mechcna.neuron_importance(model, ["3 + 4 ="])
    assert len(seen) > first + 2
