"""The pipeline and option tables: does `aj.from_diffusers` reproduce what public
diffusers pipelines run, and every option of every scheduler class it supports?

The pipeline table (`--table pipelines`): for each set-up of
`benchmarks/pipeline_configs.py` (the model repository's `scheduler_config.json`,
the scheduler switch users make, the pipeline's default step count and what it
passes to `set_timesteps`). The option table (`--table options`): for each row of
`benchmarks/option_configs.py` (a scheduler class × an option value that changes
the numbers, or one `aj` refuses), at its two step counts.

Each row runs diffusers' own scheduler loop in float64 (the float64-patched classes
of `tests/diffusers64*.py`) as a pipeline runs it — latents = z · init_noise_sigma,
then for each timestep t: out = net(scale_model_input(latents, t), t), latents =
step(out, t, latents, **step_kwargs) — and `aj.from_diffusers(config, N, model=net,
sigmas=, timesteps=, mu=, eta=)` + `aj.sample` + `setup.initial`/`setup.final` from
the same z, with the same normals for the schedulers that draw them (step i of
`aj.sample` gets the scheduler's i-th draw; churn: the draw of its churning step).

The network is analytic (data N(μ, s²) elementwise: the exact ε, v, x̂_0 or velocity)
and written once for both sides: it reads its noise level from the timestep it is
given, as a trained network does (VP schedulers: the training table's log σ,
interpolated at fractional timesteps, or log σ = 4 t for continuous timesteps;
flow matching and flow σ: σ = t/T; EDM: σ = exp(4 t)), and its input is
`scale_model_input(latents, t)`. The latents are (batch 2, channels 3, 2 pixels):
diffusers' thresholding needs an axis beyond the channels.

Prints a markdown table (status: reproduced (≤ 1e-10) / refused: aj's error /
diffusers raises / diffusers non-finite / differs / error) and, with --json, writes
the rows; --docs DIR writes both tables as markdown and JSON under DIR, headed by
the command, the machine, the date and the versions.

    python benchmarks/pipelines.py [--table pipelines|options|both] [--only KEY,…]
                                   [--steps N] [--json out.json] [--docs DIR]
    python benchmarks/pipelines.py --list [--table options]
    python benchmarks/pipelines.py --docs docs/diffusers      # what docs/ holds

Needs the `test` extra (diffusers, torch). Minutes on CPU (`--docs` prints the time).
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
import warnings


ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pipeline_report as report  # noqa: E402
import torch  # noqa: E402
from option_configs import TIMESTEP_ROWS, Option, option_keys, options_text  # noqa: E402
from option_configs_sigma import SIGMA_ROWS  # noqa: E402
from pipeline_configs import SETUPS, PipelineSetup  # noqa: E402
from pipeline_net import F64, NOISE, Network, Z, brownian_normals, fed_normals  # noqa: E402,E501

import adjoint_jax as aj  # noqa: E402
from tests.diffusers64_pipelines import float64_class  # noqa: E402


TOL = report.TOL
OPTIONS: tuple[Option, ...] = TIMESTEP_ROWS + SIGMA_ROWS


# ---- diffusers' side -----------------------------------------------------------------

def run_diffusers(setup: PipelineSetup, sched, net: Network, normals=NOISE):
    """The pipeline's loop in float64; returns (final latents, timesteps, draws)."""
    if setup.loop == "brownian":
        sched.noise_sampler = brownian_normals(sched)
    latents = torch.as_tensor(Z, dtype=F64)
    if setup.init_sigma:
        latents = latents * sched.init_noise_sigma
    steps = sched.timesteps
    old_x0 = None
    # Flow-matching schedulers have no scale_model_input (their pipelines call none);
    # for the others it is what the pipelines call.
    scale = getattr(sched, "scale_model_input", lambda x, t: x)
    with fed_normals(sched, normals) as drawn:
        for i, t in enumerate(steps):
            out = net.torch(scale(latents, t), t)
            if setup.loop == "cogvideox-dpm":
                latents, old_x0 = sched.step(
                    out, old_x0, t, steps[i - 1] if i > 0 else None, latents,
                    **setup.step_kwargs, return_dict=False,
                )
            else:
                latents = sched.step(out, t, latents, **setup.step_kwargs).prev_sample
            assert latents.dtype == F64, latents.dtype
    calls = sched.noise_sampler.calls if setup.loop == "brownian" else len(drawn)
    return latents.numpy(), steps.numpy(), calls


