"""Reporting the records of `compare`: a terminal table (rich), `results.json`,
`results.csv`, and figures (matplotlib): error against N with fitted slopes, error
against gradient time (the Pareto front), and memory against N."""

import csv
import json
import math
import os
from collections.abc import Sequence

from ._compare import FIELDS


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_results(records: Sequence[dict], out_dir: str) -> tuple[str, str]:
    """Writes `results.json` (a list of records; NaN written as null) and
    `results.csv` (NaN as an empty cell) into `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    csv_path = os.path.join(out_dir, "results.csv")
    keys = list(FIELDS) + sorted({k for r in records for k in r} - set(FIELDS))
    with open(json_path, "w") as f:
        json.dump([{k: _clean(r.get(k)) for k in keys} for r in records], f, indent=1)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in records:
            w.writerow({k: "" if _clean(r.get(k)) is None else r.get(k) for k in keys})
    return json_path, csv_path


# ---- terminal ---------------------------------------------------------------------
def _fmt(v, spec):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)


def _bytes(b):
    if b is None or b < 0:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b} B"


def print_table(records: Sequence[dict], console=None) -> None:
    """Prints one row per record and a table of the fitted orders."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not records:
        console.print("no records")
        return
    r0 = records[0]
    table = Table(
        title=f"adjoint-jax compare: {r0['problem']} "
        f"({r0['dtype']}, batch {r0['batch']})",
        caption="err, cos: relative L2 error and cosine similarity of the gradient "
        "against the continuous-time truth; err/DTO, cos/DTO: against the exact "
        "gradient of the same sampler (DTO()); R = gradient time / sampling time; "
        "temp: XLA temporary memory of the jitted gradient",
        title_justify="left",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for name in [
        "sampler",
        "adjoint",
        "N",
        "wrt",
        "err",
        "cos",
        "err/DTO",
        "cos/DTO",
        "NFE fwd",
        "NFE bwd",
        "VJP bwd",
        "grad ms",
        "sample ms",
        "R",
        "temp",
        "compile s",
    ]:
        left = name in ("sampler", "adjoint", "wrt")
        table.add_column(name, justify="left" if left else "right", no_wrap=True)
    last = None
    for r in records:
        key = (r["sampler"], r["adjoint"])
        if last is not None and key != last:
            table.add_section()
        first = key != last
        last = key
        table.add_row(
            r["sampler"] if first else "",
            r["adjoint"] if first else "",
            str(r["steps"]),
            r["wrt"],
            _fmt(r["rel_error"], ".2e"),
            _fmt(r["cosine"], ".4f"),
            _fmt(r["rel_error_discrete"], ".2e"),
            _fmt(r["cosine_discrete"], ".4f"),
            str(r["nfe_forward"]),
            str(r["nfe_backward"]),
            str(r["vjp_backward"]),
            _fmt(1e3 * r["grad_time_s"], ".3f"),
            _fmt(1e3 * r["sample_time_s"], ".3f"),
            _fmt(r["ratio"], ".2f"),
            _bytes(r["temp_bytes"]),
            _fmt(r["compile_time_s"], ".2f"),
        )
    console.print(table)

    slopes = Table(
        title="fitted orders: least-squares slope of log(err) against log(1/N)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for name in ("sampler", "adjoint", "wrt", "vs truth", "vs DTO"):
        slopes.add_column(name, no_wrap=True)
    seen = set()
    for r in records:
        key = (r["sampler"], r["adjoint"], r["wrt"])
        if key in seen:
            continue
        seen.add(key)
        slopes.add_row(*key, _fmt(r["slope"], ".2f"), _fmt(r["slope_discrete"], ".2f"))
    console.print(slopes)


# ---- figures ----------------------------------------------------------------------
def _strategy(r):
    return f"{r['sampler']} + {r['adjoint']}"


def _error_of(r):
    """The continuous-truth error where known, else the discrete one."""
    e = r["rel_error"]
    if e is None or not math.isfinite(e):
        e = r["rel_error_discrete"]
    return e if e is not None and math.isfinite(e) and e > 0 else None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (time, error) points not beaten on both time and error, by time."""
    front, best = [], math.inf
    for t, e in sorted(points):
        if e < best:
            front.append((t, e))
            best = e
    return front


def plot_figures(records: Sequence[dict], out_dir: str, prefix: str = "") -> list[str]:
    """Writes `error_vs_steps.png` (log-log, fitted slopes in the legend), `pareto.png`
    (error against gradient time, with the Pareto front) and `memory_vs_steps.png`
    into `out_dir`, one panel per differentiated input; colour by adjoint, marker by
    sampler. Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    wrts = list(dict.fromkeys(r["wrt"] for r in records))
    adjoints = list(dict.fromkeys(r["adjoint"] for r in records))
    samplers = list(dict.fromkeys(r["sampler"] for r in records))
    strategies = list(dict.fromkeys(_strategy(r) for r in records))
    cmap = plt.get_cmap("tab10" if len(adjoints) <= 10 else "tab20")
    colour = {a: cmap(i % cmap.N) for i, a in enumerate(adjoints)}
    markers = "osD^v<>phX*P"
    marker = {s: markers[i % len(markers)] for i, s in enumerate(samplers)}

    def style(r):
        return dict(
            color=colour[r["adjoint"]],
            marker=marker[r["sampler"]],
            markersize=4,
            linewidth=1.0,
        )

    problem = records[0]["problem"] if records else ""
    continuous = any(
        r["rel_error"] is not None and math.isfinite(r["rel_error"]) for r in records
    )
    ylabel = "relative L2 error of the gradient" + (
        " (against the continuous truth, else DTO)" if continuous else " (against DTO)"
    )
    ncol = 1 if len(strategies) <= 12 else 2
    rows = -(-len(strategies) // ncol)

    def panels(title):
        fig, axes = plt.subplots(
            1, len(wrts), figsize=(7.0 * len(wrts), 4.8 + 0.15 * rows), squeeze=False
        )
        fig.suptitle(f"{title} — {problem}")
        return fig, axes[0]

    def finish(ax, w, xlabel, ylab, cap=False):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylab)
        ax.set_title(f"d loss / d {w}")
        ax.grid(True, which="both", alpha=0.3)
        ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
        if cap and ys and max(ys) > 10.0:
            # blown-up gradients (error > 10) are off the chart
            ax.set_ylim(bottom=min(ys) / 3, top=10.0)
        ax.legend(
            fontsize=6,
            ncol=ncol,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.12),
            frameon=False,
        )

    def save(fig, name):
        path = os.path.join(out_dir, prefix + name)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    def series(w):
        out: dict[str, list[dict]] = {}
        for r in records:
            if r["wrt"] == w:
                out.setdefault(_strategy(r), []).append(r)
        return out

    paths: list[str] = []

    # error against N, with fitted slopes
    fig, axes = panels("gradient error against the number of steps")
    for ax, w in zip(axes, wrts):
        for s, rs in series(w).items():
            pts = [(r["steps"], _error_of(r)) for r in rs if _error_of(r) is not None]
            if not pts:
                continue
            slope = rs[0]["slope"] if continuous else rs[0]["slope_discrete"]
            label = s + (
                ""
                if slope is None or not math.isfinite(slope)
                else f"  (slope {slope:.2f})"
            )
            ax.loglog(*zip(*pts), label=label, **style(rs[0]))
        finish(ax, w, "steps N", ylabel, cap=True)
    save(fig, "error_vs_steps.png")

    # error against gradient time: the Pareto front
    fig, axes = panels("gradient error against gradient wall time")
    for ax, w in zip(axes, wrts):
        allpts = []
        for s, rs in series(w).items():
            pts = [
                (r["grad_time_s"], _error_of(r)) for r in rs if _error_of(r) is not None
            ]
            if not pts:
                continue
            allpts += pts
            ax.loglog(*zip(*sorted(pts)), label=s, alpha=0.85, **style(rs[0]))
        front = pareto_front(allpts)
        if front:
            ax.loglog(
                *zip(*front),
                color="black",
                linewidth=4,
                alpha=0.25,
                label="Pareto front",
                zorder=0,
            )
        finish(
            ax, w, "gradient wall time [s] (median of jitted runs)", ylabel, cap=True
        )
    save(fig, "pareto.png")

    # memory against N
    fig, axes = panels("XLA temporary memory of the jitted gradient")
    for ax, w in zip(axes, wrts):
        for s, rs in series(w).items():
            pts = [
                (r["steps"], r["temp_bytes"] / 2**10) for r in rs if r["temp_bytes"] > 0
            ]
            if pts:
                ax.loglog(*zip(*pts), label=s, **style(rs[0]))
        finish(ax, w, "steps N", "temporary memory [KiB]")
    save(fig, "memory_vs_steps.png")
    return paths
