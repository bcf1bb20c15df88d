import numpy as np

from ensemblekit.merge.methods.slerp import slerp


def test_endpoints_and_unit_norm_midpoint():
    v0, v1 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    np.testing.assert_allclose(slerp(v0, v1, 0.0), v0, atol=1e-12)
    np.testing.assert_allclose(slerp(v0, v1, 1.0), v1, atol=1e-12)
    assert abs(np.linalg.norm(slerp(v0, v1, 0.3)) - 1.0) < 1e-12


def test_colinear_falls_back_to_lerp():
    v = np.array([1.0, 2.0])
    np.testing.assert_allclose(slerp(v, 2 * v, 0.5), 1.5 * v)
