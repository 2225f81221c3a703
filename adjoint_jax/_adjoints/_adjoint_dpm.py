"""AdjointDPM (Pan et al., ICLR 2024): the continuous adjoint of the exponentially
reparameterised probability-flow ODE, integrated by diffrax."""

import functools

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jax.sharding import PartitionSpec as P

from .._closure import ClosureConverted
from .._misc import (
    acc_zeros,
    accumulator_dtype,
    describe_class_error,
    lincomb,
    tree_acc,
)
from .._samplers._base import AbstractSampler, AbstractSDESampler
from ._base import (
    FORWARD_MODE_HINT,
    AbstractCustomAdjoint,
    Differentiated,
    Solve,
    refuse_nonsmooth,
    skip_body_if_zero,
    zero_length_steps,
)
from ._continuous import as_jax_arrays
from ._endpoints import endpoint_backward, endpoint_forward


class AdjointDPM(AbstractCustomAdjoint):
    """AdjointDPM (Pan et al., ICLR 2024): the gradient of the probability-flow ODE
    by its continuous adjoint, in the exponentially reparameterised variables, solved
    by a diffrax ODE solver with step-size control. O(1) memory in the number of
    steps.

    In y = x/α against ρ = σ/α the probability-flow ODE is dy/dρ = ε_θ(αy, z, t(ρ))
    (no linear term, so not stiff). The forward pass is the sampler's own; the
    backward pass solves, from ρ(t_end) up to ρ(t_start), the augmented system

        dy/dρ = ε,   da_y/dρ = −a_yᵀ ∂ε/∂y,   da_θ/dρ = −a_yᵀ ∂ε/∂θ,
        da_z/dρ = −a_yᵀ ∂ε/∂z,

    with a_y(ρ_end) = α_end ∂L/∂x_0 (x = αy), a_θ = a_z = 0, re-solving y backward
    from the sampled x_0 instead of storing it; one VJP of ε per evaluation of the
    vector field. Then ∂L/∂x_T = a_y(ρ_start)/α_start. The system is solved one
    forward step at a time (a `lax.scan` over the N intervals [ρ_{i+1}, ρ_i], one
    `diffeqsolve` each), so that a time-scheduled z_i (`aj.Scheduled`) gets its own
    a_z, and constant conditioning goes through the same computation (its gradient
    is the per-step ones summed; the two agree to round-off). Step-size control
    looks at (y, a_y) only, a seminorm (Kidger et al. 2021): a_θ and a_z are
    quadratures along them, so the steps, and ∂L/∂x_T, do not depend on which
    arguments are differentiated.

    **When to use it:** memory-flat gradients of a deterministic sampler with an
    error you control through `rtol`/`atol` (the backward pass is as accurate as you
    ask; the forward one is whatever the sampler gives). Prefer `aj.AdjointDEIS` for
    a backward pass matched to the forward grid at a fixed cost, and
    `aj.ReversibleAdjoint` when the gradient of the sampler itself is wanted.

    **Accuracy:** the gradient of the *continuous* ODE along the sampled x_0: it
    differs from the sampler's discrete gradient (`aj.DTO`) by the sampler's O(h^k)
    error (measured slope 2.0 with `DPMSolver2` on a random MLP model), and from the
    true gradient by that plus the tolerance of the solve. On the closed-form
    Gaussian with an accurate forward pass: 5e-10 relative at rtol = atol = 1e-8;
    at N = 10 intervals the error follows the tolerance (2e-5 at 1e-4, 5e-7 at
    1e-6, 7e-9 at 1e-8). Per-step conditioning gradients match the closed form to
    the same accuracy.

    **Memory:** O(1) in N: compiled temporary memory of the jitted gradient (MLP of
    width 256, batch 64) 19,794,952 bytes at both N = 16 and N = 128.

    **Cost:** per interval, the initial step-size selection (2 evaluations) plus the
    adaptive steps times the solver's stages (6 for Tsit5), one model VJP each. With
    few forward steps the tolerance sets the cost; with many, every interval still
    takes at least one step (random MLP, rtol = 1e-6: about 40 VJPs per interval at
    N = 6, 15 at N = 200). Sharp data make the backward solve longer. If an interval
    needs more than `max_steps` steps the gradient raises an error saying so (raise
    `max_steps` or loosen the tolerances) rather than return a wrong gradient.

    **Precision:** the backward solve runs in at least float32: with a float16 or
    bfloat16 state, y, the adjoint and the quadratures are carried in float32 (the
    model still sees x in the state's dtype). A state mixing dtypes (a pytree of
    float32 and float64 leaves) is solved in the widest; the model sees each leaf
    in its own dtype, and each leaf's gradient comes back in it. A NaN or inf from the model (or in
    x_0 or the output cotangent) makes the gradient NaN, as with `aj.DTO()`, rather
    than stall the step-size controller.

    **Second derivatives:** forward over reverse (`jax.jvp` of `jax.grad`,
    Hessian-vector products, `jax.hessian`) and reverse over reverse (`jax.grad` of
    `jax.grad`) differentiate the backward solve itself, adaptive steps included
    (forward mode re-solves it with diffrax's `DirectAdjoint`, which diffrax
    differentiates both ways): on the closed-form Gaussian they are as accurate as
    the gradient. `jax.jvp`/`jax.jacfwd` of x_0 itself is refused (it has no
    forward-mode rule; use `aj.DTO()`).

    **Export:** `jax.export` refuses its gradient: the `max_steps` check raises its
    error through a host callback (`eqx.error_if`), and exporting any function
    whose gradient goes through it (`export(jit(grad(loss)))`, or
    `Exported.vjp()`/`serialize(vjp_order=1)` of an exported forward pass) raises
    `NotImplementedError: serialization of host_callbacks is not yet implemented`.
    The forward pass alone (`vjp_order=0`) exports, as it is the sampler's. To
    export the gradient, set the environment variable `EQX_ON_ERROR=nan` before
    Equinox is imported: the check then gives a NaN gradient instead of an error,
    without a callback. Every other strategy exports (`tests/test_export.py`).

    Only deterministic (ODE) samplers; gradients with respect to the time grid or the
    schedule are not available (use `aj.DTO`).

    ??? cite "References"

        ```bibtex
        @inproceedings{pan2024adjointdpm,
            title={Adjoint{DPM}: Adjoint Sensitivity Method for Gradient
                   Backpropagation of Diffusion Probabilistic Models},
            author={Pan, Jiachun and Liew, Jun Hao and Tan, Vincent and Feng, Jiashi
                    and Yan, Hanshu},
            booktitle={International Conference on Learning Representations},
            year={2024}
        }
        @inproceedings{kidger2021hey,
            title={"Hey, that's not an ODE": Faster ODE Adjoints via Seminorms},
            author={Kidger, Patrick and Chen, Ricky T. Q. and Lyons, Terry},
            booktitle={International Conference on Machine Learning},
            year={2021}
        }
        ```
    """

    solver: diffrax.AbstractSolver = diffrax.Tsit5()
    rtol: float | None = eqx.field(default=None, static=True)
    atol: float | None = eqx.field(default=None, static=True)
    max_steps: int = eqx.field(default=4096, static=True)

    def __check_init__(self):
        msg = describe_class_error("AdjointDPM(solver)", self.solver, "diffrax.Tsit5()")
        if msg:
            raise TypeError(msg)
        if not isinstance(self.solver, diffrax.AbstractSolver):
            raise TypeError(
                "`AdjointDPM(solver=...)` needs a diffrax solver such as "
                f"`diffrax.Tsit5()`; got {type(self.solver).__name__}."
            )
        if not isinstance(self.solver, diffrax.AbstractAdaptiveSolver) or (
            self.solver.term_structure is not diffrax.AbstractTerm
        ):
            raise ValueError(
                f"`AdjointDPM(solver={type(self.solver).__name__}())` cannot solve the "
                "adjoint ODE: it needs an adaptive ODE solver (one with an error "
                "estimate, for the step-size controller), such as `diffrax.Tsit5()`, "
                "`diffrax.Dopri5()`, `diffrax.Dopri8()` or `diffrax.Heun()`."
            )
        if any(
            v is not None and (isinstance(v, bool) or not isinstance(v, int | float))
            for v in (self.rtol, self.atol)
        ):
            raise TypeError(
                f"`AdjointDPM(rtol=..., atol=...)` must be numbers or None; got "
                f"rtol={self.rtol!r}, atol={self.atol!r}."
            )
        if not all(v is None or v > 0 for v in (self.rtol, self.atol)):
            raise ValueError(
                f"`AdjointDPM` needs rtol > 0 and atol > 0; got rtol={self.rtol}, "
                f"atol={self.atol}."
            )
        if isinstance(self.max_steps, bool) or not (
            isinstance(self.max_steps, int) and self.max_steps >= 1
        ):
            raise ValueError(
                f"`AdjointDPM(max_steps=...)` must be a positive int; got "
                f"{self.max_steps!r}."
            )

    def check_sampler(self, sampler: AbstractSampler) -> None:
        refuse_nonsmooth(self, sampler)
        if sampler.is_sde:
            recorded = (
                " or `adjoint=aj.RecordedAdjoint()` (its continuous adjoint)"
                if isinstance(sampler, AbstractSDESampler) else ""
            )
            raise ValueError(
                f"`adjoint={self!r}` solves the adjoint of the probability-flow ODE "
                f"and cannot differentiate the stochastic `sampler={sampler!r}`; use "
                f"an ODE sampler, or for the SDE `adjoint=aj.DTO()` (exact){recorded}."
            )

    def forward_mode_error(self) -> str:
        return (
            f"`adjoint={self!r}` gives x_0 a custom reverse-mode rule (the adjoint "
            "ODE solved backward with diffrax), so x_0 has no forward-mode (jvp) "
            "rule; forward mode over its gradient (jax.jvp of jax.grad, "
            "jax.hessian) does work." + FORWARD_MODE_HINT
        )

    # On a grid that starts at α = 0 or ends at σ = 0 the adjoint ODE is solved over
    # the interior grid and the endpoint steps are differentiated exactly (see
    # `_endpoints.py`): ρ = σ/α is 0 or ∞ there.
    def forward(self, solve: Solve, theta, x_T, cond, noise):
        def interior(sub, theta, state0, cond, noise):
            return sub.forward(theta, None, cond, noise, state0=state0)[0], None

        return endpoint_forward(solve, theta, x_T, cond, noise, interior)

    def backward(self, solve, residuals, ct_x0, diff, x_T):
        solve, residuals, diff = as_jax_arrays((solve, residuals, diff))

        def interior(sub, residuals, g, sub_diff):
            x_end, _ = residuals
            return _adjoint_dpm_backward(self, sub, x_end, g, sub_diff, x_T)

        return endpoint_backward(solve, residuals, ct_x0, diff, x_T, interior)


