"""Trains the model zoo's digits models (by default into `~/adjoint_jax/digits/`).

- a class-conditional ε-prediction network (Equinox, `adjoint_jax/zoo/_digits.py`) on
  the 1,797 8×8 handwritten digits that ship with scikit-learn, under `aj.VPLinear()`;
- a small digit classifier (Flax linen, `adjoint_jax/zoo/_classifier.py`) whose
  penultimate layer is the embedding, on a held-out split of the same digits;

then samples 50 images per class with `aj.DPMSolver2` and measures how many the
classifier recognises as their class. `aj.zoo.digits(path=DIR)` loads the result of
`--out DIR`; the weights that ship with the package (which `aj.zoo.digits()` loads)
were written by `--out adjoint_jax/zoo` from a source checkout, which only a
maintainer regenerating them should do.

Float32 and deterministic given the seed (two runs write identical weights). The
default run takes about 9.5 CPU-minutes (an estimated 5–6 minutes of wall time on 2
idle cores); measured: 13 minutes on 2 cores shared with other jobs (load ~5). It writes
`digits_eps.eqx`, `digits_classifier.msgpack`, `digits.json` (the hyperparameters, the
measured accuracies and the size and SHA-256 of both weights files, which
`aj.zoo.digits()` verifies before loading them) and `digits_samples.png` into `--out`.

    pip install adjoint_jax[examples]
    python examples/train_digits.py
    python examples/train_digits.py --eps-steps 500 --out /tmp/d --png /tmp/d/s.png
"""

import argparse
import json
import os
import time

import equinox as eqx
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import adjoint_jax as aj
from adjoint_jax.zoo._classifier import DigitsClassifier
from adjoint_jax.zoo._digits import DigitsEpsNet, to_model_space, to_pixel_space
from adjoint_jax.zoo._zoo import eps_net_spec, file_record


