"""The README's quick example runs exactly as written and gives finite gradients of
the inputs' shapes."""

import os
import re

import jax
import numpy as np


README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_quick_example_runs_as_written():
    text = open(README, encoding="utf-8").read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    for grad, arg in ((namespace["g_xT"], namespace["x_T"]),
                      (namespace["g_cond"], namespace["cond"])):
        assert grad.shape == arg.shape and np.all(np.isfinite(grad))
    leaves = jax.tree_util.tree_leaves(namespace["g_params"])
    assert leaves and all(np.all(np.isfinite(v)) for v in leaves)
    assert float(np.linalg.norm(namespace["g_xT"])) > 0