AdjointDPM.__init__.__doc__ = """**Arguments:**

- `solver`: the diffrax solver of the backward (adjoint) ODE; it must be adaptive
    (have an error estimate), e.g. `diffrax.Tsit5()` (default), `diffrax.Dopri5()`,
    `diffrax.Dopri8()`.
- `rtol`, `atol`: the tolerances of its PID step-size controller. `None` (default)
    means 1e-6 when the backward solve runs in float64 (some leaf of the state is
    float64) and 1e-4 in float32 (the tightest that float32 round-off reliably lets
    the controller meet).
    In float32 do not go below about 1e-5.
- `max_steps`: the most adaptive steps per interval of the backward solve
    (default 4096).
"""


# The backward rule. Along the probability-flow ODE in (y, ρ), y' = F(y, ρ; θ, z)
# with F = ε_θ(α(ρ) y, z, t(ρ)), the loss L(x_0) = L(α_end y(ρ_end)) has the adjoint
# a(ρ) = ∂L/∂y(ρ), which satisfies a' = −aᵀ ∂F/∂y, and
#
#     ∂L/∂θ = ∫_{ρ_start}^{ρ_end} aᵀ ∂F/∂θ dρ = −∫_{ρ_end}^{ρ_start} aᵀ ∂F/∂θ dρ
#
# (the same for z). Integrating the augmented state [y, a, g_θ, g_z] from ρ_end to
# ρ_start with g' = −aᵀ ∂F/∂(θ, z), g(ρ_end) = 0 and a(ρ_end) = α_end ∂L/∂x_0 (as
# x = α y) gives g(ρ_start) = ∂L/∂(θ, z) and a(ρ_start) = ∂L/∂y_T, so
# ∂L/∂x_T = a(ρ_start)/α_start. y is re-solved backward from the sampled x_0.
# For a scheduled z, z_i acts only on (ρ_{i+1}, ρ_i): solving interval by interval
# with g_z reset to 0 on each gives ∂L/∂z_i.
def _all_finite(tree) -> jax.Array:
    leaves = jtu.tree_leaves(tree)
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in leaves]))


