"""Which (sampler, adjoint) pairs `adjoint-jax compare` measures: every public
strategy at its default settings (new ones enrol automatically), the main job's
overview pairs, and the validity check of a pair."""

import adjoint_jax as aj


# Classes that need arguments or have variants worth measuring; every other public
# sampler and adjoint enrols automatically at its default settings.
_PREFERRED_SAMPLERS = (
    "DPMSolver1",
    "DPMSolver2",
    "DPMSolverPP",
    "DDIM",
    "SDEDPMSolver1",
    "ReversibleHeun",
    "AsyncLeapfrog",
    "BELM",
    "BDIA",
    "EDICT",
    "McCallumFoster",
)
_PREFERRED_ADJOINTS = (
    "DTO",
    "AdjointDEIS",
    "RecordedAdjoint",
    "InterpolatedAdjoint",
    "AdjointDPM",
    "ReversibleAdjoint",
)


def _variants(kind: str, name: str):
    table = {
        "McCallumFoster": lambda: [aj.McCallumFoster(aj.DPMSolver2())],
        "DDIM": lambda: [aj.DDIM(), aj.DDIM(eta=1.0)],
        "DPMSolverPP": lambda: [
            aj.DPMSolverPP(),
            aj.DPMSolverPP(order=3),
            aj.DPMSolverPP(order=3, third_order="taylor"),
        ],
        "DTO": lambda: [aj.DTO(), aj.DTO(checkpoints="steps"), aj.DTO(checkpoints=4)],
        "AdjointDEIS": lambda: [aj.AdjointDEIS(), aj.AdjointDEIS(order=2)],
        "RecordedAdjoint": lambda: [aj.RecordedAdjoint(), aj.RecordedAdjoint(order=2)],
    }
    if name in table:
        return table[name]()
    cls = getattr(aj, name)
    try:
        return [cls()]
    except TypeError:  # needs arguments and has no entry above: not enrolled
        return []


def _public_names(base, preferred) -> list[str]:
    names = [
        n
        for n, obj in vars(aj).items()
        if isinstance(obj, type)
        and issubclass(obj, base)
        and not n.startswith("Abstract")
    ]
    rank = {n: i for i, n in enumerate(preferred)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _dedupe(objs):
    seen, out = set(), []
    for o in objs:
        if repr(o) not in seen:
            seen.add(repr(o))
            out.append(o)
    return out


# The main job's default (`adjoint-jax compare` with no --samplers/--adjoints): each
# family once, DTO after every sampler (the exact gradient, and each sampler's order),
# the checkpointed DTOs, the continuous adjoints and every reversible pair, so that a
# run takes minutes and every panel of the figures stays readable. (Truncated backprop
# is left out: its default ∂L/∂x_T is zero by design; measure it with --wrt params.)
# `--all` measures every valid pair of every public strategy instead.
OVERVIEW = (
    ("DPMSolver1()", "DTO()"),
    ("DPMSolver2()", "DTO()"),
    ("DPMSolverPP()", "DTO()"),
    ("DPMSolverPP(order=3, third_order='taylor')", "DTO()"),
    ("SDEDPMSolver1()", "DTO()"),
    ("ReversibleHeun()", "DTO()"),
    ("AsyncLeapfrog()", "DTO()"),
    ("BELM()", "DTO()"),
    ("McCallumFoster(DPMSolver2())", "DTO()"),
    ("DPMSolverPP()", "DTO(checkpoints='steps')"),
    ("DPMSolverPP()", "DTO(checkpoints=4)"),
    ("DPMSolver1()", "AdjointDEIS()"),
    ("DPMSolver2()", "AdjointDEIS(order=2)"),
    ("DPMSolver2()", "InterpolatedAdjoint(order=2)"),
    ("DPMSolver2()", "AdjointDPM()"),
    ("SDEDPMSolver1()", "RecordedAdjoint()"),
    ("ReversibleHeun()", "ReversibleAdjoint()"),
    ("AsyncLeapfrog()", "ReversibleAdjoint()"),
    ("BELM()", "ReversibleAdjoint()"),
    ("McCallumFoster(DPMSolver2())", "ReversibleAdjoint()"),
)


def overview_pairs() -> list:
    """The (sampler, adjoint) pairs of `OVERVIEW`, the default of `adjoint-jax
    compare`, in sampler-major order (as `compare` measures them)."""
    from ._registry import parse

    pairs = [(parse(s, "sampler"), parse(a, "adjoint")) for s, a in OVERVIEW]
    order = list(dict.fromkeys(repr(s) for s, _ in pairs))
    return sorted(pairs, key=lambda p: order.index(repr(p[0])))


def default_samplers() -> list:
    """Every public sampler of `aj` at its default settings (`McCallumFoster` around
    `DPMSolver2()`); new samplers enrol automatically."""
    names = _public_names(aj.AbstractSampler, _PREFERRED_SAMPLERS)
    return _dedupe([s for n in names for s in _variants("sampler", n)])


def default_adjoints() -> list:
    """Every public adjoint of `aj` at its default settings, plus `DTO` with
    checkpointing and the second-order continuous adjoints."""
    names = _public_names(aj.AbstractAdjoint, _PREFERRED_ADJOINTS)
    return _dedupe([a for n in names for a in _variants("adjoint", n)])


def valid_pairs(samplers=None, adjoints=None, *, strict: bool = False) -> list:
    """The (sampler, adjoint) pairs that the library accepts, in sampler-major order.

    With `strict=True` every sampler and every adjoint given must be in at least one
    valid pair; otherwise a `ValueError` explains why (the adjoint's own message)."""
    samplers = default_samplers() if samplers is None else list(samplers)
    adjoints = default_adjoints() if adjoints is None else list(adjoints)
    pairs, reasons = [], {}
    for s in samplers:
        for a in adjoints:
            try:
                a.check_sampler(s)
            except ValueError as e:
                reasons.setdefault(repr(s), str(e))
                reasons.setdefault(repr(a), str(e))
                continue
            pairs.append((s, a))
    if strict:
        used = {repr(o) for p in pairs for o in p}
        for o in list(samplers) + list(adjoints):
            if repr(o) not in used:
                raise ValueError(f"invalid pair: {reasons[repr(o)]}")
    if not pairs:
        raise ValueError("no valid (sampler, adjoint) pair to measure")
    return pairs