def scheduler_of(setup: PipelineSetup):
    """(class name, float64 scheduler) as the pipeline has it after the switch."""
    name, overrides = setup.switch or (setup.config["_class_name"], {})
    sched = float64_class(name).from_config(setup.config, **overrides)
    return name, sched


# ---- aj's side -----------------------------------------------------------------------

def make_ours(setup: PipelineSetup, config, kwargs, model=None):
    """`aj.from_diffusers` as the row calls it (its sampler replaced by the row's
    `sampler(made, N)` for a `step` argument from_diffusers does not take)."""
    made = aj.from_diffusers(
        config, kwargs.get("num_inference_steps"), model=model,
        sigmas=kwargs.get("sigmas"), timesteps=kwargs.get("timesteps"),
        mu=kwargs.get("mu"), eta=float(setup.step_kwargs.get("eta", 0.0)),
    )
    if setup.sampler is not None:
        made = made._replace(sampler=setup.sampler(made, setup.steps))
    return made


def noises(made):
    """(aj's noise, diffusers' normals in the order it draws them): step i's normal
    is NOISE[i] on both sides; diffusers draws it where the sampler says (churn: on
    the churning steps only; CogVideoXDPM: `used_draws`, the draws it discards
    being other normals)."""
    n = len(made.ts) - 1
    if not made.sampler.is_sde:
        return None, NOISE
    ours = jnp.asarray(NOISE[:n])
    churned = getattr(made.sampler, "churn_steps", None)
    if churned is not None:
        return ours, NOISE[np.asarray(churned(made.schedule, made.ts))]
    if hasattr(made.sampler, "used_draws"):
        used = made.sampler.used_draws(n)
        bank = np.random.default_rng(7).standard_normal((2 * n + 2,) + Z.shape)
        bank[used] = NOISE[:n]
        return ours, bank
    return ours, NOISE


def run_ours(setup: PipelineSetup, config, net: Network, kwargs):
    """`aj.from_diffusers` + `aj.sample` + `initial`/`final`: (latents, setup)."""
    ours = make_ours(setup, config, kwargs, net.jax)
    noise, _ = noises(ours)
    x = aj.sample(
        ours.model, net.params, ours.initial(jnp.asarray(Z)), None,
        schedule=ours.schedule, ts=ours.ts, sampler=ours.sampler, noise=noise,
    )
    return np.asarray(ours.final(x)), ours


def describe(setup: PipelineSetup, name: str) -> str:
    overrides = dict(setup.switch[1]) if setup.switch else {}
    extra = {
        k: v for k, v in setup.step_kwargs.items() if not (k == "eta" and v == 0.0)
    }
    args = ", ".join(f"{k}={v!r}" for k, v in {**overrides, **extra}.items())
    return f"{setup.scheduler}: {name}({args})"


def _grid(made) -> str:
    ts = np.asarray(made.ts)
    return f"{type(made.schedule).__name__}, t {ts[0]:.4g} → {ts[-1]:.4g}"


def latents_text(setup, sched) -> str:
    """How the pipeline draws its latents (after `set_timesteps`, as pipelines do)."""
    if not setup.init_sigma:
        return "z"
    return f"z · init_noise_sigma ({float(sched.init_noise_sigma):.6g})"


def _diffusers_alone(row, setup, sched, net, kwargs):
    """For a refused set-up: diffusers' loop still runs (finite latents, draws)."""
    try:
        sched.set_timesteps(**kwargs)
        row["latents"] = latents_text(setup, sched)
        ref, steps, drawn = run_diffusers(setup, sched, net)
        row.update(diffusers_finite=bool(np.all(np.isfinite(ref))),
                   diffusers_timesteps=len(steps), draws=drawn)
    except Exception as e:  # noqa: BLE001
        row["diffusers_error"] = f"{type(e).__name__}: {e}"