def _finite_or_zero(tree):
    """(tree with non-finite entries zeroed, how many there were)."""
    leaves = jtu.tree_leaves(tree)
    bad = sum((jnp.sum(~jnp.isfinite(v)) for v in leaves), jnp.array(0))
    clean = jtu.tree_map(
        lambda v: jnp.where(jnp.isfinite(v), v, jnp.zeros_like(v)), tree
    )
    return clean, bad


class _AdjointField(eqx.Module):
    """The augmented vector field of one interval,
    (y, a_y, a_θ, a_z, bad) ↦ (ε, −a_yᵀ∂ε/∂y, −a_yᵀ∂ε/∂θ, −a_yᵀ∂ε/∂z, #non-finite).

    A module rather than a closure: its arrays (the solve's grid, schedule and model
    arrays, θ's undifferentiated leaves) are pytree leaves, so diffrax's `jit` takes
    them as inputs. A closure would be a static argument of that `jit`, and JAX's
    caches would keep it, and the tracers it closes over, alive after the trace.
    """

    solve: Solve
    rest: Differentiated  # θ's undifferentiated leaves (for `theta_with`)
    x_dtypes: tuple = eqx.field(static=True)  # the state's leaf dtypes
    dtype: object = eqx.field(static=True)  # the dtype the solve is carried in

    def __call__(self, r, state, args):
        y, a, _, _, _ = state
        th_d, z_d, z_rest = args
        sch = self.solve.schedule
        t = sch.t_of_lam(-jnp.log(r))
        al = jnp.exp(sch.log_alpha(t))
        up = lambda tree: jtu.tree_map(lambda v: v.astype(self.dtype), tree)

        def f(yy, tt_d, zz_d):
            # The model sees each leaf of x in that leaf's own dtype (x_T's).
            x = lincomb((al, yy))
            leaves, treedef = jtu.tree_flatten(x)
            x = treedef.unflatten(
                [v.astype(d) for v, d in zip(leaves, self.x_dtypes)]
            )
            theta = self.rest.theta_with(tt_d)
            return up(self.solve.eps(theta, x, t, self.rest.cond_with(zz_d, z_rest)))

        out, f_vjp = jax.vjp(f, y, th_d, z_d)
        g_y, g_th, g_z = f_vjp(a)
        neg = lambda tree: jtu.tree_map(lambda v: -v.astype(self.dtype), tree)
        # A NaN/inf from the model must not stall the step-size controller (it would
        # reject every step and end in a misleading "max_steps" error): it is
        # zeroed here and counted in the last slot, and the interval's result is
        # then NaN.
        (out, g_y, g_th, g_z), bad = _finite_or_zero(
            (out, neg(g_y), neg(g_th), neg(g_z))
        )
        return out, g_y, g_th, g_z, bad.astype(self.dtype)


