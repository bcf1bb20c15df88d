import numpy as np

from ensemblekit.merge.methods.task_arithmetic import TaskArithmetic


def test_base_plus_scaled_sum_of_task_vectors():
    base = np.array([1.0, 1.0])
    members = [np.array([2.0, 1.0]), np.array([1.0, 3.0])]
    out = TaskArithmetic().merge_tensor(members, base, np.array([1.0, 1.0]), "w", lambda_=0.5)
    np.testing.assert_allclose(out, [1.5, 2.0])


def test_negative_weight_subtracts_a_task():
    base, member = np.zeros(2), np.array([1.0, -2.0])
    out = TaskArithmetic().merge_tensor([member], base, np.array([-1.0]), "w")
    np.testing.assert_allclose(out, [-1.0, 2.0])
