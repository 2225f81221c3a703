"""Shared plumbing of the examples: command line, strategy parsing, progress bar,
model-evaluation counting and figures. Each example is a script with a
`run(argv) -> dict` (used by the tests) and a `__main__` block."""

import argparse
import os
import time
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import adjoint_jax as aj
from adjoint_jax.bench import count_evals, parse


def describe(doc: str) -> str:
    """An example's `--help` description: its docstring's first paragraph."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def parser(doc: str, **defaults) -> argparse.ArgumentParser:
    """The command line of the single-run examples; `doc` is the example's docstring
    (its first paragraph is the description); defaults are shown in `--help`."""
    p = argparse.ArgumentParser(description=describe(doc),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sampler", default=defaults.get("sampler", "DPMSolver2()"),
                   help="forward sampler, as its repr, e.g. 'DPMSolver1()', "
                        "'McCallumFoster(DPMSolver2())'")
    p.add_argument("--adjoint", default=defaults.get("adjoint", "DTO()"),
                   help="gradient strategy, e.g. 'DTO()', 'AdjointDEIS(order=2)', "
                        "'ReversibleAdjoint()'")
    p.add_argument("--steps", type=int, default=defaults.get("steps", 20),
                   help="sampler steps N")
    p.add_argument("--iters", type=int, default=defaults.get("iters", 30),
                   help="optimisation steps")
    p.add_argument("--batch", type=int, default=defaults.get("batch", 16),
                   help="images optimised together")
    p.add_argument("--lr", type=float, default=defaults.get("lr", 0.05),
                   help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=defaults.get("out", "examples/out"),
                   help="folder for the figures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def study_parser(doc: str, *, steps: tuple, batch: tuple, lr: float, only: str,
                 out: str) -> argparse.ArgumentParser:
    """The command line of the examples that compare several runs (each a
    `(default, help)` pair or help text): description from the docstring's first
    paragraph, defaults shown in `--help`."""
    p = argparse.ArgumentParser(
        description=describe(doc), formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=steps[0], help=steps[1])
    p.add_argument("--batch", type=int, default=batch[0], help=batch[1])
    p.add_argument("--lr", type=float, default=lr, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--only", default=None, help=only)
    p.add_argument("--out", default="examples/out", help=out)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def strategy(args) -> tuple:
    sampler = parse(args.sampler, "sampler")
    adjoint = parse(args.adjoint, "adjoint")
    adjoint.check_sampler(sampler)
    return sampler, adjoint


def sample_fn(d, args, sampler, adjoint, key=None) -> Callable:
    """x_0 = sample(params, x_T, cond) with the example's schedule and grid."""
    ts = aj.time_grid(d.schedule, args.steps, t_end=1e-3)

    def f(params, x_T, cond, model=d.model):
        return aj.sample(model, params, x_T, cond, schedule=d.schedule, ts=ts,
                         sampler=sampler, adjoint=adjoint, key=key)

    return f


def progress(iterable, description: str, quiet: bool = False):
    if quiet:
        yield from iterable
        return
    from rich.progress import Progress

    items = list(iterable)
    with Progress() as bar:
        task = bar.add_task(description, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def count_nfe(fn: Callable, d, *args) -> int:
    """Model evaluations plus model VJPs made by `fn(model, *args)` (each counts as
    one NFE, as in the AdjointDEIS paper's tables)."""
    c = count_evals(fn, d.model, *args)
    return c.forward + c.vjp


def timed(fn: Callable, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def save_grid(path: str, rows: Sequence[np.ndarray], row_titles: Sequence[str],
              labels: Sequence[str] | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    n_rows, n_cols = len(rows), min(len(rows[0]), 16)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * 0.8, n_rows * 0.95),
                             squeeze=False)
    for r, (imgs, title) in enumerate(zip(rows, row_titles)):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.imshow(-np.asarray(imgs[c]), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=7)
            if labels is not None and r == 0:
                ax.set_title(labels[c], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_curve(path: str, curves: dict[str, Sequence[float]], ylabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5, 3))
    for name, ys in curves.items():
        ax.plot(np.arange(len(ys)), ys, label=name)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_reward_curves(path: str, curves: dict, baseline: float, xlabel: str) -> str:
    """Reward (ink, held-out samples) against evaluations spent, one series per
    run (`curves[name]` = [(evaluations, reward), ...]), the starting reward as a
    grey line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    styles = ["-", "--", "-.", ":"]
    for i, (name, pts) in enumerate(curves.items()):
        x, y = np.array(pts).T
        ax.plot(x, y, styles[i // 10 % 4], marker="o", ms=3, label=name)
    ax.axhline(baseline, color="grey", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reward (ink, held-out samples)")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gaussian_penalty(x_T) -> jax.Array:
    """(‖x_T‖²/d − 1)² per sample: keeps x_T on the shell where N(0, I) samples lie."""
    d = int(np.prod(x_T.shape[1:]))
    return (jnp.sum(x_T**2, axis=tuple(range(1, x_T.ndim))) / d - 1.0) ** 2


def ink(x0):
    """Soft ink coverage per image: mean of (x + 1)/2 ∈ [0, 1] (ink is +1)."""
    return jnp.mean((jnp.clip(x0, -1.0, 1.0) + 1.0) / 2.0, axis=(-2, -1))


def trainable_mask(params, subset: str):
    if subset == "all":
        return jtu.tree_map(lambda _: True, params)
    mask = jtu.tree_map(lambda _: False, params)
    if subset == "head":
        return eqx.tree_at(
            lambda p: (p.norm_out, p.conv_out), mask,
            replace=(jtu.tree_map(lambda _: True, params.norm_out),
                     jtu.tree_map(lambda _: True, params.conv_out)),
        )
    if subset == "film":
        films = tuple(b.film for b in params.blocks)
        return eqx.tree_at(
            lambda p: tuple(b.film for b in p.blocks), mask,
            replace=tuple(jtu.tree_map(lambda _: True, f) for f in films),
        )
    raise ValueError(f"--subset must be all, head or film; got {subset!r}")
