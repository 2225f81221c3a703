"""Run by `tests/test_sharding.py` in a subprocess with 8 simulated CPU devices (the
device count must be set before JAX starts, and must not leak into other tests).

    python tests/sharding_worker.py [transforms] [meshes] [memory] [implicit]

Runs the named groups (all four by default: one interpreter, JAX's start-up paid
once, and the one-device reference gradients shared between `transforms` and
`meshes`) and prints one JSON line, a dict per group. Every gradient is compared
with the single-device one (relative error, float64); the shardings and memory
figures are reported for the test to assert.
"""

import json
import os
import re
import sys


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import diffrax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

import adjoint_jax as aj  # noqa: E402
from adjoint_jax.bench import MLPProblem  # noqa: E402


# AdjointDPM with Heun (diffrax's Runge–Kutta stage loop like the default Tsit5,
# cheaper to compile) at a loose tolerance: sharded and one-device solves take the
# same steps whatever it is, and each step all-reduces its error norm, which 8
# simulated devices on a 2-core machine pay dearly (8 s per gradient at the float64
# default 1e-6, 0.3 s at 1e-3).
ADJOINT_DPM = aj.AdjointDPM(solver=diffrax.Heun(), rtol=1e-3, atol=1e-3)
# One sampler per strategy class (and each variant with its own loop).
PAIRS = [
    (aj.DPMSolver2(), aj.DTO()),
    (aj.DPMSolver2(), aj.DTO(checkpoints=3)),
    (aj.DPMSolver2(), aj.AdjointDEIS()),
    (aj.DPMSolver2(), aj.RecordedAdjoint(order=2)),
    (aj.DPMSolver2(), aj.InterpolatedAdjoint()),
    (aj.DPMSolver2(), aj.Truncated(last=2)),
    (aj.DPMSolver2(), ADJOINT_DPM),
    (aj.BELM(), aj.ReversibleAdjoint()),
    (aj.McCallumFoster(aj.DPMSolver2()), aj.ReversibleAdjoint()),
    (aj.SDEDPMSolver1(), aj.DTO()),
]
# Under the meshes, one pair per strategy class and loop: the BELM and SDE rows take
# the paths of McCallumFoster's and DTO's rows there (they run under `transforms`).
MESH_PAIRS = [p for p in PAIRS if not isinstance(p[0], (aj.BELM, aj.SDEDPMSolver1))]
N = 6


def name(pair):
    return f"{pair[0]!r}+{pair[1]!r}"


def grad_fn(pb, ts, pair):
    sampler, adjoint = pair

    def loss(p, x, c):
        x0 = aj.sample(pb.model, p, x, c, schedule=pb.schedule, ts=ts, sampler=sampler,
                       adjoint=adjoint, key=jax.random.key(3))
        return jnp.sum(jnp.sin(x0))

    return jax.grad(loss, argnums=(0, 1))


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(v)) for v in jtu.tree_leaves(tree)])


def rel(a, b):
    return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(b)))


def fsdp_specs(params, axis):
    """Each weight sharded over `axis` along its width (the dimension of size
    `width`); `params` of `MLPProblem`: w1 (in, width), w2 (width, width),
    w3 (width, dim), b1/b2 (width,)."""
    return {"w1": P(None, axis), "b1": P(axis), "w2": P(None, axis), "b2": P(axis),
            "w3": P(axis, None)}


def mesh(shape, names, explicit=False):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))


def put(tree, m, specs):
    return jtu.tree_map(lambda v, s: jax.device_put(v, NamedSharding(m, s)), tree, specs,
                        is_leaf=lambda s: isinstance(s, P))


