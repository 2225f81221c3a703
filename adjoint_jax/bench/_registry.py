"""Parsing samplers and adjoints from text, for command lines: the text is the repr of
the object (`"DPMSolver2()"`, `"AdjointDEIS(order=2)"`, `"McCallumFoster(DPMSolver2(),
coupling=0.999)"`), with the `aj.` prefix optional. Only calls of public `aj` classes
with literal arguments (numbers, strings, None, booleans and nested such calls) are
accepted; nothing is evaluated."""

import ast

import adjoint_jax as aj


def _public(base) -> dict:
    return {
        name: obj
        for name, obj in vars(aj).items()
        if isinstance(obj, type) and issubclass(obj, base) and not name.startswith("Abstract")
    }


def _build(node, namespace):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_build(node.operand, namespace)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        if node.value.id in ("aj", "adjoint_jax"):
            return _build(ast.Name(node.attr), namespace)
        if node.value.id == "diffrax":
            import diffrax

            obj = getattr(diffrax, node.attr, None)
            if isinstance(obj, type):
                return obj
    if isinstance(node, ast.Name) and node.id in namespace:
        return namespace[node.id]
    if isinstance(node, ast.Call):
        fn = _build(node.func, namespace)
        args = [_build(a, namespace) for a in node.args]
        kwargs = {k.arg: _build(k.value, namespace) for k in node.keywords}
        return fn(*args, **kwargs)
    raise ValueError(f"unsupported expression {ast.unparse(node)!r}")


def parse(text: str, kind: str):
    """Builds the sampler (`kind="sampler"`) or adjoint (`kind="adjoint"`) that `text`
    names. A bare class name needs no parentheses. Raises `ValueError` with a one-line
    message naming the valid choices.

    `text` is the object's repr, as the `adjoint-jax compare` command line takes it
    (`"DPMSolver2()"`, `"AdjointDEIS(order=2)"`, `"McCallumFoster(DPMSolver2(),
    coupling=0.999)"`), the `aj.` prefix optional: calls of public `aj` classes with
    literal arguments only; nothing is evaluated."""
    if kind not in ("sampler", "adjoint"):
        raise ValueError(f"kind must be 'sampler' or 'adjoint'; got {kind!r}")
    own = _public(aj.AbstractSampler if kind == "sampler" else aj.AbstractAdjoint)
    # Samplers may wrap samplers (McCallumFoster(DPMSolver2())); AdjointDPM's repr
    # names its diffrax solver without the module (`AdjointDPM(solver=Tsit5())`).
    import diffrax

    solvers = {
        n: o for n, o in vars(diffrax).items()
        if isinstance(o, type) and issubclass(o, diffrax.AbstractSolver)
    }
    namespace = {**solvers, **_public(aj.AbstractSampler), **own}
    try:
        tree = ast.parse(text.strip(), mode="eval").body
        if isinstance(tree, ast.Name | ast.Attribute):
            tree = ast.Call(tree, [], [])
        obj = _build(tree, namespace)
    except (SyntaxError, ValueError, TypeError) as e:
        choices = ", ".join(sorted(own))
        raise ValueError(f"unknown {kind} {text!r} ({e}); choose from: {choices}") from None
    base = aj.AbstractSampler if kind == "sampler" else aj.AbstractAdjoint
    if not isinstance(obj, base):
        raise ValueError(f"{text!r} is not a {kind}")
    return obj