def _seminorm(err):
    # Step-size control on (y, a_y) only (see `_adjoint_dpm_backward`). A module-level
    # function, so that every trace hands diffrax the same static controller.
    return optx.rms_norm(err[:2])


class _PlainLoop(diffrax.RecursiveCheckpointAdjoint):
    """diffrax's loop as two plain `lax.while_loop`s, for a solve that is never
    differentiated in reverse (its forward-mode rule is `DirectAdjoint`'s, below).
    `RecursiveCheckpointAdjoint`'s checkpointed loop, a plain loop at run time too,
    allocates its checkpoint buffers with `jnp.zeros` at trace time: replicated under
    explicit mesh axes and not varying inside `shard_map`, so a sharded state cannot
    be written into them (a carry type error)."""

    def loop(self, *, terms, saveat, init_state, max_steps, throw,
             passed_solver_state, passed_controller_state, **kwargs):
        del throw, passed_solver_state, passed_controller_state
        return self._loop(
            terms=terms, saveat=saveat, init_state=init_state, max_steps=max_steps,
            inner_while_loop=functools.partial(_DIFFRAX_INNER, kind="lax"),
            outer_while_loop=functools.partial(_DIFFRAX_OUTER, kind="lax"),
            **kwargs,
        )


# diffrax's loop helpers are private; without them (another diffrax version) its
# public checkpointed adjoint does the same work (not under sharding).
_DIFFRAX_INNER = getattr(diffrax._adjoint, "_inner_loop", None)
_DIFFRAX_OUTER = getattr(diffrax._adjoint, "_outer_loop", None)
_UNDIFFERENTIATED = (
    _PlainLoop() if _DIFFRAX_INNER and _DIFFRAX_OUTER
    else diffrax.RecursiveCheckpointAdjoint()
)


