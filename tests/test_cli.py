"""`adjoint-jax compare`: it runs, writes its files, its errors match a direct
computation, its fitted slopes match the samplers' orders, and bad options fail with a
one-line message."""

import csv
import io
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rich.console import Console

import adjoint_jax as aj
from adjoint_jax._cli import main
from adjoint_jax.bench import GaussianProblem, make_problem
from adjoint_jax.bench._orders import add_slopes, is_asymptotic, local_slopes
from adjoint_jax.bench._report import TABLE_WIDTH, print_table

from .helpers import rel_err


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {
    "problem",
    "sampler",
    "adjoint",
    "steps",
    "wrt",
    "rel_error",
    "cosine",
    "rel_error_discrete",
    "cosine_discrete",
    "nfe_forward",
    "nfe_backward",
    "grad_time_s",
    "sample_time_s",
    "ratio",
    "temp_bytes",
    "compile_time_s",
}


def _run(tmp_path, *argv, quiet=True):
    out = str(tmp_path)
    flags = ["--quiet"] if quiet else []
    assert (
        main(["compare", "--problem", "gaussian", "--out", out, *flags, *argv]) == 0
    )
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f), out


def _direct(sampler, n, wrt):
    """The DTO gradient and the closed-form gradient, computed here from scratch."""
    pb = GaussianProblem.make(4)
    inputs = make_problem("gaussian")  # only for its x_T and cond
    x_T, cond = inputs.x_T[0], inputs.cond
    w = jnp.array([1.0, -2.0, 0.5, 1.5])

    def loss(x0):
        return jnp.sum(w * jnp.sin(x0)) + 0.5 * jnp.sum(x0**2)

    ts = aj.time_grid(pb.schedule, n, t_end=1e-3)
    argnum = {"params": 0, "xT": 1, "cond": 2}[wrt]

    def sampled(p, x, c):
        return loss(
            aj.sample(
                pb.model,
                p,
                x,
                c,
                schedule=pb.schedule,
                ts=ts,
                sampler=sampler,
                adjoint=aj.DTO(),
            )
        )

    def exact(p, x, c):
        return loss(pb.flow_map(p, x, c, pb.schedule.t_max, 1e-3))

    args = (pb.params, x_T, cond)
    return jax.grad(sampled, argnum)(*args), jax.grad(exact, argnum)(*args)


def _cosine(a, b):
    a = np.concatenate([np.ravel(v) for v in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(v) for v in jax.tree.leaves(b)])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_compare_writes_results_and_matches_direct_computation(tmp_path, capsys):
    records, out = _run(
        tmp_path,
        "--steps",
        "8",
        "16",
        "--samplers",
        "DPMSolver2()",
        "--adjoints",
        "DTO()",
        "AdjointDEIS()",
        "--wrt",
        "xT,params",
        "--repeats",
        "2",
        quiet=False,
    )
    # Not a terminal: one progress line per finished (sampler, adjoint, N), with an
    # ETA, then the table on stdout.
    captured = capsys.readouterr()
    progress = [ln for ln in captured.err.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0] for ln in progress] == [f"[{k}/4" for k in range(1, 5)]
    assert all(" done; " in ln and "ETA" in ln for ln in progress)
    assert progress[-1].endswith("ETA 0 s")
    assert "AdjointDEIS()" in captured.out
    # The table fits 100 columns, whatever the names (every field is in the CSV).
    width = max(len(line) for line in captured.out.splitlines())
    assert width <= 100, width
    for name in (
        "results.json",
        "results.csv",
        "error_vs_steps.png",
        "pareto.png",
        "memory_vs_steps.png",
    ):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(records) == len(rows) == 2 * 2 * 2  # adjoints × N × wrt
    assert KEYS <= set(records[0]) and KEYS <= set(rows[0])
    assert {r["adjoint"] for r in records} == {"DTO()", "AdjointDEIS()"}
    assert {r["sampler"] for r in records} == {"DPMSolver2()"}

    for r in records:
        assert r["problem"] == "gaussian" and r["nfe_forward"] == r["steps"]
        assert r["grad_time_s"] > 0 and r["sample_time_s"] > 0 and r["temp_bytes"] > 0
        assert r["ratio"] == pytest.approx(r["grad_time_s"] / r["sample_time_s"])
        if r["adjoint"] == "DTO()":
            g, truth = _direct(aj.DPMSolver2(), r["steps"], r["wrt"])
            assert r["rel_error"] == pytest.approx(rel_err(g, truth), rel=1e-9)
            assert r["cosine"] == pytest.approx(_cosine(g, truth), rel=1e-9)
            assert r["rel_error_discrete"] == 0.0 and r["nfe_backward"] == 0
        else:
            # AdjointDEIS re-solves the states: one VJP (and evaluation) per step.
            assert r["nfe_backward"] == r["vjp_backward"] == r["steps"]
            assert r["rel_error_discrete"] > 0


def test_fitted_slopes_match_sampler_orders(tmp_path):
    records, _ = _run(
        tmp_path,
        "--steps",
        "10",
        "20",
        "40",
        "--samplers",
        "DPMSolver1()",
        "DPMSolver2()",
        "--adjoints",
        "DTO()",
        "--no-figures",
        "--repeats",
        "1",
    )
    orders = {"DPMSolver1()": 1, "DPMSolver2()": 2}
    assert {r["sampler"] for r in records} == set(orders)
    for r in records:
        assert abs(r["slope"] - orders[r["sampler"]]) < 0.25, r
        assert r["slope_discrete"] is None  # DTO against itself: no error to fit
        assert r["asymptotic"] is True, r  # local slopes agree: an order


