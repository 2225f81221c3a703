"""The `adjoint-jax` command line. `adjoint-jax compare` measures, for every gradient
strategy and step budget, the gradient's accuracy, time and memory (see
`adjoint_jax.bench.compare`)."""

import argparse
import sys
import time


DEFAULT_STEPS = (10, 20, 40, 80)

_COMPARE_HELP = """\
Measure (sampler, adjoint) pairs at several numbers of steps N: relative L2 error and
cosine similarity of each gradient against the continuous-time truth (where the problem
has one) and against the exact gradient of the discrete sampler (DTO() through the same
sampler at the same N); model evaluations forward and backward; compile time; gradient
and sampling wall time (median of jitted runs after warm-up) and their ratio R; XLA
temporary memory of the jitted gradient; the fitted order of convergence, flagged
where the errors are still pre-asymptotic. Prints one table per sampler (100 columns)
and writes results.json, results.csv (every field) and figures (error_vs_steps.png,
pareto.png, memory_vs_steps.png; one panel per adjoint family) to --out.

With no options it measures the overview set (DTO after every sampler, checkpointed
DTO, the continuous adjoints, every reversible pair: 20 pairs) on --problem mlp (a
random MLP epsilon-network, width 256, 16 dimensions, batch 64, float32, its truth
from a converged float64 solve) at --steps 10 20 40 80, for d loss / d x_T: 2 to 7
minutes on 2 quiet CPU cores (2.2 on one machine, 6.5 on a 2-core AMD EPYC), most
of it compiling. --all measures every valid pair of every public strategy instead
(248 today: `adjoint_jax.bench.valid_pairs()`); truncated backprop is
measured with --adjoints 'Truncated(last=1)' --wrt params.

Strategies are given as their repr, e.g. --samplers 'DPMSolver2()'
'McCallumFoster(DPMSolver2())' --adjoints 'DTO()' 'AdjointDEIS(order=2)'.
"""


