import numpy as np

from ensemblekit.merge.methods.linear import Linear


def test_weighted_average_and_unnormalized_sum():
    a, b = np.array([1.0, 2.0]), np.array([3.0, 6.0])
    method = Linear()
    np.testing.assert_allclose(method.merge_tensor([a, b], None, np.array([1.0, 3.0]), "w"), [2.5, 5.0])
    np.testing.assert_allclose(
        method.merge_tensor([a, b], None, np.array([1.0, 1.0]), "w", normalize=False), [4.0, 8.0]
    )
