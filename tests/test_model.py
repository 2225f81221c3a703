"""`aj.as_eps` recovers ε from x0-, v- and flow-velocity-prediction networks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adjoint_jax as aj
from adjoint_jax.bench import GaussianProblem

from .helpers import rel_err, sample_kwargs


@pytest.mark.parametrize("schedule", [aj.VPLinear(), aj.VPCosine(), aj.FlowMatching()],
                         ids=lambda s: type(s).__name__)
def test_as_eps_roundtrip(schedule):
    pb = GaussianProblem.make(4, schedule=schedule)
    x = jnp.array([0.3, -1.2, 2.0, 0.7])
    t = jnp.asarray(0.37)
    a, s = schedule.alpha(t), schedule.sigma(t)
    da = jax.grad(schedule.alpha)(t)
    ds = jax.grad(schedule.sigma)(t)

    def x0_model(p, xx, tt, c):
        e = pb.model(p, xx, tt, c)
        return (xx - schedule.sigma(tt) * e) / schedule.alpha(tt)

    def v_model(p, xx, tt, c):
        e = pb.model(p, xx, tt, c)
        x0 = (xx - schedule.sigma(tt) * e) / schedule.alpha(tt)
        return schedule.alpha(tt) * e - schedule.sigma(tt) * x0

    def flow_model(p, xx, tt, c):
        e = pb.model(p, xx, tt, c)
        x0 = (xx - schedule.sigma(tt) * e) / schedule.alpha(tt)
        return da * x0 + ds * e  # valid at this t only: the test evaluates there

    eps = pb.model(pb.params, x, t, None)
    for pred, m in [("x0", x0_model), ("v", v_model), ("flow", flow_model),
                    ("eps", pb.model)]:
        got = aj.as_eps(m, schedule, pred)(pb.params, x, t, None)
        np.testing.assert_allclose(got, eps, rtol=1e-10, err_msg=pred)
    assert a > 0 and s > 0


def test_as_eps_samples_like_eps_model():
    sch = aj.VPLinear()
    pb = GaussianProblem.make(4, schedule=sch)

    def v_model(p, xx, tt, c):
        e = pb.model(p, xx, tt, c)
        x0 = (xx - sch.sigma(tt) * e) / sch.alpha(tt)
        return sch.alpha(tt) * e - sch.sigma(tt) * x0

    kw = sample_kwargs(sch, 10, aj.DPMSolver2(), aj.AdjointDEIS())
    x_T = jnp.ones(4)
    a = aj.sample(pb.model, pb.params, x_T, None, **kw)
    b = aj.sample(aj.as_eps(v_model, sch, "v"), pb.params, x_T, None, **kw)
    assert rel_err(a, b) < 1e-12
    ga = jax.grad(lambda p: jnp.sum(aj.sample(pb.model, p, x_T, None, **kw)))(pb.params)
    gb = jax.grad(lambda p: jnp.sum(aj.sample(aj.as_eps(v_model, sch, "v"), p, x_T,
                                              None, **kw)))(pb.params)
    assert rel_err(gb["s"], ga["s"]) < 1e-10


def test_flow_matching_sampling_converges():
    sch = aj.FlowMatching()
    pb = GaussianProblem.make(4, schedule=sch)
    x_T = jnp.array([0.3, -1.2, 2.0, 0.7])
    exact = pb.flow_map(pb.params, x_T, None, sch.t_max, 1e-3)
    errs = []
    for n in [20, 40, 80]:
        kw = sample_kwargs(sch, n, aj.DPMSolver2(), aj.DTO())
        errs.append(rel_err(aj.sample(pb.model, pb.params, x_T, None, **kw), exact))
    assert errs[2] < errs[0] / 10, errs


def test_as_eps_errors():
    with pytest.raises(ValueError, match="`prediction` must be one of"):
        aj.as_eps(lambda *a: None, aj.VPLinear(), "score")
    with pytest.raises(TypeError, match="schedule"):
        aj.as_eps(lambda *a: None, "vp", "v")
