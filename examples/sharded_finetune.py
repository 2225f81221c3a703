"""LoRA reward fine-tuning of the digits model on a device mesh: data parallelism over
the mesh axis "data", the frozen weights, the LoRA factors and the optimiser state
sharded FSDP-style over the axis "model", any gradient strategy, Orbax checkpoints a
run resumes from, and the per-device memory and time of the compiled train step.

    python examples/sharded_finetune.py                  # data 4 × model 1 on CPU
    python examples/sharded_finetune.py --data 2 --model 2 --adjoint 'AdjointDEIS()'
    python examples/sharded_finetune.py --ckpt-dir /tmp/ft --iters 20         # saves
    python examples/sharded_finetune.py --ckpt-dir /tmp/ft --iters 40 --resume
    python examples/sharded_finetune.py --unet --model 2 --adjoint 'Truncated(last=1)'

The job: class-conditional samples of the trained digits network (`aj.zoo.digits()`,
as in the other examples) should have more ink (`_common.ink`, the reward of
`reward_finetune.py`); the loss is minus the mean reward of a batch. Trainable are
rank-r LoRA adapters on every convolution kernel and dense matrix (W + A B, W of shape
(..., n) read as a (fan-in, n) matrix, B = 0 at the start); the base weights are
frozen, closed over by the model. Prints the mesh, the per-device memory of the train
step, the step time, the training loss and, on a fixed held-out batch, the reward and
the classifier's accuracy (is it still the asked-for digit?) before and after; saves
a grid of those samples. Ink is easy to hack: the defaults (Adam 1e-4, 30 steps,
N = 20, batch 16) take the held-out ink from 0.32 to 0.36 with the accuracy from 94%
to 88%, but 3e-4 turns the digits into blots (ink 0.67, accuracy 19%); add a term
that keeps them digits (as `finetune_style.py` does) before you scale up. `--unet` fine-tunes the UNet of
`benchmarks/scale.py` (Stable-Diffusion shape, random weights, its LoRA adapters on
every attention projection) on 4-channel latents instead, with the same reward
(brighter latents), conditioned on a random token embedding per class.

Sharding: the mesh is `jax.make_mesh((data, model), ("data", "model"))` over all
devices, Auto axis types. The batch (labels, noise x_T, samples) is split over "data";
every frozen weight, LoRA factor and Adam moment over "model", along its largest
dimension divisible by the axis size (replicated if none is), so each device holds
1/model of them (FSDP). With Auto axes XLA's partitioner places the rest: it gathers
the weights where they are used, and here also splits activations over "model", so
the temporaries per device fall with data × model, not with data alone. (For FSDP
proper, each device computing on rows of its own and only weights travelling, split
the batch over both axes: `P(("data", "model"))` in `by_batch`, `--batch` a multiple
of all devices.) The train step is one `jax.jit` with `in_shardings`/`out_shardings`
and its state donated, lowered and compiled once; `compiled.memory_analysis()` gives
the per-device bytes printed (arguments, outputs, temporaries), and the bytes each
device holds are counted from the arrays' shards.

Data and checkpoints: `load_labels(step)` is the data loader (class labels stand in
for prompts), deterministic in (seed, step), and the noise x_T is drawn on the
devices from (seed, step), so a resumed run sees exactly the batches an uninterrupted
one would. Checkpoints (`--ckpt-dir`, every `--ckpt-every` steps and after the last)
hold the LoRA factors, the Adam state and the run's settings; `--resume` continues
from the latest one up to `--iters` steps in all, on any mesh (Orbax reshards on
restore). On a machine without accelerators the script simulates 4 CPU devices: it
adds `--xla_force_host_platform_device_count=4` to XLA_FLAGS unless that already sets
a count (the flag changes nothing on GPUs and TPUs).

Going bigger. *One host, several GPUs*: nothing changes: the mesh spans the GPUs; take
`--model` just large enough that the frozen weights and the optimiser state fit (FSDP
divides them by it) and the rest on `--data`; `--batch` must be a multiple of
`--data`. *A TPU pod slice*: start the same command on every host (`gcloud compute tpus
tpu-vm ssh NAME --worker=all --command "..."`) with `--distributed`, which calls
`jax.distributed.initialize()` before anything else (on TPU it reads the topology
itself); the mesh then spans every chip of the slice, and `jax.make_mesh` puts the last
axis ("model") on neighbouring chips, so FSDP's all-gathers use the fastest links;
`--ckpt-dir` must be storage every host sees (a `gs://` bucket): each process writes
its own shards. *Several GPU hosts*: one process per host (or per GPU) started by SLURM
or `mpirun`, with `--distributed` (`jax.distributed.initialize()` reads SLURM's and
Open MPI's variables; elsewhere pass `--coordinator HOST:PORT --num-processes N
--process-id I`); keep `--model` at most the GPUs of one host, so that only the
data-parallel gradient reduction crosses the network; a shared `--ckpt-dir`. In both
multi-host cases the data loader must give each process only the rows of the global
batch its own devices hold: `global_batch` does that with
`jax.make_array_from_process_local_data` (here every process computes the whole batch
and keeps its rows; a real loader reads only its rows), and only process 0 prints and
writes figures. (On one machine, two processes of 2 CPU devices each, `--distributed
--coordinator localhost:PORT --num-processes 2 --process-id I --data 2 --model 2`,
give the losses of one process with 4 devices, checkpoints and `--resume` included.)
Loading the frozen weights on every host and `jax.device_put`ting them is fine at this
size; for a large model restore them sharded (Orbax, as `--resume` does) or create
them in a `jax.jit` with `out_shardings`.
"""

