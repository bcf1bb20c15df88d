import pytest

from ensemblekit.merge.methods.registry import METHODS, get_method


def test_all_methods_registered():
    assert {"linear", "task_arithmetic", "ties", "dare", "dare_ties", "slerp", "greedy_soup"} <= set(METHODS)
    assert get_method("slerp").n_models == 2


def test_unknown_method_lists_choices():
    with pytest.raises(ValueError, match="Unknown merge method 'soup'.*'linear'"):
        get_method("soup")