def _diffeqsolve(y0, field, r0, r1, args, **kwargs):
    """One interval's diffrax solve. Under explicit mesh axes it runs with the axes
    auto (`jax.sharding.auto_axes`): diffrax allocates loop buffers with `jnp.zeros`,
    replicated in the type system, which a sharded state cannot be written into; the
    results get y0's shardings back."""
    varying = _varying_axes(y0)
    if varying:
        raise TypeError(
            "`adjoint=aj.AdjointDPM(...)` cannot run inside `jax.shard_map` with its "
            f"varying-axes check: its backward solve (diffrax) allocates loop buffers "
            f"that do not vary over the manual axes {sorted(varying)}, so "
            "JAX refuses the loop. Pass `check_vma=False` to `jax.shard_map` (each "
            "shard then controls its own step sizes), or shard with `jax.jit` and "
            "`NamedSharding` inputs instead (one step-size control for the batch)."
        )
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.explicit_axes:
        return _diffeqsolve_auto(y0, field, r0, r1, args, **kwargs)
    if isinstance(field.solve.model.static, ClosureConverted):
        raise ValueError(
            "`adjoint=aj.AdjointDPM(...)` under explicit mesh axes cannot call a "
            "model that closes over arrays: its backward solve runs with the axes "
            "auto (`jax.sharding.auto_axes`), and the model's traced form holds the "
            "explicit shardings. Pass those arrays to the model through `params` "
            "(or `cond`), or use auto mesh axes "
            "(`jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * n)`)."
        )
    dynamic, static = eqx.partition((y0, field, r0, r1, args), eqx.is_array)
    specs = jtu.tree_map(lambda v: jax.typeof(v).sharding.spec, y0)
    run = lambda d: _diffeqsolve_auto(*eqx.combine(d, static), **kwargs)
    return jax.sharding.auto_axes(run, out_sharding=(specs, P()))(dynamic)