import os


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

import importlib.util  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import adjoint_jax as aj  # noqa: E402

from _common import ink, parser, progress, save_grid, strategy  # noqa: E402


# ---- the models ----------------------------------------------------------------
class Problem(NamedTuple):
    """What is fine-tuned: `apply(base, lora, x, t, cond) -> ε` with the frozen
    weights `base` (any pytree) and the adapters `lora` ({target: {"a": (fan-in, r),
    "b": (r, fan-out)}}, flat so that checkpoints name them); `cond(labels)`, one
    sample's shape, the schedule, `config` (what a checkpoint must agree with) and
    `classify` (images -> logits, or None)."""

    apply: Callable
    base: Any
    lora: dict
    cond: Callable
    shape: tuple
    num_classes: int
    schedule: Any
    config: dict
    classify: Callable | None


def _name(path) -> str:
    """A pytree path as text: `blocks.0.conv1.weight`."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts)


def apply_lora(base, lora):
    """`base` with each W that `lora` names replaced by W + A B (in W's shape)."""

    def merge(path, w):
        ab = lora.get(_name(path))
        if ab is None:
            return w
        return w + (ab["a"] @ ab["b"]).reshape(w.shape).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(merge, base)


def digits_problem(args) -> Problem:
    d = aj.zoo.digits()
    kernels = [(_name(p), w) for p, w in jax.tree_util.tree_leaves_with_path(d.params)
               if w.ndim >= 2]
    keys = jax.random.split(jax.random.key(args.seed + 1), len(kernels))
    lora = {}
    for k, (name, w) in zip(keys, kernels):
        fan_in = math.prod(w.shape[:-1])
        a = jax.random.normal(k, (fan_in, args.rank), jnp.float32) / math.sqrt(fan_in)
        lora[name] = {"a": a, "b": jnp.zeros((args.rank, w.shape[-1]), jnp.float32)}

    def apply(base, lora, x, t, cond):
        return d.model(apply_lora(base, lora), x, t, cond)

    return Problem(apply, d.params, lora, d.cond, d.shape, d.num_classes, d.schedule,
                   {"model": "digits", "rank": args.rank}, d.classify)


def _scale_benchmark():
    # benchmarks/scale.py is a script, not a package: loaded by its path (it imports
    # only adjoint_jax, JAX, NumPy and the standard library).
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "benchmarks", "scale.py")
    spec = importlib.util.spec_from_file_location("scale_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def unet_problem(args) -> Problem:
    scale = _scale_benchmark()
    c = args.unet_channels
    cfg = scale.UNetConfig(channels=c, groups=min(8, c // 2), levels=args.unet_levels)
    k_net, k_ctx = jax.random.split(jax.random.key(args.seed + 1))
    base, adapters = scale.init_unet(k_net, cfg, rank=args.rank)
    # Its adapters, {"down": [None, {"self": {"q": {"a", "b"}, ...}}, ...], ...},
    # flattened to {"down.1.self.q": {"a", "b"}, ...} and rebuilt inside the model.
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    order = [(_name(path[:-1]), _name(path[-1:])) for path, _ in leaves]
    lora = {}
    for (target, ab), (_, leaf) in zip(order, leaves):
        lora.setdefault(target, {})[ab] = leaf
    num_classes, tokens = 10, 8
    table = jax.random.normal(k_ctx, (num_classes, tokens, cfg.ctx_dim), jnp.float32)

    def apply(base, lora, x, t, cond):
        rebuilt = [lora[target][ab] for target, ab in order]
        return scale.unet(cfg, base, jax.tree_util.tree_unflatten(treedef, rebuilt), x,
                          t, cond)

    size = args.unet_size
    config = {"model": "unet", "rank": args.rank, "channels": c,
              "levels": args.unet_levels, "size": size}
    return Problem(apply, base, lora, lambda labels: table[labels],
                   (size, size, cfg.latent_channels), num_classes, aj.VPLinear(),
                   config, None)


def reward(x0):
    """Ink coverage per sample (`_common.ink`, averaged over any other axes)."""
    r = ink(x0)
    return jnp.mean(r.reshape(r.shape[0], -1), axis=-1)


# ---- sharding and data ---------------------------------------------------------
def fsdp_spec(shape, size: int) -> P:
    """Split over "model" the largest dimension that `size` divides (the first of
    equal ones); replicate if none does (scalars, odd sizes) or `size` is 1."""
    dims = [i for i, n in enumerate(shape) if size > 1 and n % size == 0]
    if not dims:
        return P()
    i = max(dims, key=lambda i: (shape[i], -i))
    return P(*([None] * i), "model")


def fsdp(mesh, tree):
    size = mesh.shape["model"]
    return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(a.shape, size)), tree)


def load_labels(step: int, batch: int, num_classes: int, seed: int) -> np.ndarray:
    """The data loader: the global batch of class labels (this job's prompts) of
    optimisation step `step`; deterministic in (seed, step), so a resumed run reads
    the batches an uninterrupted one reads."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, num_classes, batch, dtype=np.int32)


def global_batch(sharding, rows: np.ndarray) -> jax.Array:
    """One array over the whole mesh from the rows of the global batch that this
    process's devices hold (on one host: all of them)."""
    n = rows.shape[0]
    index = sharding.addressable_devices_indices_map(rows.shape)
    spans = sorted({s[0].indices(n)[:2] for s in index.values()})
    lo, hi = spans[0][0], spans[-1][1]
    return jax.make_array_from_process_local_data(sharding, rows[lo:hi], rows.shape)


def held_bytes(tree) -> dict:
    """Bytes of `tree`'s arrays on each of this process's devices."""
    out = {}
    for a in jax.tree.leaves(tree):
        for s in a.addressable_shards:
            out[str(s.device)] = out.get(str(s.device), 0) + s.data.nbytes
    return out


# ---- checkpoints (Orbax) -------------------------------------------------------
def checkpoint_manager(path):
    import absl.logging
    import orbax.checkpoint as ocp

    absl.logging.set_verbosity(absl.logging.WARNING)
    options = ocp.CheckpointManagerOptions(max_to_keep=3)
    return ocp.CheckpointManager(os.path.abspath(path), options=options)


def save(mngr, step, state, config):
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            config=ocp.args.JsonSave(config)))