USER_DIR = os.path.join(os.path.expanduser("~"), "adjoint_jax", "digits")
EPS_FILE = "digits_eps.eqx"
CLASSIFIER_FILE = "digits_classifier.msgpack"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.strip().split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=USER_DIR,
                   help="folder for the weights, the JSON and the sample grid (load "
                        "with aj.zoo.digits(path=...); `adjoint_jax/zoo` overwrites "
                        "the shipped weights)")
    p.add_argument("--png", default=os.path.join("OUT", "digits_samples.png"),
                   help="path of the sample grid (OUT: the --out folder)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--eps-steps", type=int, default=3000,
                   help="training steps of the ε-network")
    p.add_argument("--batch", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--channels", type=int, default=48, help="ε-network width")
    p.add_argument("--blocks", type=int, default=3, help="ε-network residual blocks")
    p.add_argument("--cond-dim", type=int, default=16,
                   help="class embedding dimension")
    p.add_argument("--label-dropout", type=float, default=0.1,
                   help="probability of training with the null class (for CFG)")
    p.add_argument("--ema", type=float, default=0.999,
                   help="decay of the weights' exponential moving average")
    p.add_argument("--clf-steps", type=int, default=1000,
                   help="training steps of the classifier")
    p.add_argument("--eval-per-class", type=int, default=50,
                   help="samples per class for the accuracy check")
    p.add_argument("--eval-steps", type=int, default=25,
                   help="DPMSolver2 steps of the accuracy check")
    args = p.parse_args(argv)
    if args.png == os.path.join("OUT", "digits_samples.png"):
        args.png = os.path.join(args.out, "digits_samples.png")
    return args


# ---- data ---------------------------------------------------------------------------
def load_data():
    digits = load_digits()
    return to_model_space(digits.images), digits.target.astype(np.int32)


def split(x, y, seed, test_fraction=0.2):
    """A stratified train/test split (a fixed fraction of every class held out)."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: round(test_fraction * len(idx))]] = True
    return (x[~test], y[~test]), (x[test], y[test])


def augment(key, x):
    """Random shifts by up to one pixel (background padding) plus a little noise."""
    k1, k2, k3 = jax.random.split(key, 3)
    b = x.shape[0]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=-1.0)
    di = jax.random.randint(k1, (b,), 0, 3)
    dj = jax.random.randint(k2, (b,), 0, 3)
    crop = jax.vmap(lambda im, i, j: jax.lax.dynamic_slice(im, (i, j), (8, 8)))
    x = crop(padded, di, dj)
    return x + 0.05 * jax.random.normal(k3, x.shape, x.dtype)


# ---- classifier (Flax) --------------------------------------------------------------
def train_classifier(key, train, test, steps, batch=128):
    (xtr, ytr), (xte, yte) = train, test
    net = DigitsClassifier()
    k_init, key = jax.random.split(key)
    variables = net.init(k_init, jnp.zeros((1, 8, 8), jnp.float32))
    sched = optax.warmup_cosine_decay_schedule(
        0.0, 3e-3, min(100, steps // 5), steps, 3e-5
    )
    opt = optax.adamw(sched, weight_decay=1e-4)
    opt_state = opt.init(variables)
    xtr, ytr = jnp.asarray(xtr), jnp.asarray(ytr)

    @jax.jit
    def step(variables, opt_state, key):
        k1, k2 = jax.random.split(key)
        idx = jax.random.randint(k1, (batch,), 0, xtr.shape[0])
        xb, yb = augment(k2, xtr[idx]), ytr[idx]

        def loss_fn(v):
            logits, _ = net.apply(v, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, g = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = opt.update(g, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    t0 = time.time()
    for i in range(steps):
        key, sub = jax.random.split(key)
        variables, opt_state, loss = step(variables, opt_state, sub)
        if (i + 1) % 500 == 0:
            print(
                f"  classifier step {i + 1}/{steps}  loss {float(loss):.4f}", flush=True
            )
    logits, _ = jax.jit(net.apply)(variables, jnp.asarray(xte))
    acc = float(jnp.mean(jnp.argmax(logits, -1) == yte))
    return variables, float(loss), acc, time.time() - t0


# ---- ε-network (Equinox) ------------------------------------------------------------
def train_eps(key, x, y, schedule, args, num_classes=10):
    k_net, k_table, key = jax.random.split(key, 3)
    net = DigitsEpsNet(
        schedule,
        channels=args.channels,
        num_blocks=args.blocks,
        cond_dim=args.cond_dim,
        key=k_net,
    )
    # Row `num_classes` is the null (unconditional) embedding.
    table = jax.random.normal(k_table, (num_classes + 1, args.cond_dim), jnp.float32)
    # The schedule is fixed (described by digits.json), never trained.
    params, static = eqx.partition(
        (net, table), (eps_net_spec(net, eqx.is_inexact_array, False), True)
    )
    sched = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(200, args.eps_steps // 5), args.eps_steps, args.lr * 0.02
    )
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    opt_state = opt.init(params)
    ema = params
    x, y = jnp.asarray(x), jnp.asarray(y)
    t_lo, t_hi = schedule.t_min, schedule.t_max

    @jax.jit
    def step(params, opt_state, ema, key, i):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        idx = jax.random.randint(k1, (args.batch,), 0, x.shape[0])
        x0, lab = x[idx], y[idx]
        lab = jnp.where(
            jax.random.uniform(k2, lab.shape) < args.label_dropout, num_classes, lab
        )
        t = jax.random.uniform(k3, (args.batch,), jnp.float32, t_lo, t_hi)
        noise = jax.random.normal(k4, x0.shape, jnp.float32)
        a = schedule.alpha(t)[:, None, None]
        s = schedule.sigma(t)[:, None, None]

        def loss_fn(p):
            net, table = eqx.combine(p, static)
            return jnp.mean((net(a * x0 + s * noise, t, table[lab]) - noise) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        # EMA with a warm-up (decay (1 + i)/(10 + i) early on), so that the average
        # forgets the initialisation.
        d = jnp.minimum(args.ema, (1.0 + i) / (10.0 + i)).astype(jnp.float32)
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
        return params, opt_state, ema, loss

    t0, running = time.time(), []
    for i in range(args.eps_steps):
        key, sub = jax.random.split(key)
        params, opt_state, ema, loss = step(params, opt_state, ema, sub, i)
        running.append(loss)
        if (i + 1) % 250 == 0 or i + 1 == args.eps_steps:
            mean = float(jnp.mean(jnp.stack(running)))
            running = []
            print(
                f"  eps-net step {i + 1}/{args.eps_steps}  loss {mean:.4f}  "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
    net, table = eqx.combine(ema, static)
    return net, table, mean, time.time() - t0


# ---- evaluation ---------------------------------------------------------------------
def sample_classes(net, table, schedule, key, per_class, num_steps, num_classes=10):
    labels = jnp.repeat(jnp.arange(num_classes), per_class)
    params, static = eqx.partition(net, eps_net_spec(net, eqx.is_inexact_array, False))
    ts = aj.time_grid(schedule, num_steps, t_end=1e-3)
    x_T = jax.random.normal(key, (labels.shape[0], 8, 8), jnp.float32)
    x0 = aj.sample(
        lambda p, x, t, z: eqx.combine(p, static)(x, t, z),
        params,
        x_T,
        table[labels],
        schedule=schedule,
        ts=ts,
        sampler=aj.DPMSolver2(),
    )
    return x0, labels


def save_grid(path, images, rows, cols):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = to_pixel_space(images[: rows * cols]).reshape(rows, cols, 8, 8)
    pad = np.full((rows, cols, 10, 10), 0.2, np.float32)  # light grey frames
    pad[:, :, 1:9, 1:9] = img
    canvas = pad.transpose(0, 2, 1, 3).reshape(rows * 10, cols * 10)
    plt.figure(figsize=(cols * 0.6, rows * 0.6))
    plt.imshow(canvas, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    plt.axis("off")
    plt.tight_layout(pad=0.1)
    plt.savefig(path, dpi=100)
    plt.close()


def main():
    args = parse_args()
    t_start = time.time()
    key = jax.random.key(args.seed)
    k_clf, k_eps, k_eval = jax.random.split(key, 3)
    x, y = load_data()
    train, test = split(x, y, args.seed)
    schedule = aj.VPLinear()

    print(f"classifier: {len(train[1])} train / {len(test[1])} held-out images")
    clf_vars, clf_loss, clf_acc, clf_time = train_classifier(
        k_clf, train, test, args.clf_steps
    )
    print(f"  held-out accuracy {clf_acc:.4f}  ({clf_time:.0f} s)")

    print(f"eps-net: {len(y)} images, {args.eps_steps} steps of batch {args.batch}")
    net, table, eps_loss, eps_time = train_eps(k_eps, x, y, schedule, args)

    print(
        f"sampling {args.eval_per_class} per class, DPMSolver2, {args.eval_steps} "
        "steps to t_end=1e-3"
    )
    t0 = time.time()
    x0, labels = sample_classes(
        net, table, schedule, k_eval, args.eval_per_class, args.eval_steps
    )
    logits, _ = jax.jit(DigitsClassifier().apply)(clf_vars, x0)
    sample_acc = float(jnp.mean(jnp.argmax(logits, -1) == labels))
    per_class = [
        float(jnp.mean(jnp.argmax(logits[labels == c], -1) == c)) for c in range(10)
    ]
    elapsed = time.time() - t0
    print(f"  class-conditional sample accuracy {sample_acc:.4f}  ({elapsed:.0f} s)")
    print("  per class:", " ".join(f"{a:.2f}" for a in per_class))

    os.makedirs(args.out, exist_ok=True)
    # The network's arrays and the class table; not the schedule (digits.json
    # describes it), so the file does not depend on how the schedule stores β.
    spec = eqx.default_serialise_filter_spec
    eqx.tree_serialise_leaves(
        os.path.join(args.out, EPS_FILE),
        (net, table),
        filter_spec=(eps_net_spec(net, spec, lambda f, x: None), spec),
    )
    with open(os.path.join(args.out, CLASSIFIER_FILE), "wb") as f:
        f.write(flax.serialization.to_bytes(clf_vars))
    info = {
        "schedule": {"name": "VPLinear", "beta_min": 0.1, "beta_max": 20.0},
        "eps_net": {
            "channels": args.channels,
            "num_blocks": args.blocks,
            "cond_dim": args.cond_dim,
            "emb_dim": 128,
            "num_freqs": 16,
            "groups": 8,
        },
        "num_classes": 10,
        "null_label": 10,
        "train": {
            "seed": args.seed,
            "eps_steps": args.eps_steps,
            "batch": args.batch,
            "lr": args.lr,
            "label_dropout": args.label_dropout,
            "ema": args.ema,
            "eps_final_loss": round(eps_loss, 5),
            "eps_train_seconds": round(eps_time, 1),
            "classifier_steps": args.clf_steps,
            "classifier_final_loss": round(clf_loss, 6),
            "classifier_train_seconds": round(clf_time, 1),
        },
        "classifier_heldout_accuracy": round(clf_acc, 4),
        "sample_accuracy": {
            "value": round(sample_acc, 4),
            "per_class": [round(a, 4) for a in per_class],
            "samples": int(labels.shape[0]),
            "sampler": "DPMSolver2",
            "num_steps": args.eval_steps,
            "t_end": 1e-3,
            "spacing": "logsnr",
        },
        # Verified by `aj.zoo.digits()` before it deserialises the weights.
        "files": {
            name: file_record(os.path.join(args.out, name))
            for name in (EPS_FILE, CLASSIFIER_FILE)
        },
    }
    # Written after the weights: the checksums describe the files now on disk.
    with open(os.path.join(args.out, "digits.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    # Rows are classes 0..9, up to ten samples each.
    cols = min(10, args.eval_per_class)
    order = np.concatenate(
        [np.flatnonzero(np.asarray(labels) == c)[:cols] for c in range(10)]
    )
    save_grid(args.png, np.asarray(x0)[order], 10, cols)
    print(f"wrote {args.out}/digits_*, {args.png}; total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
