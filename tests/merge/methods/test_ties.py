import numpy as np

from ensemblekit.merge.methods.ties import Ties, trim


def test_trim_keeps_top_magnitudes_per_member():
    vectors = np.array([[0.1, -3.0, 2.0, 0.5], [1.0, 0.0, -0.2, 0.3]])
    np.testing.assert_array_equal(trim(vectors, 0.5), [[0, -3.0, 2.0, 0], [1.0, 0, 0, 0.3]])


def test_sign_election_and_disjoint_mean():
    base = np.zeros(3)
    members = [np.array([1.0, -2.0, 4.0]), np.array([3.0, 1.0, -1.0]), np.array([0.0, -1.0, 2.0])]
    out = Ties().merge_tensor(members, base, np.ones(3), "w", density=1.0)
    # entry 0: both nonzero positive -> mean(1, 3); entry 1: sum -2 -> negatives mean(-2, -1);
    # entry 2: sum +5 -> positives mean(4, 2)
    np.testing.assert_allclose(out, [2.0, -1.5, 3.0])
