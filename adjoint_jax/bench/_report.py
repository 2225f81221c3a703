"""Reporting the records of `compare`: a terminal table (rich), `results.json`,
`results.csv`, and figures (matplotlib): error against N with fitted slopes, error
against gradient time (the Pareto front), and memory against N."""

import csv
import json
import math
import os
import re
import textwrap
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


def _order(r):
    """The fitted order of a record's series: against the truth, else (no truth, e.g.
    SDE samplers) against DTO."""
    s = r["slope"]
    return s if s is not None and math.isfinite(s) else r["slope_discrete"]


# The terminal table's width: it fits this many columns whatever the terminal
# (every field is in results.csv).
TABLE_WIDTH = 100
# The adjoint column's width; a longer name continues on the next line of its cell.
ADJOINT_WIDTH = 28


def _layout(records: Sequence[dict]) -> tuple[str, list, list]:
    """What both tables show: (the heading, the notes, [(sampler, columns, rows)]);
    a row's adjoint cell is empty below its first N."""
    r0 = records[0]
    wrts = list(dict.fromkeys(r["wrt"] for r in records))
    several = len(wrts) > 1
    truth = any(
        r["rel_error"] is not None and math.isfinite(r["rel_error"]) for r in records
    )
    heading = (
        f"adjoint-jax compare: {r0['problem']} ({r0['dtype']}, batch {r0['batch']}"
        + ("" if several else f", d loss / d {wrts[0]}") + ")"
    )
    cols = ["adjoint", "N"] + (["wrt"] if several else [])
    cols += (["err", "cos"] if truth else []) + ["err/DTO"]
    cols += ["NFE f+b", "R", "temp", "order"]
    flagged, tables = False, []
    for sampler in dict.fromkeys(r["sampler"] for r in records):
        rows, last = [], None
        for r in (r for r in records if r["sampler"] == sampler):
            first = r["adjoint"] != last
            last = r["adjoint"]
            order = "" if not (first or several) else _fmt(_order(r), ".2f")
            if order not in ("", "–") and not r.get("asymptotic", True):
                order += "*"
                flagged = True
            row = [r["adjoint"] if first else "", str(r["steps"])]
            row += [r["wrt"]] if several else []
            if truth:
                row += [_fmt(r["rel_error"], ".1e"), _fmt(r["cosine"], ".4f")]
            row += [
                _fmt(r["rel_error_discrete"], ".1e"),
                f"{r['nfe_forward']}+{r['nfe_backward']}",
                _fmt(r["ratio"], ".1f"),
                _bytes(r["temp_bytes"]),
                order,
            ]
            rows.append(row)
        tables.append((sampler, cols, rows))
    return heading, _notes(records, truth, flagged), tables


def _notes(records, truth, flagged) -> list[str]:
    notes = [
        ("err, cos: relative L2 error and cosine of the gradient against the "
         "continuous-time truth; " if truth else "")
        + "err/DTO: against the exact gradient of the same sampler (DTO()); NFE "
        "f+b: model evaluations of the sampler and of the backward pass; R: gradient "
        "time / sampling time; temp: XLA temporary memory of the jitted gradient; "
        "order: least-squares slope of log(err) against log(1/N) (of err/DTO where "
        "there is no truth). Every field, timings in ms and compile times: "
        "results.csv."
    ]
    if flagged:
        from ._orders import SLOPE_SPREAD

        ns = sorted({r["steps"] for r in records})
        notes.append(
            "* pre-asymptotic: the local slopes between consecutive N differ by more "
            f"than {SLOPE_SPREAD} (or fewer than three N were run), so this slope is "
            "not an order of convergence. Re-run with more steps, e.g. --steps "
            + " ".join(str(4 * n) for n in ns[-3:])
            + "."
        )
    return notes


def _wrap_name(name: str, width: int) -> str:
    """A repr on lines of at most `width`, broken after "(" or ", " (a longer piece
    is left to the cell, which folds it): `InterpolatedAdjoint(` / `order=2)`."""
    lines = [""]
    for piece in re.split(r"(?<=\(|,)", name):
        piece = piece if lines[-1] else piece.lstrip()
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append(piece.lstrip())
        else:
            lines[-1] += piece
    return "\n".join(lines)