def _varying_axes(tree) -> set:
    """The manual mesh axes (inside `shard_map`) any leaf of `tree` varies over."""
    axes = set()
    for v in jtu.tree_leaves(tree):
        aval = jax.typeof(v)
        manual = getattr(aval, "manual_axis_type", None)
        axes |= set(getattr(manual, "varying", None) or getattr(aval, "vma", ()) or ())
    return axes


def _diffeqsolve_auto(y0, field, r0, r1, args, *, solver, controller, max_steps,
                      direct):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        solver,
        t0=r0,
        t1=r1,
        dt0=None,
        y0=y0,
        args=args,
        stepsize_controller=controller,
        max_steps=max_steps,
        throw=False,
        adjoint=diffrax.DirectAdjoint() if direct else _UNDIFFERENTIATED,
    )
    ys = jtu.tree_map(lambda v: v[0], sol.ys)
    return ys, sol.result == diffrax.RESULTS.successful


# One interval's backward solve u ↦ Φ(u), u = (y_0, the field's arrays, ρ_0, ρ_1, θ, z).
# Undifferentiated (the backward pass of a first-order gradient) it runs diffrax's
# `RecursiveCheckpointAdjoint` loop, a plain while loop at run time. That adjoint is
# a custom VJP, which JAX cannot differentiate in forward mode, so Φ is given a
# custom JVP: Φ̇ = ∂Φ/∂u · u̇ is `jax.jvp` of the *same* discrete solve (same solver,
# controller and steps, so the same primal to round-off) run with `DirectAdjoint`,
# which diffrax differentiates in both modes: the tangent of the discretised solve,
# adaptive step sizes included. Forward over reverse (jvp-of-grad, `jax.hessian`)
# evaluates this rule; reverse over reverse (grad-of-grad) linearises and transposes
# it, i.e. differentiates the `DirectAdjoint` solve in reverse, which JAX supports
# too.
@eqx.filter_custom_jvp
def _solve_interval(y0, field, r0, r1, args, *, solver, controller, max_steps):
    return _diffeqsolve(
        y0, field, r0, r1, args, solver=solver, controller=controller,
        max_steps=max_steps, direct=False,
    )


@_solve_interval.def_jvp
def _solve_interval_jvp(primals, tangents, **kwargs):
    leaves, treedef = jtu.tree_flatten(primals)
    t_leaves = treedef.flatten_up_to(tangents)
    idx = [i for i, t in enumerate(t_leaves) if t is not None]

    def fn(*dynamic):
        full = list(leaves)
        for i, v in zip(idx, dynamic):
            full[i] = v
        return _diffeqsolve(*treedef.unflatten(full), **kwargs, direct=True)

    out, t_out = jax.jvp(fn, [leaves[i] for i in idx], [t_leaves[i] for i in idx])
    return out, (t_out[0], None)


