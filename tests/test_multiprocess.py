"""Multi-process data parallelism: two JAX processes on 127.0.0.1, joined with
`jax.distributed.initialize` and CPU cross-process collectives (gloo), with 2 CPU
devices each, shard a batch x_T of shape (8, 3) over a global 4-device mesh axis
"data" and compute, under `jax.jit`, the gradient of sum(sin(x0)) through `aj.sample`
with respect to the network parameters and x_T, for `aj.DPMSolver2()` with `aj.DTO()`
and `aj.McCallumFoster(aj.DPMSolver2())` with `aj.ReversibleAdjoint()`. Both
processes must see 2 processes and 4 global devices, and their gathered gradients
must equal this process's single-device gradients to 1e-12 relative (float64). The
children are subprocesses (the device count and the distributed runtime must be set
before JAX starts), bounded by a timeout, and killed if anything fails."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np


NUM_PROCESSES = 2
TIMEOUT_S = 240

# The computation both the children and the parent run: `inputs()` gives the problem,
# `grad_fn(pb, cond, name)` the jitted gradient of the loss with respect to
# (params, x_T) for one of STRATEGIES. (JSON carries float64 exactly: repr round-trips.)
COMMON = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import adjoint_jax as aj
    from adjoint_jax.bench import MLPProblem

    STRATEGIES = {
        "DTO": (aj.DPMSolver2(), aj.DTO()),
        "ReversibleAdjoint": (aj.McCallumFoster(aj.DPMSolver2()),
                              aj.ReversibleAdjoint()),
    }

    def inputs():
        pb = MLPProblem.make(jax.random.key(0), dim=3, width=16, cond_dim=2)
        x_T = jax.random.normal(jax.random.key(1), (8, 3))
        cond = jnp.array([0.5, -0.5])
        return pb, x_T, cond

    def grad_fn(pb, cond, name):
        smp, adj = STRATEGIES[name]
        ts = aj.time_grid(pb.schedule, 10, t_end=1e-3)

        def loss(params, x_T):
            x0 = aj.sample(pb.model, params, x_T, cond, schedule=pb.schedule, ts=ts,
                           sampler=smp, adjoint=adj)
            return jnp.sum(jnp.sin(x0))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))
    """
)

CHILD = textwrap.dedent(
    """
    import json
    import sys
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process_id, port, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jax.experimental import multihost_utils
    """
) + COMMON + textwrap.dedent(
    """
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    pb, x_T, cond = inputs()
    x_host = np.asarray(x_T)
    # Each process supplies only the rows of its own devices.
    xs = jax.make_array_from_callback(x_host.shape, rows, lambda idx: x_host[idx])
    params = jax.tree.map(
        lambda v: jax.make_array_from_callback(v.shape, replicated,
                                               lambda idx, v=np.asarray(v): v[idx]),
        pb.params)
    out = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": len(jax.devices()),
        "local_devices": len(jax.local_devices()),
        "x_T_shards": len(xs.addressable_shards),
    }
    gather = lambda v: np.asarray(
        multihost_utils.process_allgather(v, tiled=True)).tolist()
    for name in STRATEGIES:
        g_params, g_x = grad_fn(pb, cond, name)(params, xs)
        out[name] = {
            "x_T_sharded_as_input": g_x.sharding.is_equivalent_to(xs.sharding, 2),
            "params": {k: gather(v) for k, v in g_params.items()},
            "x_T": gather(g_x),
        }
    with open(out_path, "w") as f:
        json.dump(out, f)
    jax.distributed.shutdown()
    """
)

# The parent's single-device reference runs the very same definitions.
_common = {}
exec(COMMON, _common)
STRATEGIES, inputs, grad_fn = (_common[k] for k in ("STRATEGIES", "inputs", "grad_fn"))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_children(tmp_path):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=2")
    procs, logs = [], []
    try:
        for i in range(NUM_PROCESSES):
            log = open(tmp_path / f"child{i}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-c", CHILD, str(i), str(port),
                 str(tmp_path / f"grads{i}.json")],
                stdout=log, stderr=subprocess.STDOUT, env=env, text=True))
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                break
            failed = any(c not in (None, 0) for c in codes)
            if failed or time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                report = []
                for i, (p, log) in enumerate(zip(procs, logs)):
                    log.seek(0)
                    report.append(f"--- process {i}, exit code {p.returncode} ---\n"
                                  + log.read()[-6000:])
                reason = "failed" if failed else f"timed out after {TIMEOUT_S} s"
                raise AssertionError(f"child processes {reason}:\n" + "\n".join(report))
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    return [json.loads((tmp_path / f"grads{i}.json").read_text())
            for i in range(NUM_PROCESSES)]


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_two_processes_equal_single_device(tmp_path):
    results = _run_children(tmp_path)
    pb, x_T, cond = inputs()
    for i, out in enumerate(results):
        assert out["process_index"] == i
        assert out["process_count"] == 2
        assert out["devices"] == 4
        assert out["local_devices"] == 2
        assert out["x_T_shards"] == 2  # each process holds 2 of the 4 row blocks
    for name in STRATEGIES:
        g_params, g_x = grad_fn(pb, cond, name)(pb.params, x_T)
        assert g_x.dtype == jnp.float64
        ref = {"x_T": np.asarray(g_x)} | {f"params.{k}": np.asarray(v)
                                           for k, v in g_params.items()}
        assert np.all(np.isfinite(ref["x_T"])) and np.max(np.abs(ref["x_T"])) > 0
        for i, out in enumerate(results):
            assert out[name]["x_T_sharded_as_input"], (name, i)
            got = {"x_T": out[name]["x_T"]} | {f"params.{k}": v
                                                for k, v in out[name]["params"].items()}
            assert got.keys() == ref.keys()
            for key in ref:
                rel = _rel(got[key], ref[key])
                print(f"{name} process {i} {key}: max rel diff {rel:.3e}")
                assert rel < 1e-12, (name, i, key, rel)
