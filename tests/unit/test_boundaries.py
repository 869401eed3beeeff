"""The package's boundaries, read statically: every module of services/ parsed with `ast`, none imported.

- no import cycle among sagmq's modules (the imports that run when a module loads);
- `sagmq.wire` is the wire contract only: it imports nothing else of sagmq, and not pika;
- the ScatterAndGather core imports nothing of pika, the bus, `sagmq.amqp` or `sagmq.memory`;
- pika is imported only under `sagmq.amqp`;
- no private name of pika's (`_impl`, `_transport`, ...) is used outside the one optional fast path;
- the services (server, client, aggregator, persistor, the admin CLI) never import each other;
- the admin CLI (bench and floor included) uses no other object's private attributes.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVICES_DIR = Path(__file__).resolve().parents[2] / "services"
TOP = "sagmq"  # the import name of the services/ folder
FASTPATH = "sagmq.amqp.fastpath"  # the one module allowed pika's internals (switched off by SAGMQ_PIKA_FASTPATH=0)
SAG_CORE = "sagmq.server.scatter_and_gather"
SERVICE_PACKAGES = ("server", "client", "aggregator", "persistor", "cli")
SHARED_PACKAGES = ("wire", "job", "runtime", "storage", "amqp", "memory")


# --- reading the tree ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One import statement's target, as the module it loads."""

    target: str  # a dotted module name ("pika.adapters", "sagmq.wire.codec")
    names: tuple[str, ...]  # the names taken from it (`from target import a, b`); () for `import target`
    line: int
    at_load: bool  # runs when the importing module loads (not in a function, not under TYPE_CHECKING)


@dataclass(frozen=True)
class Module:
    """A parsed module of services/."""

    name: str
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        """An __init__.py."""
        return self.path.name == "__init__.py"


