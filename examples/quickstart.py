"""The README's quick example: gradients of a loss on the generated sample with
respect to the initial noise, the conditioning and the weights, two ways."""

import jax
import jax.numpy as jnp

import adjoint_jax as aj
from adjoint_jax.bench import MLPProblem

problem = MLPProblem.make(jax.random.key(0), dim=4, cond_dim=2)  # a small ε-network
schedule = aj.VPLinear()
ts = aj.time_grid(schedule, num_steps=20, t_end=1e-3, spacing="logsnr")
x_T, cond = jax.random.normal(jax.random.key(1), (8, 4)), jnp.array([0.5, -0.5])

@jax.jit
def grads(params, x_T, cond):
    def loss(p, x, c):
        x0 = aj.sample(problem.model, p, x, c, schedule=schedule, ts=ts,
                       sampler=aj.DPMSolver2(), adjoint=aj.DTO())
        return jnp.mean((x0 - 1.0) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))(params, x_T, cond)

g_params, g_xT, g_cond = grads(problem.params, x_T, cond)
print("dL/dx_T norm:", float(jnp.linalg.norm(g_xT)), " dL/dcond:", g_cond)