def saved_config(mngr, step) -> dict:
    import orbax.checkpoint as ocp

    r = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return r.config


def restore(mngr, step, state, shardings):
    """The state saved at `step`, laid out as `shardings` say (whatever the mesh it
    was saved from)."""
    import orbax.checkpoint as ocp

    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
        shardings)
    r = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return r.state


# ---- the run -------------------------------------------------------------------
def parse_args(argv):
    p = parser(__doc__, iters=30, batch=16, lr=1e-4, steps=20)
    p.add_argument("--data", type=int, default=None,
                   help="devices on the mesh axis 'data'; None: all of them / --model")
    p.add_argument("--model", type=int, default=1,
                   help="devices on the mesh axis 'model' (FSDP)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r")
    p.add_argument("--ckpt-dir", default=None,
                   help="Orbax checkpoint directory; None: no checkpoints")
    p.add_argument("--ckpt-every", type=int, default=10,
                   help="save every this many steps (and after the last)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --ckpt-dir, up to "
                        "--iters steps in all")
    p.add_argument("--unet", action="store_true",
                   help="fine-tune benchmarks/scale.py's UNet (random weights) instead")
    p.add_argument("--unet-size", type=int, default=16, help="--unet: latent side")
    p.add_argument("--unet-channels", type=int, default=32,
                   help="--unet: base channels")
    p.add_argument("--unet-levels", type=int, default=3,
                   help="--unet: resolutions (1 to 3)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first")
    p.add_argument("--coordinator", default=None,
                   help="--distributed: coordinator HOST:PORT; None: from the "
                        "environment")
    p.add_argument("--num-processes", type=int, default=None,
                   help="--distributed: processes; None: from the environment")
    p.add_argument("--process-id", type=int, default=None,
                   help="--distributed: this process; None: from the environment")
    return p.parse_args(argv)