def module_name(path: Path) -> str:
    """services/wire/codec.py -> sagmq.wire.codec; services/wire/__init__.py -> sagmq.wire."""
    parts = list(path.relative_to(SERVICES_DIR).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([TOP, *parts])


@functools.cache
def modules() -> dict[str, Module]:
    """Every module of services/, by its sagmq name."""
    out = {}
    for path in sorted(SERVICES_DIR.rglob("*.py")):
        name = module_name(path)
        out[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(mod: Module, node: ast.ImportFrom) -> str:
    """The module a `from ... import` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _walk_imports(mod: Module, node: ast.AST, at_load: bool) -> Iterator[Import]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            for alias in child.names:
                yield Import(alias.name, (), child.lineno, at_load)
        elif isinstance(child, ast.ImportFrom):
            yield Import(_absolute(mod, child), tuple(a.name for a in child.names), child.lineno, at_load)
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _walk_imports(mod, child, False)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:  # only for the type checker; the else branch runs
                yield from _walk_imports(mod, ast.Module(body=[stmt], type_ignores=[]), False)
            for stmt in child.orelse:
                yield from _walk_imports(mod, ast.Module(body=[stmt], type_ignores=[]), at_load)
        else:
            yield from _walk_imports(mod, child, at_load)


def imports(mod: Module) -> list[Import]:
    """Every import statement of a module, wherever it is."""
    return list(_walk_imports(mod, mod.tree, True))


def sagmq_targets(imp: Import) -> list[str]:
    """The sagmq modules an import loads: `from sagmq.cli import jobs` loads sagmq.cli.jobs."""
    if imp.target != TOP and not imp.target.startswith(TOP + "."):
        return []
    known = modules()
    subs = [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in known]
    return subs or [imp.target]


def under(name: str, package: str) -> bool:
    """name is package or inside it."""
    return name == package or name.startswith(package + ".")


def load_graph() -> dict[str, set[str]]:
    """sagmq module -> the sagmq modules its loading imports."""
    return {name: {t for imp in imports(mod) if imp.at_load for t in sagmq_targets(imp) if t != name}
            for name, mod in modules().items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path (first module repeated at the end), or []."""
    done: set[str] = set()
    for start in sorted(graph):
        path: list[str] = []
        on_path: set[str] = set()
        cycle = _dfs(graph, start, path, on_path, done)
        if cycle:
            return cycle
    return []


def _dfs(graph: dict[str, set[str]], node: str, path: list[str], on_path: set[str], done: set[str]) -> list[str]:
    if node in on_path:
        return [*path[path.index(node):], node]
    if node in done or node not in graph:
        return []
    path.append(node)
    on_path.add(node)
    for nxt in sorted(graph[node]):
        cycle = _dfs(graph, nxt, path, on_path, done)
        if cycle:
            return cycle
    path.pop()
    on_path.discard(node)
    done.add(node)
    return []


def where(mod: Module, line: int) -> str:
    """path:line, relative to the repository."""
    return f"{mod.path.relative_to(SERVICES_DIR.parent)}:{line}"


# --- import rules ------------------------------------------------------------------------------


def test_the_tree_is_read() -> None:
    names = modules()
    assert {"sagmq", "sagmq.wire", "sagmq.wire.codec", "sagmq.cli.main"} <= set(names)
    graph = load_graph()
    assert "sagmq.wire.errors" in graph["sagmq.wire.codec"]


def test_find_cycle_reports_the_path() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle() -> None:
    cycle = find_cycle(load_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_relative_and_from_imports_resolve() -> None:
    mod = Module("sagmq.cli.poc", SERVICES_DIR / "cli" / "poc.py", ast.parse(
        "from . import jobs\nfrom ..wire import codec\nfrom sagmq.cli import admin\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sagmq.amqp import AmqpBus\n"
        "def f():\n    import pika\n"))
    found = {(t, i.at_load) for i in imports(mod) for t in sagmq_targets(i) or [i.target]}
    assert found == {("sagmq.cli.jobs", True), ("sagmq.wire.codec", True), ("sagmq.cli.admin", True),
                     ("typing", True), ("sagmq.amqp", False), ("pika", False)}


def test_wire_imports_only_the_wire_and_never_pika() -> None:
    bad = [f"{where(mod, imp.line)}: imports {imp.target}"
           for name, mod in modules().items() if under(name, "sagmq.wire")
           for imp in imports(mod)
           if under(imp.target, "pika") or any(not under(t, "sagmq.wire") for t in sagmq_targets(imp))]
    assert not bad, "sagmq.wire must hold only the wire contract:\n" + "\n".join(bad)


def _loaded_with(name: str) -> dict[str, list[str]]:
    """Every module (sagmq's and third parties') that loading `name` loads, with the chain of sagmq
    modules that leads to it."""
    chains: dict[str, list[str]] = {name: [name]}
    todo = [name]
    while todo:
        current = todo.pop()
        for imp in imports(modules()[current]):
            if not imp.at_load:
                continue
            for target in sagmq_targets(imp) or [imp.target]:
                if target not in chains:
                    chains[target] = [*chains[current], target]
                    if target in modules():
                        todo.append(target)
    return chains


def test_the_sag_core_imports_no_pika_bus_amqp_or_memory() -> None:
    assert SAG_CORE in modules(), f"{SAG_CORE} is missing: the pure ScatterAndGather core must exist"
    direct = [f"{where(modules()[SAG_CORE], imp.line)}: imports {imp.target}"
              for imp in imports(modules()[SAG_CORE]) if _forbidden_in_core(imp.target, sagmq_targets(imp))]
    indirect = [" -> ".join(chain) for target, chain in _loaded_with(SAG_CORE).items()
                if _forbidden_in_core(target, [target])]
    assert not direct and not indirect, "the SAG core must stay pure:\n" + "\n".join(direct + indirect)


def _forbidden_in_core(target: str, sagmq_modules: list[str]) -> bool:
    return under(target, "pika") or any(
        under(t, p) for t in sagmq_modules for p in ("sagmq.wire.bus", "sagmq.amqp", "sagmq.memory"))


def test_pika_is_imported_only_under_amqp() -> None:
    bad = [f"{where(mod, imp.line)}: imports {imp.target}"
           for name, mod in modules().items() if not under(name, "sagmq.amqp")
           for imp in imports(mod) if under(imp.target, "pika")]
    assert not bad, "only sagmq.amqp may import pika:\n" + "\n".join(bad)


def _package_of(name: str) -> str:
    return name.split(".")[1] if name.count(".") >= 1 else ""


def test_services_never_import_each_other() -> None:
    bad = []
    for name, mod in modules().items():
        own = _package_of(name)
        if own not in SERVICE_PACKAGES + SHARED_PACKAGES:
            continue
        for imp in imports(mod):
            for target in sagmq_targets(imp):
                other = _package_of(target)
                if other in SERVICE_PACKAGES and other != own:
                    bad.append(f"{where(mod, imp.line)}: {name} imports {target}")
    assert not bad, ("services import only wire, job, runtime, storage (and the bus implementations); "
                     "shared packages import no service:\n" + "\n".join(bad))


# --- pika's private names ------------------------------------------------------------------------


def _private(name: str) -> bool:
    """A private name: one leading underscore, not a dunder, not `_` alone."""
    return name.startswith("_") and not name.endswith("__") and name != "_"


def _pika_modules() -> Iterator[object]:
    pika = importlib.import_module("pika")
    yield pika
    for info in pkgutil.walk_packages(pika.__path__, "pika."):
        try:
            yield importlib.import_module(info.name)
        except ImportError:  # adapters for event loops that are not installed (gevent, tornado, twisted)
            continue


def _introspected_private_names() -> set[str]:
    """Private names of pika's modules and of every class in them (methods, class attributes)."""
    names: set[str] = set()
    for module in _pika_modules():
        for attr, value in vars(module).items():
            if _private(attr):
                names.add(attr)
            if inspect.isclass(value) and value.__module__.startswith("pika"):
                names |= {a for a in dir(value) if _private(a)}
    return names


def _assigned_private_names() -> set[str]:
    """Private names pika's source assigns (`self._impl = ...` in __init__ is not in any dir())."""
    root = Path(importlib.import_module("pika").__file__ or "").parent
    names: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
                names.add(node.attr)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and _private(node.name):
                names.add(node.name)
    return names


@functools.cache
def pika_private_names() -> frozenset[str]:
    """Every private name of pika's: introspected from its classes, plus what its source assigns."""
    return frozenset(_introspected_private_names() | _assigned_private_names())


class PikaPrivates(ast.NodeVisitor):
    """Uses of pika's private names in one module.

    Flagged: importing a private name (or module) of pika; an attribute access `x._name` where
    `_name` is one of pika's private names, unless x is `self`/`cls` inside a method of a class of
    the module's own (not derived from a pika class); any private attribute on a pika name or after
    another flagged access (`conn._impl._anything`); getattr/setattr/hasattr/delattr of such a name.
    """

    def __init__(self, denied: frozenset[str]) -> None:
        self.denied = denied
        self.found: list[tuple[int, str]] = []
        self.pika_names: set[str] = set()  # names the module bound to pika's modules and objects
        self.classes: list[bool] = []  # stack: is the enclosing class derived from pika?
        # stack per class or function: None directly in a class body; else whether `self` there is an
        # object of the module's own (a method of its own class, or a function nested in one)
        self.owner: list[bool | None] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if under(alias.name, "pika"):
                self.pika_names.add((alias.asname or alias.name).split(".")[0])
                self._check_module(node.lineno, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not under(node.module or "", "pika"):
            return
        self._check_module(node.lineno, node.module or "")
        for alias in node.names:
            self.pika_names.add(alias.asname or alias.name)
            if _private(alias.name):
                self.found.append((node.lineno, f"imports {node.module}.{alias.name}"))

    def _check_module(self, line: int, module: str) -> None:
        if any(_private(part) for part in module.split(".")):
            self.found.append((line, f"imports {module}"))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.classes.append(any(self._root(base) in self.pika_names for base in node.bases))
        self.owner.append(None)
        self.generic_visit(node)
        self.owner.pop()
        self.classes.pop()

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        top = self.owner[-1] if self.owner else False  # a module-level function's `self` is anyone's
        self.owner.append(not self.classes[-1] if top is None else top)
        self.generic_visit(node)
        self.owner.pop()

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _private(node.attr) and self._flagged(node):
            self.found.append((node.lineno, f"uses {ast.unparse(node)}"))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        fn = node.func
        if (isinstance(fn, ast.Name) and fn.id in ("getattr", "setattr", "hasattr", "delattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in self.denied and not self._own(node.args[0])):
            self.found.append((node.lineno, f"uses {ast.unparse(node)}"))
        self.generic_visit(node)

    def _flagged(self, node: ast.Attribute) -> bool:
        if self._root(node.value) in self.pika_names or self._follows_private(node.value):
            return True
        return node.attr in self.denied and not self._own(node.value)

    def _own(self, value: ast.expr) -> bool:
        """value is self/cls in a method of the module's own class (not one derived from pika)."""
        return isinstance(value, ast.Name) and value.id in ("self", "cls") and bool(self.owner) and bool(self.owner[-1])

    def _follows_private(self, value: ast.expr) -> bool:
        """value is itself an access of a pika private (`conn._impl`), so what follows is pika's too."""
        return (isinstance(value, ast.Attribute) and _private(value.attr) and value.attr in self.denied
                and not self._own(value.value))

    @staticmethod
    def _root(node: ast.expr) -> str:
        while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
            node = node.func if isinstance(node, ast.Call) else node.value
        return node.id if isinstance(node, ast.Name) else ""


def pika_private_uses(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, what) of every use of a pika private name in a parsed module."""
    visitor = PikaPrivates(pika_private_names())
    visitor.visit(tree)
    return visitor.found


def test_the_denylist_knows_the_internals_the_old_bus_used() -> None:
    assert {"_impl", "_transport", "_flush_output", "_tx_buffers", "_sock", "_nbio", "_produce",
            "_MAX_RECV_BYTES", "_STATE_ACTIVE", "_AsyncTransportBase"} <= pika_private_names()


@pytest.mark.parametrize("source", [
    "import pika\ndef f(conn):\n    return conn._impl\n",
    "class Bus:\n    def f(self):\n        return self._conn._impl._transport\n",
    "class Bus:\n    def f(self):\n        self._ch._impl.basic_publish()\n",
    "from pika.adapters.utils.io_services_utils import _AsyncTransportBase\n",
    "import pika.adapters.utils.io_services_utils as u\nu._AsyncTransportBase._MAX_RECV_BYTES = 1\n",
    "def _produce(self):\n    return self._tx_buffers\n",  # a function patched into a pika class
    "import pika\nclass C(pika.BlockingConnection):\n    def f(self):\n        return self._impl\n",
    "def f(conn):\n    return getattr(conn, '_impl')\n",
    "def f(t):\n    return t._nbio, t._sock\n",
])
def test_the_rule_flags_pika_internals(source: str) -> None:
    assert pika_private_uses(ast.parse(source))


@pytest.mark.parametrize("source", [
    "import pika\nclass Bus:\n    def __init__(self):\n        self._conn = None\n        self._impl = 1\n"
    "    def f(self):\n        return self._conn, self._impl, self._channel\n",
    "class Bus:\n    @classmethod\n    def f(cls):\n        return cls._state\n",
    "def f(bus):\n    return bus.channel.queue_delete('q'), bus._own_thing\n",
    "class Bus:\n    def f(self):\n        def on_reply():\n            return self._impl\n        return on_reply\n",
])
def test_the_rule_leaves_a_modules_own_private_names_alone(source: str) -> None:
    assert not pika_private_uses(ast.parse(source))


def test_no_pika_private_name_outside_the_fast_path() -> None:
    bad = [f"{where(mod, line)}: {what}" for name, mod in modules().items() if name != FASTPATH
           for line, what in pika_private_uses(mod.tree)]
    assert not bad, f"pika's private names are allowed only in {FASTPATH}:\n" + "\n".join(bad)


# --- the admin CLI on public APIs ----------------------------------------------------------------


def foreign_private_uses(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, what) of every `x._name` where x is not `self`/`cls`: another object's private attribute."""
    return [(node.lineno, ast.unparse(node)) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and _private(node.attr)
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]


def test_the_cli_uses_only_public_apis() -> None:
    # bench and floor measure the bus as users get it: no private bus call, no private attribute
    bad = [f"{where(mod, line)}: {what}" for name, mod in modules().items() if under(name, "sagmq.cli")
           for line, what in foreign_private_uses(mod.tree)]
    assert not bad, "the CLI reaches into private attributes:\n" + "\n".join(bad)
