"""The README's parity table: runs `tests/test_diffusers_parity.py` (the real
diffusers 0.42.1 in float64 against adjoint_jax on an analytic model) and prints,
for each check, the largest absolute difference seen.

    pip install -e ".[test]" && python benchmarks/diffusers_parity.py
"""

import os
import sys

import pytest


ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main() -> int:
    sys.path.insert(0, ROOT)
    rc = pytest.main(
        ["-q", "-p", "no:xdist", "-p", "no:cacheprovider",
         os.path.join(ROOT, "tests", "test_diffusers_parity.py")]
    )
    from tests.test_diffusers_parity import MAX_DIFF

    print("\n| check | max abs. difference |\n| --- | --- |")
    for check, diff in MAX_DIFF.items():
        print(f"| {check} | {diff:.1e} |")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
