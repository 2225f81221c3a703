"""The pipeline table: does `aj.from_diffusers` reproduce what public diffusers
pipelines run?

For each set-up of `benchmarks/pipeline_configs.py` (the model repository's
`scheduler_config.json`, the scheduler switch users make, the pipeline's default step
count and what it passes to `set_timesteps`), this runs diffusers' own scheduler loop
in float64 (the float64-patched classes of `tests/diffusers64*.py`) as the pipeline
runs it — latents = z · init_noise_sigma, then for each timestep t:
out = net(scale_model_input(latents, t), t), latents = step(out, t, latents) — and
`aj.from_diffusers(config, N, model=net, sigmas=, mu=)` + `aj.sample` +
`setup.initial`/`setup.final` from the same z, with the same normals for the
schedulers that draw them (step i of `aj.sample` gets the scheduler's i-th draw).

The network is analytic (data N(μ, s²) elementwise: the exact ε, v, x̂_0 or velocity)
and written once for both sides: it reads its noise level from the timestep it is
given, as a trained network does (VP schedulers: the training table's log σ,
interpolated at fractional timesteps; flow matching: σ = t/T; EDM: σ = exp(4 t)), and
its input is `scale_model_input(latents, t)`.

Prints a markdown table (pipeline · scheduler + options · aj sampler · N ·
max |ours − diffusers| · status: reproduced (≤ 1e-10) / refused: the error /
differs / error) and, with --json, writes the rows.

    python benchmarks/pipelines.py [--only KEY,KEY] [--steps N] [--json out.json]
    python benchmarks/pipelines.py --list

Needs the `test` extra (diffusers, torch). A few minutes on CPU.
"""

import argparse
import contextlib
import dataclasses
import json
import math
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
import torch  # noqa: E402
from pipeline_configs import SETUPS, PipelineSetup  # noqa: E402

import adjoint_jax as aj  # noqa: E402
from tests.diffusers64_pipelines import float64_class  # noqa: E402


TOL = 1e-10
MU, S = 0.7, 0.5
F64 = torch.float64
Z = np.random.default_rng(0).standard_normal((2, 3))
NOISE = np.random.default_rng(1).standard_normal((256, 2, 3))


# ---- the network, the same function on both sides ------------------------------------

def _posterior(a, s, x):
    """E[ε | x], E[x_0 | x] for x = a x_0 + s ε, x_0 ~ N(μ, s²) elementwise."""
    d = a * a * S * S + s * s
    eps = s * (x - a * MU) / d
    return eps, MU + a * S * S * (x - a * MU) / d


def _output(kind, pred, level, x, xp, sigma_data=0.5):
    """The network's output at input `x` and noise level `level` (VP: log σ; flow: σ;
    EDM: σ) for `pred` (the config's prediction_type). `xp` is `math` or jax.numpy
    (`math` on diffusers' side: the noise level is a Python float there)."""
    if kind == "vp":
        ab = 1 / (1 + xp.exp(2 * level))
        a, s = xp.sqrt(ab), xp.sqrt(1 - ab)
        eps, x0 = _posterior(a, s, x)
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[pred]
    if kind == "flow":  # x = (1 − σ) x_0 + σ ε; velocity u = ε − x_0
        eps, x0 = _posterior(1 - level, level, x)
        return eps - x0
    # EDM: the input is c_in · x; the output F with x̂_0 = c_skip x + c_out F.
    sd2 = sigma_data * sigma_data
    x = x * xp.sqrt(level * level + sd2)
    _, x0 = _posterior(1.0, level, x)
    c_skip = sd2 / (level * level + sd2)
    c_out = level * sigma_data / xp.sqrt(level * level + sd2)
    return (x0 - c_skip * x) / (c_out if pred == "epsilon" else -c_out)


def _level_np(kind, table, tau, T):
    if kind == "vp":
        lo = int(np.clip(np.floor(tau), 0, len(table) - 1))
        w = tau - lo
        if w == 0:
            return table[lo]
        return (1 - w) * table[lo] + w * table[min(lo + 1, len(table) - 1)]
    return tau / T if kind == "flow" else np.exp(4 * tau)


def _level_jnp(kind, table, tau, T):
    if kind == "vp":
        lo = jnp.clip(jnp.floor(tau), 0, table.shape[0] - 1)
        i = lo.astype(jnp.int32)
        w = tau - lo
        j = jnp.minimum(i + 1, table.shape[0] - 1)
        return jnp.where(w == 0, table[i], (1 - w) * table[i] + w * table[j])
    return tau / T if kind == "flow" else jnp.exp(4 * tau)


