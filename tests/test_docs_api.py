"""The API reference (docs/api/*.md) is complete: every public name of `adjoint_jax`
(`aj.zoo`'s included) and of `adjoint_jax.bench` is rendered by a mkdocstrings
`::: path` directive (or is a member that a directive on its module renders), and
is listed in the table of docs/api/index.md; every directive names an existing
public object, and the members it selects exist; the class signatures the docs show
are the runtime ones. Pure Python: no mkdocs build.
"""

import importlib
import inspect
import os
import re

import pytest

import adjoint_jax as aj
import adjoint_jax.bench as bench
import adjoint_jax.zoo as zoo


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = os.path.join(ROOT, "docs", "api")

DIRECTIVE = re.compile(r"^::: *([\w.]+) *$", re.M)


def _public(module) -> dict[str, object]:
    """The public names of `module`: not private, not dunder, not a module."""
    return {
        f"{module.__name__}.{name}": getattr(module, name)
        for name in dir(module)
        if not name.startswith("_") and not inspect.ismodule(getattr(module, name))
    }


def _expected() -> dict[str, object]:
    return {**_public(aj), **_public(zoo), **_public(bench)}


def _pages() -> dict[str, str]:
    return {
        name: open(os.path.join(API, name), encoding="utf-8").read()
        for name in sorted(os.listdir(API))
        if name.endswith(".md")
    }


def _members_option(block: str):
    """The `members:` option of a directive's indented options block: None (not
    given), False, True, or a list of names (inline `[a, b]` or a YAML block list)."""
    m = re.search(r"^\s+members:[ \t]*(.*)$", block, re.M)
    if m is None:
        return None
    value = m.group(1).strip()
    if value in ("false", "False", "no"):
        return False
    if value in ("true", "True", "yes"):
        return True
    if value.startswith("["):
        return [
            v.strip().strip("'\"") for v in value.strip("[]").split(",") if v.strip()
        ]
    names = []
    for line in block[m.end() :].splitlines()[1:]:
        if not line.strip().startswith("- "):
            break
        names.append(line.strip()[2:].strip().strip("'\""))
    return names


def _directives() -> list[tuple[str, str, object]]:
    """(page, path, members option) of every `::: path` directive."""
    out = []
    for page, text in _pages().items():
        for m in DIRECTIVE.finditer(text):
            block = []
            for line in text[m.end() :].splitlines()[1:]:
                if line.strip() and not line.startswith((" ", "\t")):
                    break
                block.append(line)
            out.append((page, m.group(1), _members_option("\n".join(block))))
    return out