def print_table(records: Sequence[dict], console=None) -> None:
    """Prints one table per sampler, one row per (adjoint, N, input), in at most
    `TABLE_WIDTH` columns: errors against the truth and against DTO, cosine, model
    evaluations, R, XLA temporary memory, and the fitted order, flagged where the
    errors are pre-asymptotic. No name is cut: a long adjoint wraps inside its cell.
    Every other field is in `results.csv`."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=TABLE_WIDTH)
    if not records:
        console.print("no records")
        return
    heading, notes, tables = _layout(records)
    console.print(f"[bold]{heading}[/bold]")
    for sampler, cols, rows in tables:
        table = Table(
            title=sampler, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False
        )
        for name in cols:
            if name == "adjoint":  # a long name wraps inside its cell, never cut
                table.add_column(name, max_width=ADJOINT_WIDTH, overflow="fold")
                continue
            left = name == "wrt"
            table.add_column(name, justify="left" if left else "right", no_wrap=True)
        for k, row in enumerate(rows):
            if k and row[0]:
                table.add_section()
            table.add_row(_wrap_name(row[0], ADJOINT_WIDTH - 2), *row[1:])
        console.print(table)
    for note in notes:
        console.print(note, style="dim")


def markdown_tables(records: Sequence[dict]) -> str:
    """The tables of `print_table` as markdown (one per sampler, the same columns and
    notes), for the documentation site's results pages."""
    if not records:
        return "No records.\n"
    heading, notes, tables = _layout(records)
    lines = [f"**{heading}**", ""]
    for sampler, cols, rows in tables:
        lines += [f"### `{sampler}`", "", "| " + " | ".join(cols) + " |",
                  "|" + "".join(" --- |" if c in ("adjoint", "wrt") else " ---: |"
                                for c in cols)]
        for row in rows:
            cells = [f"`{row[0]}`" if row[0] else ""] + row[1:]
            lines.append("| " + " | ".join(c.replace("*", "\\*") for c in cells) + " |")
        lines.append("")
    lines += [n.replace("*", "\\*", 1) if n.startswith("*") else n for n in notes]
    return "\n".join(lines) + "\n"


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


_FAMILY_TITLES = {
    "DTO": "DTO (exact; checkpointed)",
    "continuous": "continuous adjoints",
    "ReversibleAdjoint": "reversible samplers, exact",
    "Truncated": "truncated backprop (biased)",
}


def family(adjoint_repr: str) -> str:
    """The panel an adjoint is drawn in: `"DTO"`, `"continuous"` (AdjointDEIS,
    RecordedAdjoint, InterpolatedAdjoint, AdjointDPM), or its class name."""
    import adjoint_jax as aj

    name = adjoint_repr.split("(")[0].strip()
    cls = getattr(aj, name, None)
    if name == "AdjointDPM" or (
        isinstance(cls, type) and issubclass(cls, aj.AbstractContinuousAdjoint)
    ):
        return "continuous"
    return name