def run(argv=None) -> dict:
    args = parse_args(argv)
    if args.distributed:
        jax.distributed.initialize(args.coordinator, args.num_processes,
                                   args.process_id)
    main = jax.process_index() == 0
    say = print if main else (lambda *a, **k: None)
    sampler, adjoint = strategy(args)

    # The mesh.
    n_dev = jax.device_count()
    data = args.data or n_dev // args.model
    if data * args.model != n_dev:
        raise SystemExit(f"--data {data} × --model {args.model} must make the "
                         f"{n_dev} devices")
    if args.batch % data:
        raise SystemExit(f"--batch {args.batch} must be a multiple of --data {data}")
    mesh = jax.make_mesh((data, args.model), ("data", "model"),
                         axis_types=(AxisType.Auto,) * 2)
    replicated = NamedSharding(mesh, P())

    def by_batch(ndim):
        return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))

    # The model, the optimiser, and their state laid out over the mesh.
    prob = unet_problem(args) if args.unet else digits_problem(args)
    opt = optax.adam(args.lr)
    base_sh = fsdp(mesh, prob.base)
    base = jax.device_put(prob.base, base_sh)
    state = {"lora": prob.lora, "opt": opt.init(prob.lora)}
    state_sh = fsdp(mesh, state)
    state = jax.device_put(state, state_sh)

    ts = aj.time_grid(prob.schedule, args.steps, t_end=1e-3)
    k_noise, k_sampler, k_eval = jax.random.split(jax.random.key(args.seed), 3)
    x_shape = (args.batch, *prob.shape)

    def sample(lora, base, x_T, labels, key):
        def model(p, x, t, c):  # the frozen weights are closed over (traced)
            return prob.apply(base, p, x, t, c)

        return aj.sample(model, lora, x_T, prob.cond(labels), schedule=prob.schedule,
                         ts=ts, sampler=sampler, adjoint=adjoint, key=key)

    def noise(key):
        x_T = jax.random.normal(key, x_shape, jnp.float32)
        return jax.lax.with_sharding_constraint(x_T, by_batch(len(x_shape)))

    def train_step(state, base, labels, step):
        x_T = noise(jax.random.fold_in(k_noise, step))
        key = jax.random.fold_in(k_sampler, step)  # stochastic samplers, Truncated

        def loss_fn(lora):
            return -jnp.mean(reward(sample(lora, base, x_T, labels, key)))

        loss, grads = jax.value_and_grad(loss_fn)(state["lora"])
        updates, opt_state = opt.update(grads, state["opt"], state["lora"])
        lora = optax.apply_updates(state["lora"], updates)
        return {"lora": lora, "opt": opt_state}, loss

    def evaluate(lora, base, labels):
        k_x, k_s = jax.random.split(k_eval)
        x0 = sample(lora, base, noise(k_x), labels, k_s)
        if prob.classify is None:
            return jnp.mean(reward(x0)), jnp.nan, x0
        # Is it still the asked-for digit? (the classifier shipped with the model)
        accuracy = jnp.mean(jnp.argmax(prob.classify(x0), -1) == labels)
        return jnp.mean(reward(x0)), accuracy, x0

    labels_sh = by_batch(1)
    step_jit = jax.jit(train_step,
                       in_shardings=(state_sh, base_sh, labels_sh, replicated),
                       out_shardings=(state_sh, replicated), donate_argnums=0)
    eval_jit = jax.jit(evaluate, in_shardings=(state_sh["lora"], base_sh, labels_sh),
                       out_shardings=(replicated, replicated, by_batch(len(x_shape))))

    # Resume.
    mngr, start, resumed_from = None, 0, None
    config = prob.config | {"seed": args.seed, "batch": args.batch, "steps": args.steps,
                            "sampler": repr(sampler), "adjoint": repr(adjoint),
                            "lr": args.lr}
    if args.ckpt_dir:
        mngr = checkpoint_manager(args.ckpt_dir)
        latest = mngr.latest_step()
        if latest is not None and not args.resume:
            raise SystemExit(f"{args.ckpt_dir} holds checkpoints (the latest of step "
                             f"{latest}): pass --resume, or another --ckpt-dir")
        if latest is None and args.resume:
            say(f"no checkpoint in {args.ckpt_dir}: starting at step 0")
        if latest is not None:
            saved = saved_config(mngr, latest)
            wrong = {k: (saved.get(k), v) for k, v in prob.config.items()
                     if saved.get(k) != v}
            if wrong:
                raise SystemExit(f"the checkpoint in {args.ckpt_dir} is of another "
                                 f"model: (saved, asked) {wrong}")
            changed = {k: (saved.get(k), v) for k, v in config.items()
                       if saved.get(k) != v}
            if changed:
                say(f"note: resuming with other settings (saved, now): {changed}")
            state = restore(mngr, latest, state, state_sh)
            start = resumed_from = latest
    elif args.resume:
        raise SystemExit("--resume needs --ckpt-dir")

    def batch(step):
        labels = load_labels(step, args.batch, prob.num_classes, args.seed)
        return global_batch(labels_sh, labels), jax.device_put(np.int32(step),
                                                               replicated)

    # Compile once; the memory XLA plans for each device.
    compiled = step_jit.lower(state, base, *batch(start)).compile()
    mem = compiled.memory_analysis()
    memory = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "generated_code_bytes": int(mem.generated_code_size_in_bytes),
    }
    held = held_bytes((base, state))
    mib = lambda b: f"{b / 2**20:.2f} MiB"
    count = lambda tree: sum(a.size for a in jax.tree.leaves(tree))
    say(f"mesh: data {data} × model {args.model} over {n_dev} "
        f"{jax.devices()[0].platform} devices; {prob.config['model']}, LoRA rank "
        f"{args.rank} on {len(prob.lora)} weights: {count(prob.lora):,} trainable, "
        f"{count(prob.base):,} frozen; {sampler!r} + {adjoint!r}, N = {args.steps}, "
        f"batch {args.batch} ({args.batch // data} per data shard)")
    if resumed_from is not None:
        say(f"resumed from step {resumed_from} of {args.ckpt_dir}")
    say("per-device memory of the train step (XLA memory_analysis): arguments "
        f"{mib(memory['argument_bytes'])}, outputs {mib(memory['output_bytes'])}, "
        f"temporaries {mib(memory['temp_bytes'])}, aliased (donated) "
        f"{mib(memory['alias_bytes'])}")
    say("held per device (frozen weights + LoRA + Adam state): "
        + ", ".join(f"{k} {mib(v)}" for k, v in held.items()))

    # Train.
    eval_labels = np.arange(args.batch, dtype=np.int32) % prob.num_classes
    eval_batch = global_batch(labels_sh, eval_labels)
    reward_start, acc_start, x0_start = eval_jit(state["lora"], base, eval_batch)
    losses, times, saved_step = [], [], None
    for i in progress(range(start, args.iters), f"fine-tuning on {n_dev} devices",
                      args.quiet):
        inputs = batch(i)
        t0 = time.perf_counter()
        state, loss = compiled(state, base, *inputs)
        losses.append(float(loss))  # waits for the step
        times.append(time.perf_counter() - t0)
        if mngr is not None and ((i + 1) % args.ckpt_every == 0 or i + 1 == args.iters):
            save(mngr, i + 1, state, config)  # copies to the host, writes in background
            saved_step = i + 1
    if mngr is not None:
        mngr.wait_until_finished()
        mngr.close()
    reward_end, acc_end, x0_end = eval_jit(state["lora"], base, eval_batch)

    result = {
        "devices": n_dev,
        "mesh": {"data": data, "model": args.model},
        "model": prob.config["model"],
        "sampler": repr(sampler),
        "adjoint": repr(adjoint),
        "trainable_params": count(prob.lora),
        "frozen_params": count(prob.base),
        "start_step": start,
        "resumed_from": resumed_from,
        "end_step": max(start, args.iters),
        "losses": losses,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "reward_start": float(reward_start),
        "reward_end": float(reward_end),
        "accuracy_start": float(acc_start),
        "accuracy_end": float(acc_end),
        "memory_per_device": memory,
        "held_bytes_per_device": held,
        "step_time_s": statistics.median(times) if times else None,
        "checkpoint_step": saved_step,
        "ckpt_dir": args.ckpt_dir,
        # The trained adapters, gathered to every process (NumPy).
        "lora": multihost_utils.process_allgather(state["lora"], tiled=True),
    }
    if times:
        say(f"step time: {1e3 * result['step_time_s']:.1f} ms (median of {len(times)} "
            f"steps, {start + 1}..{args.iters}); training loss (-reward) "
            f"{losses[0]:.4f} -> {losses[-1]:.4f}")
    accuracy = ("" if prob.classify is None else
                f", classifier accuracy {result['accuracy_start']:.0%} -> "
                f"{result['accuracy_end']:.0%}")
    say(f"held-out samples: reward (ink) {result['reward_start']:.4f} -> "
        f"{result['reward_end']:.4f}{accuracy}")
    if saved_step is not None:
        say(f"checkpoint: step {saved_step} saved in {args.ckpt_dir}")
    if prob.classify is not None:  # images: a grid of the held-out samples
        x0_start = multihost_utils.process_allgather(x0_start, tiled=True)
        x0_end = multihost_utils.process_allgather(x0_end, tiled=True)
        if main:
            result["png"] = save_grid(
                os.path.join(args.out, "sharded_finetune.png"), [x0_start, x0_end],
                [f"step {start}", f"step {result['end_step']}"],
                [str(int(v)) for v in eval_labels])
            say(f"saved {result['png']}")
    return result


if __name__ == "__main__":
    run(sys.argv[1:])