class Network:
    """The analytic network of a scheduler: `torch(x_in, t)` for diffusers' loop,
    `jax(params, x_in, timestep, cond)` for `aj.from_diffusers` (params: the log σ
    table of a VP scheduler, else None)."""

    def __init__(self, sched, class_name):
        cfg = sched.config
        self.T = float(cfg.get("num_train_timesteps", 1000))
        self.sigma_data = float(cfg.get("sigma_data", 0.5))
        self.learned_variance = cfg.get("variance_type") in ("learned", "learned_range")
        flow = class_name.startswith("FlowMatch") or cfg.get("use_flow_sigmas")
        if flow:
            self.kind, self.pred, self.table = "flow", "flow", None
        elif class_name.startswith("EDM"):
            self.kind, self.pred, self.table = "edm", cfg.prediction_type, None
        else:
            ab = sched.alphas_cumprod.to(F64).numpy()
            with np.errstate(divide="ignore"):
                self.table = 0.5 * (np.log1p(-ab) - np.log(ab))
            self.kind, self.pred = "vp", cfg.prediction_type

    @property
    def params(self):
        return None if self.table is None else jnp.asarray(self.table)

    def torch(self, x, t):
        level = float(_level_np(self.kind, self.table, float(t), self.T))
        out = _output(self.kind, self.pred, level, x, math, self.sigma_data)
        if self.learned_variance:  # the UNet's variance channels: v = 0 (frac 1/2)
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        return out

    def jax(self, params, x, timestep, cond):
        del cond
        tau = jnp.asarray(timestep).astype(x.dtype)
        level = _level_jnp(self.kind, params, tau, self.T)
        return _output(self.kind, self.pred, level, x, jnp, self.sigma_data)


# ---- diffusers' side -----------------------------------------------------------------

@contextlib.contextmanager
def fed_normals(sched, normals):
    """`randn_tensor` in the namespace of the scheduler's `step` returns
    `normals[0]`, `normals[1]`, … in turn; yields the list of draws."""
    glb = type(sched).step.__globals__
    bank = iter(np.asarray(normals))
    drawn = []

    def randn(shape, generator=None, device=None, dtype=None, **kw):
        drawn.append(None)
        return torch.as_tensor(next(bank), dtype=F64).reshape(shape)

    had, original = "randn_tensor" in glb, glb.get("randn_tensor")
    glb["randn_tensor"] = randn
    try:
        yield drawn
    finally:
        if had:
            glb["randn_tensor"] = original
        else:
            del glb["randn_tensor"]


class _NoDraws:
    calls = 0

    def __call__(self, sigma, sigma_next):
        raise AssertionError("DPMSolverSDEScheduler drew noise on a one-step grid")


def brownian_normals(sched):
    """DPMSolverSDEScheduler draws from a Brownian tree (torchsde) at its steps' σ and
    their log-midpoints; it is given the Brownian motion on that grid whose
    normalised increments are NOISE[0], NOISE[1], … (`aj`'s noise[i] for grid
    interval i; `tests/diffusers64_singlestep.BrownianNormals`)."""
    from tests.diffusers64_singlestep import BrownianNormals

    sig = sched.sigmas.numpy()
    steps = np.concatenate([sig[:1], sig[2:-1:2]])
    t = -np.log(steps)
    if len(steps) < 2:  # one step, to σ = 0: no noise is drawn
        return _NoDraws()
    grid = np.empty(2 * len(steps) - 1)
    grid[0::2], grid[1::2] = steps, np.exp(-(t[:-1] + (t[1:] - t[:-1]) * 0.5))
    return BrownianNormals(grid, NOISE[: len(grid) - 1])


def run_diffusers(setup: PipelineSetup, sched, net: Network):
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
    with fed_normals(sched, NOISE) as drawn:
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

def run_ours(setup: PipelineSetup, config, net: Network, kwargs):
    """`aj.from_diffusers` + `aj.sample` + `initial`/`final`: (latents, setup)."""
    ours = aj.from_diffusers(
        config, kwargs.get("num_inference_steps"), model=net.jax,
        sigmas=kwargs.get("sigmas"), timesteps=kwargs.get("timesteps"),
        mu=kwargs.get("mu"), eta=float(setup.step_kwargs.get("eta", 0.0)),
    )
    n = len(ours.ts) - 1
    noise = jnp.asarray(NOISE[:n]) if ours.sampler.is_sde else None
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


def _short(sampler) -> str:
    text = repr(sampler).replace("\n", " ")
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


def _grid(made) -> str:
    ts = np.asarray(made.ts)
    return f"{type(made.schedule).__name__}, t {ts[0]:.4g} → {ts[-1]:.4g}"


def call_text(kwargs) -> str:
    """`set_timesteps(...)` as the pipeline calls it."""
    parts = []
    for k, v in kwargs.items():
        if k == "num_inference_steps":
            parts.append(str(v))
        elif k == "sigmas":
            v = np.asarray(v)
            shown = ", ".join(f"{x:.4g}" for x in v) if len(v) <= 3 else (
                f"{v[0]:.4g}, {v[1]:.4g}, …, {v[-1]:.4g}")
            parts.append(f"sigmas=[{shown}] ({len(v)})")
        else:
            parts.append(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v!r}")
    return f"set_timesteps({', '.join(parts)})"


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