def _resolve(path: str):
    """The object `path` names, importing the longest module prefix; raises
    LookupError if there is none."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                raise LookupError(f"{'.'.join(parts[:i])} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise LookupError(f"no module in {path!r} can be imported")


def _suggested_page(path: str, obj) -> str:
    """Where a missing public name belongs (the groups of docs/api/index.md)."""
    if path.startswith("adjoint_jax.bench."):
        return "bench.md"
    if path.startswith("adjoint_jax.zoo."):
        return "zoo.md"
    for base, page in (
        (aj.AbstractSampler, "samplers.md"),
        (aj.AbstractAdjoint, "strategies.md"),
        (aj.AbstractSchedule, "schedules.md"),
        (aj.AbstractPredictor, "models.md"),
    ):
        if inspect.isclass(obj) and issubclass(obj, base):
            return page
    module = getattr(obj, "__module__", "") or ""
    for part, page in (
        ("_sample", "sampling.md"),
        ("_samplers", "samplers.md"),
        ("_adjoints", "strategies.md"),
        ("_schedule", "schedules.md"),
        ("_time_grid", "schedules.md"),
        ("_adaptive", "schedules.md"),
        ("_model", "models.md"),
        ("_diffusers", "diffusers.md"),
        ("_estimators", "estimators.md"),
        ("_regularisers", "estimators.md"),
        ("_adjoint_matching", "estimators.md"),
        ("_implicit_diffusion", "algorithms.md"),
    ):
        if f".{part}" in module:
            return page
    return "the page of its group (the sections of docs/api/index.md)"


def test_every_directive_names_a_public_object():
    expected = _expected()
    problems = []
    for page, path, members in _directives():
        try:
            obj = _resolve(path)
        except LookupError as e:
            problems.append(f"docs/api/{page}: `::: {path}` does not exist ({e})")
            continue
        if isinstance(members, list):
            problems += [
                f"docs/api/{page}: `::: {path}` lists member {name!r}, which "
                f"{path} does not have"
                for name in members
                if not hasattr(obj, name)
            ]
        private = any(p.startswith("_") for p in path.split("."))
        if private or (path not in expected and not inspect.ismodule(obj)):
            problems.append(
                f"docs/api/{page}: `::: {path}` is not a public name of adjoint_jax, "
                "adjoint_jax.zoo or adjoint_jax.bench (document it by its public path)"
            )
    assert not problems, "\n".join(problems)


def test_every_public_name_is_rendered():
    expected = _expected()
    rendered: dict[str, list[str]] = {}
    for page, path, members in _directives():
        rendered.setdefault(path, []).append(page)
        try:
            obj = _resolve(path)
        except LookupError:
            continue  # reported by the test above
        if inspect.ismodule(obj) and members is not False:
            names = (
                _public(obj)
                if members in (None, True)
                else {f"{path}.{n}": None for n in members}
            )
            for name in names:
                rendered.setdefault(name, []).append(page)
    missing = sorted(set(expected) - set(rendered))
    lines = []
    for name in missing:
        page = _suggested_page(name, expected[name])
        where = f"docs/api/{page}" if page.endswith(".md") else page
        lines.append(f"`{name}` has no `::: {name}` directive; add one to {where}")
    twice = {n: p for n, p in rendered.items() if n in expected and len(p) > 1}
    lines += [
        f"`{name}` is rendered more than once ({', '.join(pages)}): keep one, so "
        "that cross-references have one target"
        for name, pages in sorted(twice.items())
    ]
    assert not lines, "\n".join(lines)


def test_index_lists_every_public_name():
    index = _pages()["index.md"]
    listed = set(re.findall(r"\]\[([\w.]+)\]", index))
    missing = sorted(set(_expected()) - listed)
    assert not missing, "\n".join(
        f"`{name}` is not in the table of docs/api/index.md: add a row "
        f"`| [`...`][{name}] | one line |` to its group's table"
        for name in missing
    )


def test_class_signatures_match_the_runtime():
    """The extension docs/api/_griffe_fields.py (mkdocs.yml loads it) rebuilds the
    generated `__init__` of Equinox modules and NamedTuples from the source: the
    signatures it gives the public classes are the runtime ones (names, order,
    which have defaults; private fields left out)."""
    griffe = pytest.importorskip("griffe")
    extension = os.path.join(API, "_griffe_fields.py") + ":FieldsExtension"
    package = griffe.load(
        "adjoint_jax",
        search_paths=[ROOT],
        extensions=griffe.load_extensions(extension),
        resolve_aliases=True,
    )
    problems = []
    for path, obj in _expected().items():
        if not inspect.isclass(obj):
            continue
        documented = package[path[len("adjoint_jax.") :]]
        init = documented.final_target.all_members.get("__init__")
        got = (
            []
            if init is None
            else [
                (p.name, p.default is not None)
                for p in init.parameters
                if p.name != "self"
            ]
        )
        want = [
            (p.name, p.default is not inspect.Parameter.empty)
            for p in inspect.signature(obj).parameters.values()
            if not p.name.startswith("_")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if got != want:
            problems.append(f"{path}: documented {got}, runtime {want}")
    assert not problems, "\n".join(problems)