def transforms(pb, ts, x_T, cond, jitted):
    """pmap, shard_map and explicit mesh axes, every pair: relative error against
    one device (and, for AdjointDPM under shard_map, its refusal and the fix)."""
    out = {}
    m_auto = mesh((8,), ("data",))
    m_explicit = mesh((8,), ("data",), explicit=True)
    for pair in PAIRS:
        g, g_jit = grad_fn(pb, ts, pair), jitted[name(pair)]
        ref = g_jit(pb.params, x_T, cond)
        # Under pmap and shard_map each device runs its own solve on its rows: a
        # noise drawn from the key is drawn per device (its shape is the shard's),
        # and AdjointDPM controls its step sizes per shard. For those two, device
        # 0's rows are compared with a one-device solve of those rows.
        per_shard = isinstance(pair[1], aj.AdjointDPM) or pair[0].is_sde
        ref0 = g_jit(pb.params, x_T[:2], cond)[1] if per_shard else None
        row = {}
        # pmap: two example rows per device; parameter gradients summed over devices.
        gp, gx = jax.pmap(g, in_axes=(None, 0, None))(pb.params, x_T.reshape(8, 2, 3), cond)
        row["pmap"] = (rel(gx[0], ref0) if per_shard else
                       rel((jtu.tree_map(lambda v: v.sum(0), gp), gx.reshape(16, 3)), ref))

        # shard_map (varying-axes check on): the gradient of the replicated weights
        # is already summed over the devices (the transpose of their implicit
        # broadcast is a psum); with check_vma=False it is per device.
        specs = dict(mesh=m_auto, in_specs=(P(), P("data"), P()), out_specs=(P(), P("data")))
        try:
            res = jax.jit(jax.shard_map(g, **specs))(pb.params, x_T, cond)
            row["shard_map"] = rel(res[1][:2], ref0) if per_shard else rel(res, ref)
        except TypeError as e:
            row["shard_map_error"] = str(e)

            def summed(p, x, c):
                gp, gx = g(p, x, c)
                return jax.lax.psum(gp, "data"), gx

            # The fix the message suggests.
            res = jax.jit(jax.shard_map(summed, **specs, check_vma=False))(
                pb.params, x_T, cond)
            row["shard_map_check_vma_false"] = rel(res[1][:2], ref0)
        rows = NamedSharding(m_explicit, P("data"))
        xs = jax.device_put(x_T, rows)
        with jax.set_mesh(m_explicit):
            res = jax.jit(g)(pb.params, xs, cond)
        row["explicit"] = rel(res, ref)
        row["explicit_keeps_sharding"] = res[1].sharding.is_equivalent_to(rows, 2)
        out[name(pair)] = row
    out["AdjointDPM closure under explicit axes"] = _adjoint_dpm_closure(pb, ts, x_T, cond)
    return out


def _adjoint_dpm_closure(pb, ts, x_T, cond):
    """AdjointDPM under explicit axes with a model closing over a traced weight: the
    error, and the fix it suggests (the weight through `params`) against one device."""
    m = mesh((8,), ("data",), explicit=True)
    xs = jax.device_put(x_T, NamedSharding(m, P("data")))
    kw = dict(schedule=pb.schedule, ts=ts, sampler=aj.DPMSolver2(), adjoint=ADJOINT_DPM)

    def closing(p, x, w):
        model = lambda p, x, t, c: w * pb.model(p, x, t, c)  # noqa: E731
        return jnp.sum(jnp.sin(aj.sample(model, p, x, cond, **kw)))

    def through_params(p, x):
        model = lambda p, x, t, c: p[0] * pb.model(p[1], x, t, c)  # noqa: E731
        return jnp.sum(jnp.sin(aj.sample(model, p, x, cond, **kw)))

    w = jnp.asarray(1.5)
    with jax.set_mesh(m):
        try:
            jax.jit(jax.grad(closing, argnums=(1, 2)))(pb.params, xs, w)
            error = ""
        except ValueError as e:
            error = str(e)
        got = jax.jit(jax.grad(through_params, argnums=(0, 1)))((w, pb.params), xs)
    ref = jax.jit(jax.grad(through_params, argnums=(0, 1)))((w, pb.params), x_T)
    return {"error": error, "fix": rel(got, ref)}


def meshes(pb, ts, x_T, cond, jitted):
    """jit with NamedSharding inputs on auto axes: the batch over `data` (8), the
    weights FSDP over `model` (8), both on a 4 × 2 mesh: relative error against
    one device, whether the gradients keep the inputs' shardings, and the
    collectives in the compiled program."""
    out = {}
    configs = {
        "data8": (mesh((8,), ("data",)), "data", None),
        "fsdp8": (mesh((8,), ("model",)), None, "model"),
        "data4_fsdp2": (mesh((4, 2), ("data", "model")), "data", "model"),
    }
    for pair in MESH_PAIRS:
        g = jitted[name(pair)]
        ref = g(pb.params, x_T, cond)
        row = {}
        for cname, (m, data, model) in configs.items():
            pspecs = fsdp_specs(pb.params, model)
            params = put(pb.params, m, pspecs)
            xs = jax.device_put(x_T, NamedSharding(m, P(data)))
            res = g(params, xs, cond)
            keeps = all(
                gv.sharding.is_equivalent_to(pv.sharding, gv.ndim)
                for gv, pv in zip(jtu.tree_leaves(res[0]), jtu.tree_leaves(params))
            ) and res[1].sharding.is_equivalent_to(xs.sharding, 2)
            hlo = g.lower(params, xs, cond).compile().as_text()
            row[cname] = {"rel": rel(res, ref), "keeps_sharding": bool(keeps),
                          "collectives": collectives(hlo)}
        out[name(pair)] = row
    return out


_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute",
                "all-to-all")