def run_setup(setup: PipelineSetup) -> dict:
    """One row of the table."""
    row = {"key": setup.key, "pipeline": setup.pipeline, "model": setup.model,
           "N": setup.steps, "loop": setup.loop, "init_sigma": setup.init_sigma,
           "step_kwargs": setup.step_kwargs}
    start = time.perf_counter()
    try:
        name, sched = scheduler_of(setup)
        row["scheduler"] = describe(setup, name)
        config = {**dict(sched.config), "_class_name": name}
        kwargs = setup.timesteps_kwargs(config)
        row["set_timesteps"] = {k: (np.asarray(v).tolist() if k == "sigmas" else v)
                                for k, v in kwargs.items()}
        row["call"] = call_text(kwargs)
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
        row["sampler"] = _short(made.sampler)
        row["grid"] = _grid(made)
        row["aj_steps"] = len(made.ts) - 1
        sched.set_timesteps(**kwargs)
        row["latents"] = latents_text(setup, sched)
        ref, steps, drawn = run_diffusers(setup, sched, net)
        row["diffusers_timesteps"] = len(steps)
        row["draws"] = drawn
        diff = float(np.max(np.abs(ours - ref)))
        row["diff"] = diff
        row["status"] = "reproduced" if diff <= TOL else "differs"
    except Exception as e:  # noqa: BLE001 — reported, not hidden
        row.update(status="error", message=f"{type(e).__name__}: {e}",
                   trace=traceback.format_exc(limit=4), diff=row.get("diff"))
        row.setdefault("sampler", "—")
    finally:
        row["seconds"] = round(time.perf_counter() - start, 2)
    return row


# ---- the report ----------------------------------------------------------------------

def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def status_text(row: dict) -> str:
    if row["status"] in ("refused", "error"):
        return f"{row['status']}: {row['message']}"
    if row["status"] == "reproduced":
        return "reproduced (≤ 1e-10)"
    return "differs"


def _sampler_cell(row: dict) -> str:
    if "grid" not in row:
        return row.get("sampler", "—")
    return f"{row['sampler']} on {row['grid']} ({row['aj_steps']} steps)"


def markdown(rows) -> str:
    lines = ["| pipeline | scheduler + options | aj sampler | N "
             "| max \\|ours − diffusers\\| "
             "| status |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        diff = "—" if r.get("diff") is None else f"{r['diff']:.1e}"
        lines.append(
            f"| {_cell(r['pipeline'] + ' · ' + r['model'])} "
            f"| {_cell(r.get('scheduler', '—'))} | {_cell(_sampler_cell(r))} "
            f"| {r['N']} | {diff} | {_cell(status_text(r))} |"
        )
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    inputs = ["| set-up | the pipeline calls | latents | step kwargs | diffusers draws "
              "| from_diffusers warned |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        warns = r.get("warnings") or []
        warned = "; ".join(w.split(" are not known")[0] for w in warns)
        inputs.append(
            f"| {r['key']} | {_cell(r.get('call', '—'))} "
            f"| {_cell(r.get('latents', '—'))} "
            f"| {_cell(r['step_kwargs'] or '—')} | {r.get('draws', '—')} "
            f"| {_cell(warned or '—')} |"
        )
    return ("\n".join(lines) + f"\n\n{len(rows)} set-ups — {summary}\n\n"
            + "\n".join(inputs))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Run public diffusers pipeline set-ups with diffusers (float64) "
        "and "
        "with aj.from_diffusers + aj.sample on an analytic network, and print a "
        "markdown table of the largest difference per set-up.",
    )
    parser.add_argument("--only", default="",
                        help="comma-separated set-up keys (see --list)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the rows as JSON")
    parser.add_argument("--list", action="store_true", help="list the set-ups and exit")
    parser.add_argument(
        "--steps", type=int, default=None, metavar="N",
        help="run every set-up at N steps instead of its pipeline's default (the "
        "pipeline-passed σ and μ recomputed for N as the pipeline computes them)",
    )
    args = parser.parse_args(argv)
    if args.list:
        for s in SETUPS:
            print(f"{s.key:28s} {s.pipeline} · {s.model} · {s.scheduler} · N={s.steps}")
        return 0
    keys = [k for k in args.only.split(",") if k]
    unknown = sorted(set(keys) - {s.key for s in SETUPS})
    if unknown:
        parser.error(f"unknown set-up keys {unknown}; see --list")
    chosen = [s for s in SETUPS if not keys or s.key in keys]
    if args.steps is not None:
        chosen = [dataclasses.replace(s, steps=args.steps) for s in chosen]
    rows = []
    for s in chosen:
        rows.append(run_setup(s))
        print(f"{s.key}: {rows[-1]['status']} ({rows[-1]['seconds']} s)",
              file=sys.stderr)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
