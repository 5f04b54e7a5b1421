"""The key of a row: a hash of everything that decides its results, derived rather than listed.

A row's results depend on the protocol, the row's declaration, its recipe and the recipes of the rows
it starts from, the code they reach, the measurement, the text of the corpora and the library versions.
The code is found by following references, so that no list can go stale:

- a **recipe** (a function of :mod:`refimpl.effects.recipes`) is followed by function: the global names
  its code (and the code of the functions nested in it) loads, and the modules it imports, are resolved
  in its module; another function of the recipes module is followed the same way, a constant of it
  (``GROUP``, ``RECOVERY``) is hashed by value, and anything defined in another ``refimpl`` module
  brings in that module's whole source;
- a ``refimpl`` **module** brings in every ``refimpl`` module it imports, anywhere in its source (inside
  functions too), and the packages above it (their ``__init__`` runs on import): the closure of the
  import graph;
- the **measurement** is :mod:`refimpl.effects.measure` and its closure, and :meth:`Row.during`.

Editing any function a row's recipe or measurement runs therefore changes the row's key (the tests run
every row with a profiler and check that each function it executes lies inside what the key covers).
Only the recipes module and the registry are hashed by the part a row uses, so editing one recipe
re-measures its rows alone; everything else is hashed by whole file, which is coarser than necessary
(a change in a helper of ``refimpl.evaluate`` re-measures every row) but cannot miss a dependency.
"""

from __future__ import annotations

import ast
import dataclasses
import dis
import functools
import hashlib
import importlib.util
import inspect
import json
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from refimpl import data
from refimpl.effects import measure, recipes
from refimpl.effects.protocol import DEFAULT_PROTOCOL, Protocol

if TYPE_CHECKING:
    from refimpl.effects.registry import Row

#: Hashed by the part a row uses (its recipe functions, its declaration), never by whole file.
BY_PART = ("refimpl.effects.recipes", "refimpl.effects.registry")


def _refimpl_module(name: str) -> str | None:
    """``name`` if it is an importable module of refimpl (not a name inside one), else ``None``."""
    if name != "refimpl" and not name.startswith("refimpl."):
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return name if spec is not None and spec.origin is not None else None


def _with_packages(module: str) -> set[str]:
    """``module`` and the packages above it."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


@functools.lru_cache(maxsize=None)
def _imports(module: str) -> frozenset[str]:
    """The refimpl modules ``module``'s source imports anywhere (``import a.b``, ``from a import b``,
    relative imports), with their packages."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    package = module if spec.submodule_search_locations else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if (resolved := _refimpl_module(name)) is not None:
                found |= _with_packages(resolved)
    return frozenset(found)


def module_closure(modules: set[str]) -> set[str]:
    """``modules``, their packages and every refimpl module they import, transitively (except
    :data:`BY_PART`, which is followed by the part a row uses)."""
    todo = set().union(*(_with_packages(m) for m in modules))
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen or module in BY_PART:
            continue
        seen.add(module)
        todo |= _imports(module) - seen
    return seen


def _code_objects(code: types.CodeType) -> list[types.CodeType]:
    """``code`` and the code of the functions, lambdas and comprehensions nested in it."""
    nested = [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return [code] + [inner for c in nested for inner in _code_objects(c)]


def _references(fn: types.FunctionType) -> tuple[set[types.FunctionType], set[str], dict[str, str]]:
    """What ``fn``'s code refers to: functions of the recipes module, refimpl modules (whole files),
    and the recipes module's other globals (by value)."""
    functions, modules, constants = set(), set(), {}
    for code in _code_objects(fn.__code__):
        for instruction in dis.get_instructions(code):
            if instruction.opname == "IMPORT_NAME":
                if (module := _refimpl_module(instruction.argval)) is not None:
                    modules.add(module)
                continue
            if instruction.opname == "IMPORT_FROM":
                continue  # the module is found by the IMPORT_NAME before it, a submodule by its global use below
            if instruction.opname not in ("LOAD_GLOBAL", "LOAD_NAME") or instruction.argval not in fn.__globals__:
                continue
            value = fn.__globals__[instruction.argval]
            if isinstance(value, types.ModuleType):
                owner = value.__name__
            elif isinstance(value, (types.FunctionType, type)):
                owner = value.__module__
            elif isinstance(value, types.BuiltinFunctionType):
                continue
            else:  # a value (GROUP, RECOVERY): hashed by what it is
                constants[instruction.argval] = repr(value)
                continue
            if owner == recipes.__name__ and isinstance(value, types.FunctionType):
                functions.add(value)
            elif _refimpl_module(owner) is not None:
                modules.add(owner)
    return functions, modules, constants


def _unwrap(fn: Callable) -> tuple[types.FunctionType, dict[str, Any]]:
    if isinstance(fn, functools.partial):
        return fn.func, dict(fn.keywords)
    return fn, {}


@dataclasses.dataclass(frozen=True)
class Dependencies:
    """What decides a row's results: recipe functions (by source), recipes-module constants (by value),
    refimpl modules (by whole source), and the declarations of the row and the rows it starts from."""

    functions: dict[str, str]  # qualified name: source (with the recipe's keywords)
    constants: dict[str, str]
    modules: frozenset[str]
    declarations: tuple[dict[str, Any], ...]


def dependencies(row: "Row") -> Dependencies:
    """The :class:`Dependencies` of ``row`` (see the module docstring for the rule)."""
    functions: dict[str, str] = {}
    constants: dict[str, str] = {}
    modules: set[str] = {measure.__name__}
    declarations = []
    current: "Row | None" = row
    while current is not None:
        fn, keywords = _unwrap(current.apply)
        declarations.append({"id": current.id, "settings": current.settings, "kv_bits": current.kv_bits,
                             "keywords": repr(sorted(keywords.items()))})
        todo = [fn]
        while todo:
            fn = inspect.unwrap(todo.pop())  # the function under a decorator (torch.no_grad)
            if fn.__qualname__ in functions:
                continue
            functions[fn.__qualname__] = inspect.getsource(fn)
            more, found, values = _references(fn)
            todo += list(more)
            modules |= found
            constants.update(values)
        current = current.starts_from
    functions["Row.during"] = inspect.getsource(type(row).during)
    return Dependencies(functions, constants, frozenset(module_closure(modules)), tuple(declarations))


@functools.lru_cache(maxsize=None)
def _file_digest(module: str) -> str:
    return hashlib.sha256(Path(importlib.util.find_spec(module).origin).read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def _text_digest() -> str:
    """The text of every corpus split the rows read (evaluation, calibration)."""
    digest = hashlib.sha256()
    for name in data.CORPORA:
        for split in data.SPLITS:
            digest.update(data.load_text(name, split).encode())
    return digest.hexdigest()


def row_key(row: "Row", protocol: Protocol = DEFAULT_PROTOCOL) -> str:
    """12 hex digits identifying what decides ``row``'s results (:func:`dependencies`, the protocol, the
    corpora's text, the versions of torch and transformers). A row of the table with another key is
    measured again."""
    import transformers

    deps = dependencies(row)
    parts = {
        "protocol": dataclasses.asdict(protocol),
        "declarations": deps.declarations,
        "functions": deps.functions,
        "constants": deps.constants,
        "modules": {m: _file_digest(m) for m in sorted(deps.modules)},
        "text": _text_digest(),
        "versions": [torch.__version__, transformers.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