def collectives(hlo: str) -> dict:
    """Collective instructions in a compiled module: in total, and inside while-loop
    bodies (executed once per iteration: per sampler step)."""
    counts = {}
    bodies = set(re.findall(r"body=(%?[\w.\-]+)", hlo))
    computation = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?(%?[\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            computation = head.group(1)
        for op in _COLLECTIVES:
            if re.search(rf"\s{op}(-start)?\(", line):
                counts[op] = counts.get(op, 0) + 1
                if computation in bodies:
                    counts[op + " (loop)"] = counts.get(op + " (loop)", 0) + 1
    return counts


def memory(ts):
    """Per-device compiled memory (arguments, outputs, temporaries) of one gradient,
    on one device, with the batch over 8 devices and with the weights FSDP over 8."""
    pb = MLPProblem.make(jax.random.key(0), dim=3, width=256, cond_dim=2)
    x_T = jax.random.normal(jax.random.key(1), (256, 3))
    cond = jnp.array([0.3, -0.5])
    out = {}
    for pair in [PAIRS[0], PAIRS[1], PAIRS[2], PAIRS[8]]:
        g = jax.jit(grad_fn(pb, ts, pair))
        row = {}
        for cname, axis in (("one", None), ("data8", "data"), ("fsdp8", "model")):
            if axis is None:
                args = (pb.params, x_T, cond)
            else:
                m = mesh((8,), (axis,))
                specs = fsdp_specs(pb.params, axis if axis == "model" else None)
                args = (put(pb.params, m, specs),
                        jax.device_put(x_T, NamedSharding(m, P(axis if axis == "data" else None))),
                        cond)
            mem = g.lower(*args).compile().memory_analysis()
            row[cname] = {"arguments": mem.argument_size_in_bytes,
                          "outputs": mem.output_size_in_bytes,
                          "temp": mem.temp_size_in_bytes}
        out[name(pair)] = row
    return out


def implicit(pb, ts):
    """`aj.ImplicitDiffusion` with its register slots over 4 devices (2 slots each)
    against one device: one step's outputs, and the collectives of the step."""
    out = {}
    ts = aj.time_grid(pb.schedule, 8, t_end=1e-3)
    m = mesh((4,), ("slots",))
    for sampler in (aj.DPMSolver2(), aj.DDIM(eta=1.0)):
        opt = aj.ImplicitDiffusion(pb.model, schedule=pb.schedule, ts=ts, sampler=sampler,
                                   loss=lambda x: jnp.sum(jnp.sin(x)),
                                   cond=jnp.array([0.3, -0.5]))
        state = opt.init(pb.params, jnp.zeros((4, 3)), jax.random.key(1))
        run = lambda p, s, k: opt.step(p, s, k)  # noqa: E731
        ref = jax.jit(run)(pb.params, state, jax.random.key(2))
        shardings = state.shardings(m)
        step = jax.jit(run, out_shardings=(None, shardings, None))
        sharded = jax.device_put(state, shardings)
        res = step(pb.params, sharded, jax.random.key(2))
        err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                  for a, b in zip(jtu.tree_leaves(res), jtu.tree_leaves(ref)))
        slots_placed = all(
            len({d for d in v.sharding.device_set}) == 4
            and v.addressable_shards[0].data.shape[0] == 2
            for v in jtu.tree_leaves(res[1].states)
        )
        hlo = step.lower(pb.params, sharded, jax.random.key(2)).compile().as_text()
        out[repr(sampler)] = {"max_abs": err, "slots_placed": slots_placed,
                              "state_leaves": len(jtu.tree_leaves(state.states)),
                              "collectives": collectives(hlo)}
    return out


GROUPS = ("transforms", "meshes", "memory", "implicit")


def main(groups):
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise SystemExit(f"unknown groups {sorted(unknown)}; expected some of {GROUPS}")
    pb = MLPProblem.make(jax.random.key(0), dim=3, width=16, cond_dim=2)
    ts = aj.time_grid(pb.schedule, N, t_end=1e-3)
    x_T = jax.random.normal(jax.random.key(1), (16, 3))
    cond = jnp.array([0.3, -0.5])
    # One jitted gradient per pair, for the one-device references and the meshes.
    jitted = {name(pair): jax.jit(grad_fn(pb, ts, pair)) for pair in PAIRS}
    run = {
        "transforms": lambda: transforms(pb, ts, x_T, cond, jitted),
        "meshes": lambda: meshes(pb, ts, x_T, cond, jitted),
        "memory": lambda: memory(ts),
        "implicit": lambda: implicit(pb, ts),
    }
    result = {"devices": len(jax.devices())}
    for group in groups:
        result[group] = run[group]()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:] or GROUPS)