def test_pre_asymptotic_orders_are_flagged_with_a_working_suggestion():
    # Local slopes 1.0, 1.0 (an order) against 6.6, 0.9 (AdjointDEIS-2 at N = 10 ... 40).
    assert is_asymptotic([10, 20, 40], [0.4, 0.2, 0.1])
    assert not is_asymptotic([10, 20, 40], [3.6e3, 3.6e1, 2.0e1])
    assert not is_asymptotic([10, 20], [0.4, 0.2])  # two N cannot show it
    assert local_slopes([40, 10, 20], [0.1, 0.4, 0.2]) == pytest.approx([1.0, 1.0])

    def rec(adjoint, n, err):
        return dict(
            problem="p", sampler="DPMSolver2()", adjoint=adjoint, steps=n, wrt="xT",
            rel_error=err, cosine=0.9, rel_error_discrete=err, cosine_discrete=0.9,
            slope=math.nan, slope_discrete=math.nan, asymptotic=False, nfe_forward=n,
            nfe_backward=n, vjp_backward=n, grad_time_s=1e-3, sample_time_s=5e-4,
            ratio=2.0, temp_bytes=1024, compile_time_s=0.1, dtype="float64", batch=1,
        )

    records = add_slopes(
        [rec("DTO()", n, 4.0 / n) for n in (10, 20, 40)]
        + [rec("AdjointDEIS(order=2)", n, e) for n, e in zip((10, 20, 40), (3.6e3, 36, 20))]
    )
    buf = io.StringIO()
    print_table(records, Console(file=buf, width=TABLE_WIDTH))
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= TABLE_WIDTH
    orders = [ln.split()[-1] for ln in text.splitlines() if ln.strip().startswith(("DTO", "Adj"))]
    assert orders[0] == "1.00" and orders[1].endswith("*"), orders
    assert "pre-asymptotic" in text and "--steps 40 80 160" in text


def test_table_never_cuts_a_name():
    # The longest names the main job prints (and longer): each appears whole, across
    # the lines of its cell, and nothing is cut with an ellipsis at TABLE_WIDTH.
    sampler = "McCallumFoster(DPMSolverPP(order=3, third_order='taylor'), coupling=0.999)"
    adjoints = ["InterpolatedAdjoint(order=2)", "DTO(checkpoints='steps')",
                "RecordedAdjoint(order=2, interpolation='hermite')"]
    records = [
        dict(problem="p", sampler=sampler, adjoint=a, steps=n, wrt="xT",
             rel_error=1.0 / n, cosine=0.9, rel_error_discrete=1.0 / n,
             cosine_discrete=0.9, slope=1.0, slope_discrete=1.0, asymptotic=True,
             nfe_forward=n, nfe_backward=n, vjp_backward=n, grad_time_s=1e-3,
             sample_time_s=5e-4, ratio=2.0, temp_bytes=1024, compile_time_s=0.1,
             dtype="float64", batch=1)
        for a in adjoints for n in (10, 20)
    ]
    buf = io.StringIO()
    print_table(records, Console(file=buf, width=TABLE_WIDTH))
    text = buf.getvalue()
    assert "…" not in text and "..." not in text
    assert max(len(line) for line in text.splitlines()) <= TABLE_WIDTH
    squeeze = lambda t: "".join(t.split())  # noqa: E731
    assert squeeze(sampler) in squeeze(text)  # the title wraps, whole
    # The adjoint column's cells, rejoined across the lines of each wrapped cell.
    # (A cell's text runs up to the first gap of two spaces.)
    column = squeeze("".join(re.split(r"\s{2,}", ln.strip())[0] for ln in text.splitlines()
                             if ln.startswith(" ")))
    for name in adjoints:
        assert squeeze(name) in column, (name, text)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--samplers", "NotASampler()"], "unknown sampler"),
        (["--adjoints", "DTO(checkpoints=-1)"], "DTO(checkpoints=...)"),
        (
            ["--samplers", "DPMSolver1()", "--adjoints", "ReversibleAdjoint()"],
            "requires a reversible sampler",
        ),
        (["--steps", "0"], "positive"),
        (["--steps", "-3", "10"], "positive"),
        (["--wrt", "theta"], "unknown --wrt"),
        (["--problem", "nope"], "invalid choice"),
    ],
)
def test_bad_options_fail_with_one_line(argv, fragment, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert fragment in err and "Traceback" not in err


def test_console_script_and_module_entry_point():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["adjoint-jax"] == "adjoint_jax._cli:main"
    proc = subprocess.run(
        [sys.executable, "-m", "adjoint_jax._cli", "compare", "--steps", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_overview_set_is_valid_and_has_every_family():
    from adjoint_jax.bench._pairs import overview_pairs
    from adjoint_jax.bench._report import family

    pairs = overview_pairs()
    for s, a in pairs:
        a.check_sampler(s)
    fams = {family(repr(a)) for _, a in pairs}
    assert {"DTO", "continuous", "ReversibleAdjoint"} <= fams
    # Every sampler of the set has its exact gradient (DTO) measured first.
    firsts = {}
    for s, a in pairs:
        firsts.setdefault(repr(s), repr(a))
    assert set(firsts.values()) == {"DTO()"}


def test_compare_docstring_lists_every_record_key():
    from adjoint_jax.bench import _compare

    returns = _compare.compare.__doc__.split("**Returns:**")[1].split("in that order")[0]
    assert tuple(re.findall(r"`(\w+)`", returns)) == _compare.FIELDS
