import numpy as np

from ensemblekit.merge.methods.dare import Dare, DareTies, drop_and_rescale


def test_drop_and_rescale_keeps_expected_value():
    vectors = np.ones((1, 200_000))
    dropped = drop_and_rescale(vectors, 0.3, np.random.default_rng(0))
    kept = np.count_nonzero(dropped) / dropped.size
    assert abs(kept - 0.3) < 0.01
    assert abs(dropped.mean() - 1.0) < 0.02
    assert set(np.unique(dropped)) <= {0.0, 1.0 / 0.3}


def test_same_seed_same_merge_other_seed_differs():
    rng = np.random.default_rng(1)
    base, members = np.zeros(100), [rng.normal(size=100) for _ in range(2)]
    w = np.ones(2)
    one = Dare().merge_tensor(members, base, w, "d/kernel", density=0.5, seed=3)
    np.testing.assert_array_equal(one, Dare().merge_tensor(members, base, w, "d/kernel", density=0.5, seed=3))
    assert not np.array_equal(one, Dare().merge_tensor(members, base, w, "d/kernel", density=0.5, seed=4))


def test_dare_ties_defaults_to_sign_consensus():
    assert DareTies().check_params({})["sign_consensus"] is True
    assert Dare().check_params({})["sign_consensus"] is False