class _Parser(argparse.ArgumentParser):
    """Errors as one line on stderr and exit code 2, without the usage block."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"steps must be positive integers; got {text!r}"
        )
    if n < 1:
        raise argparse.ArgumentTypeError(
            f"steps must be positive integers; got {text!r}"
        )
    return n


def _split_top_level(items):
    """Splits each item on commas outside parentheses: 'A(), B(x=1, y=2)' → 2 items."""
    out = []
    for item in items:
        depth, cur = 0, ""
        for ch in item:
            depth += ch in "([{"
            depth -= ch in ")]}"
            if ch == "," and depth == 0:
                out.append(cur)
                cur = ""
            else:
                cur += ch
        out.append(cur)
    return [s.strip() for s in out if s.strip()]


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="adjoint-jax",
        description="Gradients through diffusion-model sampling: benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser(
        "compare",
        help="gradient accuracy, time and memory of every strategy",
        description=_COMPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--problem",
        default="mlp",
        choices=["gaussian", "mixture", "mlp", "digits"],
        help="mlp: random-weight MLP epsilon-network, truth from a converged "
        "float64 diffrax solve; gaussian: closed-form truth; mixture: sharp "
        "Gaussian mixture, truth from a converged diffrax solve; digits: the "
        "shipped trained model (aj.zoo.digits(), needs the examples extra), "
        "classifier guidance, no continuous truth (default: mlp)",
    )
    p.add_argument(
        "--samplers",
        nargs="+",
        metavar="SAMPLER",
        help="samplers by repr (default: those of the overview set)",
    )
    p.add_argument(
        "--adjoints",
        nargs="+",
        metavar="ADJOINT",
        help="adjoints by repr; every valid pair of the samplers and adjoints "
        "given is run (default: those of the overview set)",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="every valid pair of every public sampler and adjoint (with the "
        "variants DTO(checkpoints=...), order=2, ...) instead of the overview set",
    )
    p.add_argument(
        "--steps",
        nargs="+",
        type=_positive_int,
        default=list(DEFAULT_STEPS),
        metavar="N",
        help="numbers of steps (default: 10 20 40 80)",
    )
    p.add_argument(
        "--wrt",
        nargs="+",
        default=["xT"],
        metavar="WRT",
        help="differentiated inputs, comma- or space-separated, from xT, "
        "cond, params, all (default: xT)",
    )
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=None,
        help="batch size of x_T (default: 64 for mlp, 8 for digits, else 1)",
    )
    p.add_argument(
        "--dim",
        type=_positive_int,
        default=None,
        help="data dimension (default: 4 gaussian, 2 mixture, 16 mlp)",
    )
    p.add_argument(
        "--width",
        type=_positive_int,
        default=None,
        help="MLP width for --problem mlp (default: 256)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float64"],
        help="dtype of the model and the solve (the truth is always float64; "
        "default: float32 for mlp and digits, float64 for gaussian and mixture)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of x_T and the MLP weights"
    )
    p.add_argument(
        "--repeats",
        type=_positive_int,
        default=5,
        help="minimum timed runs per median (default: 5)",
    )
    p.add_argument(
        "--out",
        default="compare_results",
        metavar="DIR",
        help="output folder (default: ./compare_results)",
    )
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--quiet", action="store_true", help="no progress and no table")
    p.set_defaults(subparser=p)
    return parser


def _compare(args, parser) -> int:
    import jax

    # The truths are computed in float64 whatever --dtype is.
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from .bench import _compare as cmp
    from .bench import _pairs, _problem
    from .bench import _report as rep
    from .bench._registry import parse

    def fail(msg):
        parser.error(msg.splitlines()[0] if msg else "invalid arguments")

    try:
        samplers = (
            [parse(s, "sampler") for s in _split_top_level(args.samplers)]
            if args.samplers
            else None
        )
        adjoints = (
            [parse(a, "adjoint") for a in _split_top_level(args.adjoints)]
            if args.adjoints
            else None
        )
    except ValueError as e:
        fail(str(e))
    wrt = _split_top_level(args.wrt)
    for w in wrt:
        if w not in cmp.WRT:
            fail(f"unknown --wrt {w!r}; choose from: {', '.join(cmp.WRT)}")
    strict = samplers is not None or adjoints is not None
    if args.all and strict:
        fail("--all measures every strategy; give it without --samplers/--adjoints")
    try:
        if strict or args.all:
            pairs = _pairs.valid_pairs(samplers, adjoints, strict=strict)
        else:
            pairs = _pairs.overview_pairs()
    except ValueError as e:
        fail(str(e))

    # (dim, batch, dtype) of each problem when not given.
    defaults = {
        "gaussian": (4, 1, "float64"),
        "mixture": (2, 1, "float64"),
        "mlp": (16, 64, "float32"),
        "digits": (None, 8, "float32"),
    }[args.problem]
    problem = _problem.make_problem(
        args.problem,
        dim=args.dim or defaults[0],
        batch=args.batch or defaults[1],
        dtype=jnp.dtype(args.dtype or defaults[2]),
        seed=args.seed,
        width=args.width or 256,
    )

    steps = list(dict.fromkeys(args.steps))
    total = len(pairs) * len(steps)
    err_console = Console(stderr=True)
    start = time.perf_counter()
    # In a terminal: a live bar with the elapsed time and an ETA. Otherwise (a log, a
    # pipe, CI): one line per finished measurement, with its ETA.
    live = not args.quiet and err_console.is_terminal
    lines = not args.quiet and not live
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        disable=not live,
        transient=True,
    ) as progress:
        task = progress.add_task(f"{args.problem}: preparing", total=total)
        done = [0]
        current = [None]

        def finish_current():
            """Counts the measurement under way (if any) as done."""
            if current[0] is None:
                return
            done[0] += 1
            if lines:
                elapsed = time.perf_counter() - start
                eta = elapsed / done[0] * (total - done[0])
                print(f"[{done[0]}/{total}] {current[0]} done; {elapsed:.0f} s "
                      f"elapsed, ETA {eta:.0f} s", file=sys.stderr, flush=True)

        def tick(desc):
            finish_current()
            progress.update(task, description=desc, completed=done[0])
            current[0] = desc

        records = cmp.compare(
            problem,
            pairs=pairs,
            steps=steps,
            wrt=wrt,
            repeats=args.repeats,
            progress=tick,
        )
        finish_current()
        progress.update(task, completed=total)

    json_path, csv_path = rep.write_results(records, args.out)
    figures = [] if args.no_figures else rep.plot_figures(records, args.out)
    if not args.quiet:
        rep.print_table(records, Console(width=rep.TABLE_WIDTH))
        err_console.print(
            f"{len(records)} records in {time.perf_counter() - start:.0f} s: "
            + ", ".join([json_path, csv_path] + figures)
        )
    return 0


def main(argv=None) -> int:
    """Entry point of the `adjoint-jax` console script."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        return _compare(args, args.subparser)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
