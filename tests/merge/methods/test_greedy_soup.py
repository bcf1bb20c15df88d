import keras
import numpy as np
import pytest

from ensemblekit.merge import merge
from tests.conftest import make_mlp


def _trained(seed, x, y, epochs, start=None):
    model = make_mlp(seed)
    if start is not None:
        model.set_weights(start.get_weights())
    model.compile(keras.optimizers.Adam(0.02), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras.utils.set_random_seed(seed)
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def test_greedy_soup_not_worse_than_best_member_on_validation(toy_data):
    x, y = toy_data
    base = _trained(0, x, y, 2)
    members = [_trained(s, x, y, 3, start=base) for s in range(1, 4)] + [make_mlp(9)]  # one untrained
    merged, report = merge(members, "greedy_soup", x_val=x, y_val=y, return_report=True)
    acc = lambda m: np.mean(m.predict(x, verbose=0).argmax(1) == y)  # noqa: E731
    assert acc(merged) >= max(acc(m) for m in members)
    assert 3 not in report.ingredients  # the untrained member is never added
    assert report.method == "greedy_soup" and not report.streamed
    assert not hasattr(merged, "merge_ingredients_")


def test_greedy_soup_needs_validation_data():
    with pytest.raises(ValueError, match="needs x_val="):
        merge([make_mlp(0), make_mlp(1)], "greedy_soup")