def _adjoint_dpm_backward(
    adjoint: AdjointDPM, solve: Solve, x0, g, diff: Differentiated, x_T
):
    sch, ts = solve.schedule, solve.ts
    x_dtypes = tuple(v.dtype for v in jtu.tree_leaves(x_T))
    # The backward solve runs in at least float32 (see the class docstring), and in
    # one dtype: diffrax promotes every leaf of the state to the time's dtype, so a
    # state mixing float32 and float64 leaves is solved in float64 (the model still
    # sees each leaf in its own dtype).
    dtype = max((accumulator_dtype(d) for d in x_dtypes), key=lambda d: d.itemsize)
    theta_d = diff.theta

    rho = lambda t: jnp.exp(-sch.lam(t)).astype(dtype)
    alpha = lambda t: jnp.exp(sch.log_alpha(t))

    field = _AdjointField(
        solve, Differentiated(None, diff.theta_rest, None, None, None, None),
        x_dtypes, dtype,
    )
    # Step-size control on (y, a_y) only, a seminorm (Kidger et al. 2021): a_θ and a_z
    # are quadratures along them. Cheaper, and the steps (so ∂L/∂x_T) do not depend
    # on which arguments are differentiated.
    default_tol = 1e-6 if jnp.finfo(dtype).bits >= 64 else 1e-4
    rtol = default_tol if adjoint.rtol is None else adjoint.rtol
    atol = default_tol if adjoint.atol is None else adjoint.atol
    controller = diffrax.PIDController(rtol=rtol, atol=atol, norm=_seminorm)
    msg = (
        f"`adjoint={adjoint!r}`: the backward solve of an interval needed more than "
        f"max_steps={adjoint.max_steps} steps. Raise `max_steps`, or loosen "
        "`rtol`/`atol` (in float32 no tighter than about 1e-4)."
    )

    def solve_interval(state, r0, r1, args):
        finite_in = _all_finite(state)
        state, _ = _finite_or_zero(state)
        out, ok = _solve_interval(
            state + (jnp.zeros((), dtype),), field, r0, r1, args,
            solver=adjoint.solver, controller=controller, max_steps=adjoint.max_steps,
        )
        nan = ~finite_in | (out[-1] > 0)
        # The check rides on a scalar that joins `nan`: `eqx.error_if` on the state
        # itself would route the whole (sharded) state through the branch holding
        # its host callback, which XLA places on one device (a full gather per
        # interval under sharding). (With EQX_ON_ERROR=nan the flag is NaN, so the
        # result is NaN, as before.)
        flag = eqx.error_if(jnp.zeros((), out[-1].dtype), ~ok & ~nan, msg)
        nan = nan | (flag != 0)
        return jtu.tree_map(lambda v: jnp.where(nan, jnp.nan, v), out[:-1])

    to = lambda tree: jtu.tree_map(lambda v: v.astype(dtype), tree)
    a_end = alpha(ts[-1])
    y = to(lincomb((1.0 / a_end, x0)))
    a = to(lincomb((a_end, g)))

    # One diffeqsolve per forward step, constant conditioning included: a scheduled
    # z_i acts on its own interval only, and with constant z the computation is the
    # same (same steps; a_z restarts from 0 on each interval and is summed), so the
    # two agree to round-off. Each interval restarts the step-size controller. The
    # quadratures a_θ, a_z are integrated in the solve's dtype (diffrax needs one
    # dtype; parameters may be stored in another; the engine casts them back).
    zeros = lambda tree: jtu.tree_map(lambda v: jnp.zeros(v.shape, dtype), tree)

    def body(carry, xs):
        y_, a_, g_theta_, g_sum = carry
        t, s, i, zero = xs
        z_d, z_rest = diff.cond_at(solve, i), diff.cond_rest_at(solve, i)

        def one(c, ts_):
            out = solve_interval(
                (*c, zeros(z_d)), rho(ts_[1]), rho(ts_[0]), (theta_d, z_d, z_rest)
            )
            return out[:3], out[3]

        # A zero-length step (a padded grid) is the identity: see `zero_length_steps`.
        if solve.zero_steps:
            (y_, a_, g_theta_), g_z = skip_body_if_zero(
                zero, one, (y_, a_, g_theta_), (t, s)
            )
        else:
            (y_, a_, g_theta_), g_z = one((y_, a_, g_theta_), (t, s))
        if solve.scheduled:
            return (y_, a_, g_theta_, None), g_z
        return (y_, a_, g_theta_, tree_acc(g_sum, g_z)), None

    g_sum0 = None if solve.scheduled else acc_zeros(diff.cond)
    t_safe, s_safe, zero = zero_length_steps(ts)
    xs = (t_safe, s_safe, jnp.arange(solve.num_steps, dtype=jnp.int32), zero)
    (_, a, g_theta, g_sum), g_z = jax.lax.scan(
        body, (y, a, zeros(theta_d), g_sum0), xs, reverse=True
    )
    g_x_T = lincomb((1.0 / alpha(ts[0]), a))
    return g_theta, g_x_T, g_z if solve.scheduled else g_sum, None
