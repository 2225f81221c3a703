"""Implicit Diffusion (Marion et al., 2024): sampling and backpropagation in one loop,
all N sampler steps and all N backward steps advanced in parallel."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, ArrayLike, PyTree

from ._adjoints._base import Solve
from ._adjoints._dto import DTO
from ._misc import is_concrete, step_noise, tree_normal
from ._model import Scheduled, split_model
from ._sample import check_types, sample
from ._samplers._base import AbstractSampler
from ._schedule import AbstractSchedule


class ImplicitDiffusionState(eqx.Module):
    """The shift registers of `aj.ImplicitDiffusion` (a pytree of arrays; carry it
    through your loop, e.g. as a `lax.scan` carry).

    - `states`: N sampler states; slot j holds the state entering step j of the
        trajectory admitted j iterations ago.
    - `history`: the last 2N − 1 iterations' (state, noise) pairs of every slot,
        leading axes (2N − 1, N): what the backward register replays (noise None
        for a deterministic sampler).
    - `cotangents`: N sampler-state cotangents; slot j holds the adjoint of the
        state leaving step j − 1, which the next iteration pulls back through step
        j − 1 (slot 0's is the adjoint of x_T of the trajectory it finished).
    - `iteration`: the number of iterations run (warm-up included).
    """

    states: PyTree
    history: PyTree
    cotangents: PyTree
    iteration: Array

    def shardings(self, mesh: jax.sharding.Mesh, axis: str = "slots") -> PyTree:
        """`NamedSharding`s placing the register slots on the devices of the mesh
        axis `axis` (the slot axis of every register; the iteration replicated), for
        `jax.device_put` and `jax.jit`'s `in_shardings`/`out_shardings`. Each device
        then advances and back-propagates its own slots; the registers' shifts
        between neighbouring slots are the communication (`collective-permute`s),
        plus the all-reduce of the θ-gradient over the slots. N must be divisible
        by the axis size. Any further sharding of the batch is up to you."""
        lead = lambda *spec: lambda v: NamedSharding(mesh, P(*spec))
        return ImplicitDiffusionState(
            states=jtu.tree_map(lead(axis), self.states),
            history=jtu.tree_map(lead(None, axis), self.history),
            cotangents=jtu.tree_map(lead(axis), self.cotangents),
            iteration=NamedSharding(mesh, P()),
        )


def _shift(v: Array, by: int) -> Array:
    """The register `v` moved `by` slots along its slot axis (axis 0), cyclically;
    the caller overwrites the slot that wrapped around. A roll: over a register
    sharded by slots XLA makes it one `collective-permute` between neighbouring
    devices (a concatenation of slices became all-to-alls and all-gathers)."""
    return jnp.roll(v, by, axis=0)


class ImplicitDiffusion(eqx.Module):
    """Implicit Diffusion (Marion et al., AISTATS 2025): optimise the parameters θ of
    a sampler's model against the expected loss of its samples, sampling and
    backpropagating *in parallel* through a shift register instead of running a
    full sampling pass and a full backward pass per gradient.

    The register holds N particles, one per grid time (slot j at `ts[j]`), and N
    adjoints. Each `step`:

    1. advances every particle one sampler step (slot j takes step j) in **one
        batched model call** over the N slots; the particle leaving the last slot
        is the finished sample x_0, and slot 0 admits fresh noise x_T;
    2. gets the finished sample's loss and its cotangent ∂L/∂x_0;
    3. pulls every adjoint back one step (slot j through step j, the new cotangent
        entering the last slot) in **one batched VJP** of the N steps at the states
        that trajectory visited, which it replays from the history register; the
        VJP's θ-cotangent, summed over the slots, is the gradient returned.

    **The gradient and its staleness.** At iteration k the gradient sums step j's
    contribution for trajectory k − 2N + 2 + j, j = 0, …, N − 1. With θ held fixed
    and the same x_T and noises in every trajectory, it is exactly the `aj.DTO()`
    gradient of one sample (the tests check this to round-off); in general it is
    the DTO gradient with the shift register's delays: trajectory τ's step j ran
    with θ_{τ+j}, its backward step j runs with θ_{τ+2N−2−j} at the recorded states,
    so a change of θ reaches the emitted samples after 1 to N iterations and the
    whole gradient after 2N. With a small learning rate (the drift of θ over
    2N iterations small) it follows the exact gradient; with a large one the delay
    can make plain SGD oscillate, as any delayed-gradient method.

    **Cost per iteration:** one batched model evaluation (sampling, batch N·B) and
    one batched VJP (batch N·B; its forward pass re-evaluates the model at the
    replayed states, so `aj.bench.count_evals` reports forward = 2, vjp = 1). A
    sequential `aj.DTO()` gradient of the same batch costs N evaluations and N VJPs
    of batch B: the same arithmetic up to the re-evaluation, in N times fewer,
    N times larger calls, one gradient per iteration after the first. (The
    start-up-evaluation samplers `aj.ReversibleHeun()` and `aj.AsyncLeapfrog()` pay
    their step-0 evaluation as a second batched call under `vmap`.)

    **Memory:** the N states, N cotangents and the (2N − 1) × N history of states and
    noises (O(N²) samples, no activations); `aj.DTO()` stores O(N) activations.

    **Samplers:** any of the library's deterministic samplers, and stochastic ones
    (e.g. `aj.DDIM(eta=1)`): step j's noise of each trajectory is recorded and
    replayed, so the gradient is the exact one of the noisy chain.

    !!! Example

        ```python
        opt = aj.ImplicitDiffusion(model, schedule=schedule, ts=ts,
                                   sampler=aj.DPMSolver2(), loss=loss)
        state = opt.init(params, x_like, key)            # fills the registers
        @jax.jit
        def train_step(params, state, opt_state, key):
            grads, state, (value, x0) = opt.step(params, state, key)
            updates, opt_state = optimiser.update(grads, opt_state)
            return optax.apply_updates(params, updates), state, opt_state, value
        ```
    """

    model: Callable
    schedule: AbstractSchedule
    # The grid as static Python floats and its dtype: concrete wherever the module is
    # built or passed (inside a `jit`, or through `eqx.filter_jit`, which would trace
    # an array field); `ts` rebuilds the NumPy array.
    grid: tuple[float, ...] = eqx.field(static=True)
    grid_dtype: str = eqx.field(static=True)
    sampler: AbstractSampler
    loss: Callable
    cond: PyTree = None

    def __init__(
        self,
        model: Callable,
        *,
        schedule: AbstractSchedule,
        ts: ArrayLike,
        sampler: AbstractSampler,
        loss: Callable,
        cond: PyTree = None,
    ):
        check_types(model, schedule, sampler, sampler_example="aj.DPMSolver2()")
        if not callable(loss):
            raise TypeError(
                "`loss` must be a callable `loss(x0) -> scalar` (e.g. minus the mean "
                f"reward of the batch); got {type(loss).__name__}."
            )
        if not is_concrete(ts):
            raise ValueError(
                "`ImplicitDiffusion(ts=...)` needs a concrete time grid (it sets the "
                "number of register slots); build it outside `jit`."
            )
        ts = np.asarray(ts)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(
                f"`ts` must be a 1-D array with len(ts) >= 2; got shape {ts.shape}."
            )
        self.model = model
        self.schedule = schedule
        dtype = jax.dtypes.canonicalize_dtype(ts.dtype)
        self.grid = tuple(float(t) for t in ts.astype(dtype))
        self.grid_dtype = np.dtype(dtype).name
        self.sampler = sampler
        self.loss = loss
        self.cond = cond

    @property
    def ts(self) -> np.ndarray:
        """The time grid (NumPy, concrete)."""
        return np.asarray(self.grid, self.grid_dtype)

    @property
    def num_steps(self) -> int:
        return self.ts.shape[0] - 1

    def _solve(self, params):
        # Only `Solve.step` is used (the grid's endpoints matter to the custom
        # adjoints alone), with each step's noise passed in: no key.
        model_call, arrays = split_model(self.model)
        solve = Solve(
            model_call,
            self.schedule,
            self.ts,
            self.sampler,
            None,
            isinstance(self.cond, Scheduled),
        )
        cond = self.cond.values if isinstance(self.cond, Scheduled) else self.cond
        return solve, (arrays, params), cond

    def _draw(self, key, x_like):
        """Fresh x_T for slot 0 and every slot's step noise, from one key."""
        k_x, k_n = jax.random.split(key)
        x_T = tree_normal(k_x, x_like, self.ts.dtype)
        if not self.sampler.is_sde:
            return x_T, None
        noise = jax.vmap(lambda j: step_noise(k_n, j, x_like, self.ts.dtype))(
            jnp.arange(self.num_steps)
        )
        return x_T, noise

    def _slot_inputs(self, noise):
        n = self.num_steps
        return (self.ts[:-1], self.ts[1:], jnp.arange(n, dtype=jnp.int32), noise)

    def _forward(self, solve, theta, cond, states, noise):
        """Every slot's step in one batched call: slot j takes step j."""

        def one(state, t, s, i, z, nz):
            return solve.step(theta, cond, state, (t, s, i, z, nz))

        t, s, i, nz = self._slot_inputs(noise)
        z = cond if solve.scheduled else None
        z_axis = 0 if solve.scheduled else None
        n_axis = None if nz is None else 0
        return jax.vmap(one, in_axes=(0, 0, 0, 0, z_axis, n_axis))(
            states, t, s, i, z, nz
        )

    def _advance(self, solve, theta, cond, reg: ImplicitDiffusionState, key, x_like):
        """The sampling half of an iteration: returns the register with every particle
        stepped and the history written, and the finished sample."""
        n = self.num_steps
        x_T, noise = self._draw(key, x_like)
        stepped = self._forward(solve, theta, cond, reg.states, noise)
        slot = jnp.mod(reg.iteration, 2 * n - 1)
        history = jtu.tree_map(
            lambda h, v: h.at[slot].set(v), reg.history, (reg.states, noise)
        )
        last = jtu.tree_map(lambda v: v[-1], stepped)
        fresh = self.sampler.init(x_T, self.schedule, self.ts)
        states = jtu.tree_map(
            lambda f, v: _shift(v, 1).at[0].set(f.astype(v.dtype)), fresh, stepped
        )
        reg = ImplicitDiffusionState(states, history, reg.cotangents, reg.iteration + 1)
        return reg, last

    def _backward(self, solve, theta, cond, reg, k, last_ct):
        """The backward half of iteration k: slot j pulls the adjoint it holds back
        through step j at the state trajectory k − 2N + 2 + j had entering it, which
        the history recorded at iteration k − 2N + 2 + 2j."""
        n = self.num_steps
        js = jnp.arange(n, dtype=jnp.int32)
        rows = jnp.mod(k - 2 * n + 2 + 2 * js, 2 * n - 1)
        # Slot j reads its own column of the history (a per-slot dynamic slice, so
        # a history sharded over the slots is read where it lives).
        states, noise = jtu.tree_map(
            lambda h: jax.vmap(lambda col, r: col[r], in_axes=(1, 0))(h, rows),
            reg.history,
        )
        # Slot j's cotangent: the one slot j + 1 produced last iteration, and for the
        # last slot the finished sample's.
        cts = jtu.tree_map(
            lambda c, l: _shift(c, -1).at[-1].set(l.astype(c.dtype)),
            reg.cotangents,
            last_ct,
        )
        arrays, params = theta
        # d/dθ and d/d(state) of all N steps at once: the vmapped steps are one
        # function of (params, states), so its VJP is one batched VJP and the
        # θ-cotangent comes summed over the slots.
        _, vjp = jax.vjp(
            lambda p, st: self._forward(solve, (arrays, p), cond, st, noise),
            params,
            states,
        )
        g_params, ct_states = vjp(cts)
        return g_params, ct_states

    def _iteration(self, solve, theta, cond, reg, key, x_like):
        k = reg.iteration
        reg, last = self._advance(solve, theta, cond, reg, key, x_like)
        x0 = self.sampler.output(last)
        value, loss_vjp = jax.vjp(self.loss, x0)
        (g_x0,) = loss_vjp(jnp.ones_like(value))
        _, out_vjp = jax.vjp(self.sampler.output, last)
        (last_ct,) = out_vjp(g_x0)
        g_params, cts = self._backward(solve, theta, cond, reg, k, last_ct)
        reg = ImplicitDiffusionState(reg.states, reg.history, cts, reg.iteration)
        return g_params, reg, (value, x0)

    def init(self, params: PyTree, x_like: PyTree, key: Array) -> ImplicitDiffusionState:
        """Fills the registers so that the first `step` already returns a complete
        gradient: N − 1 sampling iterations (every slot then holds a particle that
        entered at slot 0 and took the steps before it) and N − 1 full iterations
        whose gradients are discarded, all with `params`.

        **Arguments:** `params` (θ for the warm-up), `x_like` (a pytree of arrays
        with the shape and dtype of one x_T batch, e.g. `jnp.zeros((B, d))`; x_T is
        drawn standard normal like it), `key` (a PRNG key).

        **Returns:** an `aj.ImplicitDiffusionState`. Cost: 2N − 2 batched
        evaluations and N − 1 batched VJPs.
        """
        leaves = jtu.tree_leaves(x_like)
        if not leaves or not all(
            hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating) for v in leaves
        ):
            raise TypeError(
                "`x_like` must be a pytree of floating-point arrays shaped like one "
                "x_T batch (e.g. `jnp.zeros((batch, dim))`)."
            )
        # Every static check of `aj.sample` (grid, sampler, model output), once.
        kw = {"key": jax.random.key(0)} if self.sampler.is_sde else {}
        jax.eval_shape(
            lambda p: sample(self.model, p, x_like, self.cond, schedule=self.schedule,
                             ts=np.asarray(self.ts), sampler=self.sampler,
                             adjoint=DTO(), **kw),
            params,
        )
        n = self.num_steps
        solve, theta, cond = self._solve(params)
        key, first = jax.random.split(key)
        state0 = self.sampler.init(self._draw(first, x_like)[0], self.schedule, self.ts)
        zeros = lambda tree, *lead: jtu.tree_map(
            lambda v: jnp.zeros(lead + jnp.shape(v), jnp.result_type(v)), tree
        )
        # Slot 0 starts with a fresh x_T; the zero states in the other slots are
        # valid placeholders that leave, never differentiated, within N − 1
        # iterations.
        states = jtu.tree_map(
            lambda v: jnp.zeros((n,) + v.shape, v.dtype).at[0].set(v), state0
        )
        reg = ImplicitDiffusionState(
            states=states,
            history=(
                zeros(state0, 2 * n - 1, n),
                zeros(x_like, 2 * n - 1, n) if self.sampler.is_sde else None,
            ),
            cotangents=zeros(state0, n),
            iteration=jnp.asarray(-(2 * n - 2), jnp.int32),
        )
        keys = jax.random.split(key, 2 * n - 2)

        def fill(reg, k):
            reg, _ = self._advance(solve, theta, cond, reg, k, x_like)
            return reg, None

        def warm(reg, k):
            _, reg, _ = self._iteration(solve, theta, cond, reg, k, x_like)
            return reg, None

        reg, _ = jax.lax.scan(fill, reg, keys[: n - 1])
        reg, _ = jax.lax.scan(warm, reg, keys[n - 1:])
        return reg

    def step(
        self, params: PyTree, state: ImplicitDiffusionState, key: Array
    ) -> tuple[PyTree, ImplicitDiffusionState, tuple[Array, PyTree]]:
        """One iteration: every particle one step forward and every adjoint one step
        back (one batched evaluation, one batched VJP), one finished sample out and
        fresh noise from `key` in.

        **Returns:** `(grads, state, (loss, x0))`: the gradient with respect to
        `params` (a pytree like it; see the class docstring for its delays), the
        new registers, and the finished sample x_0 with its loss.
        """
        x_like = self.sampler.output(jtu.tree_map(lambda v: v[0], state.states))
        solve, theta, cond = self._solve(params)
        return self._iteration(solve, theta, cond, state, key, x_like)
