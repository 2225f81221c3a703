"""A griffe extension for the API reference: gives Equinox modules and NamedTuples
the `__init__` that their metaclass writes at import time, so that mkdocstrings shows
their fields in the class signature (`merge_init_into_class`).

Griffe reads the source statically. It re-creates `__init__` for classes decorated
with `@dataclasses.dataclass`, but not for `eqx.Module` subclasses (dataclasses made
by a metaclass) or `typing.NamedTuple`s, which would then be documented as `DTO()`
with no arguments. This extension applies the dataclass rules to them, from the
source alone (nothing is imported, so the docs build does not import JAX): the
fields are the annotated class attributes of the class and its bases, bases first,
except `ClassVar`s, `eqx.AbstractVar`s and `AbstractClassVar`s and fields with
`init=False`; a field's default is its value or the `default=` of its `eqx.field`.
Private fields (`_name`) are left out of the signature. A class that writes its own
`__init__` keeps it. `tests/test_docs_api.py` checks the result against the runtime
signatures.

Used from mkdocs.yml:

    plugins:
      - mkdocstrings:
          handlers:
            python:
              options:
                extensions:
                  - docs/api/_griffe_fields.py:FieldsExtension
"""

from typing import Any

import griffe


_MODULE_BASES = {
    "equinox.Module",
    "equinox._module.Module",
    "equinox._module._module.Module",
}
_NAMEDTUPLE_BASES = {"typing.NamedTuple", "collections.namedtuple"}
_NOT_FIELDS = ("AbstractVar", "AbstractClassVar", "ClassVar", "InitVar")
_FIELD_CALLS = {"field", "eqx.field", "equinox.field", "dataclasses.field"}


def _mro(cls: griffe.Class) -> list[griffe.Class]:
    try:
        return [cls, *cls.mro()]
    except Exception:  # noqa: BLE001 - unresolvable bases: the class alone
        return [cls]


def _external_bases(cls: griffe.Class) -> set[str]:
    paths = set()
    for klass in _mro(cls):
        for base in klass.bases:
            expr = base.left if isinstance(base, griffe.ExprSubscript) else base
            path = getattr(expr, "canonical_path", str(expr))
            paths.add(path)
    return paths


def _kind(cls: griffe.Class) -> str | None:
    bases = _external_bases(cls)
    if bases & _MODULE_BASES:
        return "module"
    if bases & _NAMEDTUPLE_BASES:
        return "namedtuple"
    return None


def _field_call(value: Any) -> griffe.ExprCall | None:
    if isinstance(value, griffe.ExprCall) and str(value.function) in _FIELD_CALLS:
        return value
    return None


def _call_kwargs(call: griffe.ExprCall) -> dict[str, Any]:
    return {
        a.name: a.value for a in call.arguments if getattr(a, "name", None) is not None
    }


def _is_field(attribute: griffe.Attribute) -> bool:
    if attribute.annotation is None or "property" in attribute.labels:
        return False
    if "class-attribute" in attribute.labels and (
        "instance-attribute" not in attribute.labels
    ):
        return False  # a `ClassVar`, unwrapped by griffe
    annotation = attribute.annotation
    if isinstance(annotation, griffe.ExprSubscript):
        if str(annotation.left).rsplit(".", 1)[-1] in _NOT_FIELDS:
            return False
    call = _field_call(attribute.value)
    return call is None or str(_call_kwargs(call).get("init", True)) != "False"


def _default(attribute: griffe.Attribute) -> tuple[bool, Any]:
    """(has a default, the default as written): `x: T = v` gives `v`,
    `x: T = eqx.field(default=v)` gives `v` and `default_factory=f` gives `f()`
    (`e` for `f = lambda: e`)."""
    value = attribute.value
    call = _field_call(value)
    if call is None:
        return value is not None, value
    kwargs = _call_kwargs(call)
    if "default" in kwargs:
        return True, kwargs["default"]
    if "default_factory" in kwargs:
        factory = kwargs["default_factory"]
        if isinstance(factory, griffe.ExprLambda) and not factory.parameters:
            return True, factory.body
        return True, f"{factory}()"
    return False, None


def _fields(cls: griffe.Class) -> list[griffe.Attribute]:
    """The dataclass fields of `cls` in dataclass order (bases first; a field
    redeclared by a subclass keeps its place and takes the new declaration)."""
    fields: dict[str, griffe.Attribute] = {}
    for klass in reversed(_mro(cls)):
        for name, member in klass.members.items():
            if member.is_alias or not member.is_attribute:
                continue
            if _is_field(member):
                fields[name] = member
            elif name in fields and "property" in member.labels:
                del fields[name]
    return list(fields.values())


def _add_init(cls: griffe.Class) -> None:
    parameters = [
        griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)
    ]
    for field in _fields(cls):
        if field.name.startswith("_"):
            continue  # a private field (it has a default): not part of the API
        has_default, default = _default(field)
        parameters.append(
            griffe.Parameter(
                field.name,
                annotation=field.annotation,
                kind=griffe.ParameterKind.positional_or_keyword,
                default=default if has_default else None,
                docstring=field.docstring,
            )
        )
    if len(parameters) == 1:
        return  # e.g. an abstract base with no fields: nothing worth a signature
    cls.set_member(
        "__init__",
        griffe.Function(
            "__init__",
            lineno=0,
            endlineno=0,
            parent=cls,
            parameters=griffe.Parameters(*parameters),
            returns="None",
        ),
    )


def _tidy_dataclass_init(init: griffe.Function) -> None:
    """Griffe's own dataclass `__init__` shows `field(default_factory=lambda: e)` as
    `(lambda: e)()`; show `e`."""
    for p in init.parameters:
        d = p.default
        if (
            isinstance(d, griffe.ExprCall)
            and not d.arguments
            and isinstance(d.function, griffe.ExprLambda)
            and not d.function.parameters
        ):
            p.default = d.function.body


def _writes_init(cls: griffe.Class) -> bool:
    """Whether `cls` or one of its bases writes `__init__` in the source: Equinox
    then generates none, and griffe shows the written one."""
    for klass in _mro(cls):
        init = klass.members.get("__init__")
        if init is not None and (init.is_alias or init.lineno != 0):
            return True  # (lineno 0: one made by this extension or griffe's)
    return False


def _visit(obj: griffe.Module | griffe.Class, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    for member in list(obj.members.values()):
        if member.is_alias:
            continue
        if member.is_module:
            _visit(member, seen)
        elif member.is_class:
            init = member.members.get("__init__")
            if init is not None and not init.is_alias and init.lineno == 0:
                _tidy_dataclass_init(init)  # made by griffe's dataclasses extension
            if _kind(member) is not None and not _writes_init(member):
                _add_init(member)
            _visit(member, seen)


class FieldsExtension(griffe.Extension):
    """Adds the generated `__init__` of Equinox modules and NamedTuples."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        # Griffe runs its dataclasses extension after the configured ones; run it
        # first (it is idempotent) so that its `__init__`s can be tidied here.
        griffe.DataclassesExtension().on_package(pkg=pkg, **kwargs)
        _visit(pkg, set())
