"""Sharded gradients on 4 simulated CPU devices equal single-device gradients (to
1e-6 relative; float64 here) for every strategy, and outputs keep the input sharding.
Runs in a subprocess: the device count must be set before JAX starts."""

import json
import os
import subprocess
import sys
import textwrap


SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import adjoint_jax as aj
    from adjoint_jax.bench import MLPProblem

    pb = MLPProblem.make(jax.random.key(0), dim=3, width=16, cond_dim=2)
    mesh = Mesh(jax.devices(), ("batch",))
    rows = NamedSharding(mesh, P("batch"))
    x_T = jax.random.normal(jax.random.key(1), (8, 3))
    cond = jax.random.normal(jax.random.key(2), (8, 2))
    ts = aj.time_grid(pb.schedule, 10, t_end=1e-3)
    out = {"devices": len(jax.devices())}
    for smp, adj in [(aj.DPMSolver2(), aj.DTO()), (aj.DPMSolver2(), aj.AdjointDEIS()),
                     (aj.DPMSolver2(), aj.RecordedAdjoint(order=2)),
                     (aj.McCallumFoster(aj.DPMSolver2()), aj.ReversibleAdjoint()),
                     (aj.SDEDPMSolver1(), aj.DTO())]:
        def loss(p, x, c):
            x0 = aj.sample(pb.model, p, x, c, schedule=pb.schedule, ts=ts, sampler=smp,
                           adjoint=adj, key=jax.random.key(3))
            return jnp.sum(jnp.sin(x0))
        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        g1 = g(pb.params, x_T, cond)
        xs, cs = jax.device_put(x_T, rows), jax.device_put(cond, rows)
        gn = g(pb.params, xs, cs)
        flat = lambda t: jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(t)])
        rel = float(jnp.linalg.norm(flat(gn) - flat(g1)) / jnp.linalg.norm(flat(g1)))
        same = gn[1].sharding.is_equivalent_to(xs.sharding, 2) and (
            gn[2].sharding.is_equivalent_to(cs.sharding, 2))
        out[f"{smp!r}+{adj!r}"] = [rel, bool(same)]
    print(json.dumps(out))
    """
)


def test_sharded_equals_single_device():
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True,
                          text=True, env=env, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("devices") == 4
    for name, (rel, same_sharding) in result.items():
        assert rel < 1e-6, (name, rel)
        assert same_sharding, name