def plot_figures(records: Sequence[dict], out_dir: str, prefix: str = "") -> list[str]:
    """Writes `error_vs_steps.png` (log-log, fitted slopes in the legend), `pareto.png`
    (error against gradient time; the Pareto front of all strategies in every panel)
    and `memory_vs_steps.png` into `out_dir` as small multiples: one column of panels
    per adjoint family (DTO, continuous adjoints, reversible, truncated, ...), one row
    per differentiated input; colour by sampler (the same in every panel), line style
    by adjoint. Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator

    os.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    if not records:
        return paths
    wrts = list(dict.fromkeys(r["wrt"] for r in records))
    fams = list(dict.fromkeys(family(r["adjoint"]) for r in records))
    samplers = list(dict.fromkeys(r["sampler"] for r in records))
    cmap = plt.get_cmap("tab10" if len(samplers) <= 10 else "tab20")
    colour = {s: cmap(i % cmap.N) for i, s in enumerate(samplers)}
    styles, markers = ("-", "--", ":", "-."), "osD^v<>"
    per_family: dict[str, list[str]] = {}
    for r in records:
        adj = per_family.setdefault(family(r["adjoint"]), [])
        if r["adjoint"] not in adj:
            adj.append(r["adjoint"])

    def style(r):
        k = per_family[family(r["adjoint"])].index(r["adjoint"])
        return dict(
            color=colour[r["sampler"]],
            linestyle=styles[k % len(styles)],
            marker=markers[k % len(markers)],
            markersize=3.5,
            linewidth=1.2,
        )

    problem = records[0]["problem"]
    continuous = any(
        r["rel_error"] is not None and math.isfinite(r["rel_error"]) for r in records
    )
    err_label = "rel. error" + (" (vs truth)" if continuous else " (vs DTO)")
    steps = sorted({r["steps"] for r in records})

    def series(w, fam):
        out: dict[tuple, list[dict]] = {}
        for r in records:
            if r["wrt"] == w and family(r["adjoint"]) == fam:
                out.setdefault((r["sampler"], r["adjoint"]), []).append(r)
        return out

    def label(sampler, adjoint):  # wrapped, never cut
        return textwrap.fill(f"{sampler} + {adjoint}", 48, subsequent_indent="  ")

    def grid(title):
        fig, axes = plt.subplots(
            len(wrts),
            len(fams),
            figsize=(5.0 * len(fams), 5.6 * len(wrts)),
            squeeze=False,
        )
        fig.suptitle(f"{title} — {problem}", fontsize=11)
        return fig, axes

    def finish(ax, w, fam, xlabel, ylabel, steps_axis=False, cap=False):
        ax.set_title(f"{_FAMILY_TITLES.get(fam, fam)} — d/d {w}", fontsize=9)
        if not ax.get_lines():
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            return
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(axis="both", which="both", labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
        ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
        if ys and max(ys) / min(ys) > 100:  # many decades: fewer, unlabelled minors
            ax.yaxis.set_major_locator(LogLocator(base=10, numticks=6))
            ax.yaxis.set_minor_formatter(NullFormatter())
        if steps_axis:
            ax.xaxis.set_major_locator(FixedLocator(steps))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(n) for n in steps])
        else:
            ax.xaxis.set_major_locator(LogLocator(base=10, numticks=5))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if cap and ys and max(ys) > 10.0:
            ax.set_ylim(bottom=min(ys) / 3, top=10.0)  # blow-ups (> 10) off the chart
        elif ys and max(ys) / min(ys) < 10:  # a flat series must look flat: a decade
            mid = math.sqrt(max(ys) * min(ys))
            ax.set_ylim(mid / 10**0.5, mid * 10**0.5)
        ax.legend(
            fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False
        )

    def save(fig, name):
        # (No tight_layout: it would shrink the axes to make room for the legends,
        # which sit below each panel and are kept by bbox_inches="tight".)
        fig.subplots_adjust(wspace=0.35, hspace=1.1)
        path = os.path.join(out_dir, prefix + name)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    # error against N, with fitted slopes
    fig, axes = grid("gradient error against the number of steps")
    for i, w in enumerate(wrts):
        for j, fam in enumerate(fams):
            ax = axes[i][j]
            for (s, a), rs in series(w, fam).items():
                pts = [(r["steps"], _error_of(r)) for r in rs if _error_of(r) is not None]
                if not pts:
                    continue
                slope, text = _order(rs[0]), label(s, a)
                own = rs[0]["slope"]
                if continuous and (own is None or not math.isfinite(own)):
                    text += " [vs DTO]"  # no truth for this series (e.g. SDE)
                if slope is not None and math.isfinite(slope):
                    flag = "" if rs[0].get("asymptotic", True) else "*"
                    text += f" ({slope:.2f}{flag})"
                ax.loglog(*zip(*pts), label=text, **style(rs[0]))
            finish(ax, w, fam, "steps N", err_label, steps_axis=True, cap=True)
    fig.text(
        0.01, -0.01, "(slope): fitted order; *: pre-asymptotic (local slopes disagree)",
        fontsize=7,
    )
    save(fig, "error_vs_steps.png")

    # error against gradient time, with the Pareto front of all strategies
    fig, axes = grid("gradient error against gradient wall time")
    for i, w in enumerate(wrts):
        allpts = [
            (r["grad_time_s"], _error_of(r))
            for r in records
            if r["wrt"] == w and _error_of(r) is not None
        ]
        front = pareto_front(allpts)
        for j, fam in enumerate(fams):
            ax = axes[i][j]
            if front:
                ax.loglog(
                    *zip(*front), color="black", linewidth=4, alpha=0.2, zorder=0,
                    label="Pareto front (all panels)",
                )
            for (s, a), rs in series(w, fam).items():
                pts = sorted(
                    (r["grad_time_s"], _error_of(r))
                    for r in rs
                    if _error_of(r) is not None
                )
                if pts:
                    ax.loglog(*zip(*pts), label=label(s, a), **style(rs[0]))
            finish(ax, w, fam, "gradient time [s]", err_label, cap=True)
    save(fig, "pareto.png")

    # memory against N
    fig, axes = grid("XLA temporary memory of the jitted gradient")
    for i, w in enumerate(wrts):
        for j, fam in enumerate(fams):
            ax = axes[i][j]
            for (s, a), rs in series(w, fam).items():
                pts = [
                    (r["steps"], r["temp_bytes"] / 2**20)
                    for r in rs
                    if r["temp_bytes"] > 0
                ]
                if pts:
                    ax.loglog(*zip(*pts), label=label(s, a), **style(rs[0]))
            finish(ax, w, fam, "steps N", "temporary memory [MiB]", steps_axis=True)
    save(fig, "memory_vs_steps.png")
    return paths