def _diffusers_raises(row, setup, config, kwargs, error):
    """diffusers refuses the option (its constructor or set_timesteps raises): the row
    says so, and whether `aj.from_diffusers` accepts it."""
    row.update(status="diffusers raises", message=f"{type(error).__name__}: {error}",
               diff=None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made = make_ours(setup, config, kwargs)
        row["aj_accepts"] = report.one_line(made.sampler)
        row["sampler"] = report.short(made.sampler)
        row["message"] += f"; aj accepts it: {row['aj_accepts']}"
    except (ValueError, TypeError, NotImplementedError) as e:
        row["message"] += f"; aj refuses it too: {e}"
    return row


def run_setup(setup: PipelineSetup) -> dict:
    """One row of the table."""
    row = {"key": setup.key, "pipeline": setup.pipeline, "model": setup.model,
           "N": setup.steps, "loop": setup.loop, "init_sigma": setup.init_sigma,
           "step_kwargs": setup.step_kwargs}
    start = time.perf_counter()
    try:
        config = kwargs = None
        name = (setup.switch or (setup.config["_class_name"],))[0]
        row["scheduler"] = describe(setup, name)
        try:
            name, sched = scheduler_of(setup)
        except (ValueError, TypeError, NotImplementedError) as e:
            config = {**setup.config, "_class_name": name}
            kwargs = setup.timesteps_kwargs(config)
            return _diffusers_raises(row, setup, config, kwargs, e)
        config = {**dict(sched.config), "_class_name": name}
        kwargs = setup.timesteps_kwargs(config)
        row["set_timesteps"] = {
            k: np.asarray(v).tolist() if k in ("sigmas", "timesteps") else v
            for k, v in kwargs.items()}
        row["call"] = report.call_text(kwargs)
        net = Network(sched, name)
        row["network"] = f"{net.kind}/{net.pred}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ours, made = run_ours(setup, config, net, kwargs)
            except (ValueError, TypeError, NotImplementedError) as e:
                row.update(status="refused", message=str(e), sampler="—", diff=None)
                _diffusers_alone(row, setup, sched, net, kwargs)
                return row
        row["warnings"] = [
            str(w.message) for w in caught if issubclass(w.category, UserWarning)
        ]
        row["sampler"] = report.short(made.sampler)
        row["sampler_full"] = report.one_line(made.sampler)
        row["grid"] = _grid(made)
        row["aj_steps"] = len(made.ts) - 1
        try:
            sched.set_timesteps(**kwargs)
        except (ValueError, TypeError, NotImplementedError) as e:
            return _diffusers_raises(row, setup, config, kwargs, e)
        row["latents"] = latents_text(setup, sched)
        ref, steps, drawn = run_diffusers(setup, sched, net, noises(made)[1])
        row["diffusers_timesteps"] = len(steps)
        row["draws"] = drawn
        diff = float(np.max(np.abs(ours - ref)))
        row["diff"] = diff
        if not np.all(np.isfinite(ref)) and np.all(np.isfinite(ours)):
            row.update(status="diffusers non-finite", diff=None, message=(
                f"diffusers' result has {int(np.sum(~np.isfinite(ref)))} of "
                f"{ref.size} entries NaN/inf; ours is finite"))
        else:
            row["status"] = "reproduced" if diff <= TOL else "differs"
    except Exception as e:  # noqa: BLE001 — reported, not hidden
        row.update(status="error", message=f"{type(e).__name__}: {e}",
                   trace=traceback.format_exc(limit=4), diff=row.get("diff"))
        row.setdefault("sampler", "—")
    finally:
        row["seconds"] = round(time.perf_counter() - start, 2)
    return row


# ---- the option table ----------------------------------------------------------------

def option_setup(key: str, option: Option, n: int) -> PipelineSetup:
    return PipelineSetup(
        f"{key}@{n}", "—", "—", options_text(option, n),
        {"_class_name": option.cls, **option.config}, n,
        set_timesteps=option.set_timesteps, step_kwargs=option.step_kwargs,
        init_sigma=not option.cls.startswith("FlowMatch"), loop=option.loop,
        sampler=option.sampler,
    )


def run_option(key: str, option: Option, n: int) -> dict:
    """One row of the option table: `run_setup`'s, keyed by option and N, the
    sampler's full repr as `sampler`."""
    row = run_setup(option_setup(key, option, n))
    for k in ("key", "pipeline", "model", "scheduler"):
        row.pop(k, None)
    if "sampler_full" in row:
        row["sampler"] = row.pop("sampler_full")
    return {"option": key, "class": option.cls, "options": options_text(option, n),
            **row}


# ---- the command line ----------------------------------------------------------------

def _run_table(table, keys, steps):
    rows = []
    if table == "pipelines":
        chosen = [s for s in SETUPS if not keys or s.key in keys]
        if steps is not None:
            chosen = [dataclasses.replace(s, steps=steps) for s in chosen]
        for s in chosen:
            rows.append(run_setup(s))
            print(f"{s.key}: {rows[-1]['status']} ({rows[-1]['seconds']} s)",
                  file=sys.stderr)
        return rows
    for key, o in zip(option_keys(OPTIONS), OPTIONS):
        if keys and key not in keys and o.cls not in keys:
            continue
        for n in ((steps,) if steps is not None else o.steps):
            rows.append(run_option(key, o, n))
            print(f"{key}@{n}: {rows[-1]['status']} ({rows[-1]['seconds']} s)",
                  file=sys.stderr)
    return rows


def _quiet():
    """diffusers' deprecation warnings and config-rewrite notices (its
    `lower_order_final` switch, …) are not the table's business."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="__array__ implementation")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description="Run public diffusers pipeline set-ups (--table pipelines) and "
        "every scheduler class × option (--table options) with diffusers (float64) "
        "and with aj.from_diffusers + aj.sample on an analytic network; print a "
        "markdown table of the largest difference per row.",
        epilog=report.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--table", choices=("pipelines", "options", "both"), default=None,
        help="which table to run: the pipeline set-ups of pipeline_configs.py "
        "(default), the option rows of option_configs.py (each at its two step "
        "counts), or both (the default with --docs)")
    parser.add_argument(
        "--only", default="", metavar="KEY,…",
        help="comma-separated set-up keys, option keys (CLASS:ROW) or, for the option "
        "table, scheduler class names (see --list)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the rows as a JSON list")
    parser.add_argument(
        "--docs", default=None, metavar="DIR",
        help="write each table run as DIR/pipelines.md / DIR/options.md, headed by "
        "the command, the machine, the date and the versions, with the rows as "
        "JSON next to it (DIR/pipelines.json, DIR/options.json)")
    parser.add_argument("--list", action="store_true",
                        help="list the set-ups (or, with --table options, the option "
                        "rows) and exit")
    parser.add_argument(
        "--steps", type=int, default=None, metavar="N",
        help="run every row at N steps instead of its own (pipelines: the "
        "pipeline's default, their σ and μ recomputed for N as the pipeline computes "
        "them; options: one run at N in place of the two step counts)",
    )
    args = parser.parse_args(argv)
    _quiet()
    table = args.table or ("both" if args.docs else "pipelines")
    tables = ("pipelines", "options") if table == "both" else (table,)
    if args.list:
        if "pipelines" in tables:
            for s in SETUPS:
                print(f"{s.key:28s} {s.pipeline} · {s.model} · {s.scheduler} · "
                      f"N={s.steps}")
        if "options" in tables:
            for key, o in zip(option_keys(OPTIONS), OPTIONS):
                print(f"{key:36s} {options_text(o, o.steps[0])} · N={o.steps}")
        return 0
    keys = [k for k in args.only.split(",") if k]
    known = ({s.key for s in SETUPS} | set(option_keys(OPTIONS))
             | {o.cls for o in OPTIONS})
    unknown = sorted(set(keys) - known)
    if unknown:
        parser.error(f"unknown keys {unknown}; see --list")
    for name in tables:
        start = time.perf_counter()
        rows = _run_table(name, keys, args.steps)
        seconds = time.perf_counter() - start
        tabulate = report.markdown if name == "pipelines" else report.options_markdown
        text = tabulate(rows)
        print(text)
        print(f"\n{name}: {report.summary_line(rows)}; {seconds:.0f} s",
              file=sys.stderr)
        if args.json:
            root, ext = os.path.splitext(args.json)
            path = args.json if len(tables) == 1 else f"{root}.{name}{ext or '.json'}"
            with open(path, "w", encoding="utf-8") as f:
                json.dump(rows, f, indent=1, default=str, ensure_ascii=False)
        if args.docs:
            report.write_docs(args.docs, name, text, rows, report.meta(argv, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
