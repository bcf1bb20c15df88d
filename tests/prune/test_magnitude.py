"""ensemblekit.prune.magnitude: masks, schedules, the fit callback, strip, N:M."""

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit.prune import (
    ConstantSparsity,
    PolynomialDecay,
    PruningCallback,
    magnitude,
    strip,
)
from ensemblekit.prune.magnitude import magnitude_masks, nm_mask, sparsity_of
from ensemblekit.prune.report import zipped_size
from tests.conftest import make_mlp
from tests.prune.conftest import accuracy, fine_tune, make_residual_cnn


def kernel(model, name):
    return model.get_layer(name).get_weights()[0]


def test_masks_zero_exactly_the_smallest_fraction_per_layer_and_globally():
    small = np.array([5.0, 6.0, 7.0, 8.0])
    large = np.arange(1, 13, dtype="float64") * 0.1
    per_layer = magnitude_masks([small, large], 0.5, scope="layer")
    assert per_layer[0].tolist() == [0, 0, 1, 1]
    assert per_layer[1].sum() == 6 and per_layer[1][6:].all()
    global_masks = magnitude_masks([small, large], 0.5, scope="global")
    assert global_masks[0].all()  # the large-valued array survives a global threshold
    assert global_masks[1].sum() == 4 and global_masks[1][-4:].all()


def test_magnitude_returns_pruned_copy_and_leaves_biases_norms_and_original_alone():
    model = make_residual_cnn(seed=0, width=8)
    before = [w.copy() for w in model.get_weights()]
    pruned = magnitude(model, sparsity=0.6, scope="layer")
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    for name in ("conv_a", "conv_b", "conv_c", "hidden", "logits"):
        w = kernel(pruned, name)
        assert np.sum(w == 0) == int(np.floor(0.6 * w.size)), name
        assert np.array_equal(pruned.get_layer(name).get_weights()[1], model.get_layer(name).get_weights()[1])
    for name in ("bn_a", "bn_b"):
        for got, want in zip(pruned.get_layer(name).get_weights(), model.get_layer(name).get_weights(), strict=True):
            assert np.array_equal(got, want)
    assert sparsity_of(pruned) == pytest.approx(0.6, abs=0.01)


def _fit(model, x, y, callbacks, epochs=2):
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, callbacks=callbacks)


def test_callback_keeps_pruned_weights_exactly_zero_through_fit(toy_data):
    x, y = toy_data
    pruned = magnitude(make_mlp(0, softmax=True), sparsity=0.7)
    zeros = kernel(pruned, "hidden") == 0
    start = kernel(pruned, "hidden").copy()
    _fit(pruned, x, y, [PruningCallback()])
    after = kernel(pruned, "hidden")
    assert np.all(after[zeros] == 0)
    assert not np.allclose(after[~zeros], start[~zeros])  # the kept weights did train


def test_without_callback_training_revives_pruned_weights(toy_data):
    x, y = toy_data
    pruned = magnitude(make_mlp(0, softmax=True), sparsity=0.7)
    zeros = kernel(pruned, "hidden") == 0
    _fit(pruned, x, y, [])
    assert np.mean(kernel(pruned, "hidden")[zeros] != 0) > 0.5


def test_schedules_follow_polynomial_decay_and_constant_sparsity():
    schedule = PolynomialDecay(0.2, 0.8, begin_step=10, end_step=110, power=3, frequency=25)
    assert schedule(5) == (False, 0.0)
    assert schedule(10) == (True, pytest.approx(0.2))
    assert schedule(60)[1] == pytest.approx(0.8 + (0.2 - 0.8) * 0.5 ** 3)
    assert [schedule.prune_now(s) for s in (11, 35, 60, 110, 111, 135)] == [False, True, True, True, False, False]
    assert schedule(500)[1] == pytest.approx(0.8)
    constant = ConstantSparsity(0.5, begin_step=3, frequency=2)
    assert [constant(s) for s in (2, 3, 4, 5)] == [(False, 0.0), (True, 0.5), (False, 0.5), (True, 0.5)]


def test_callback_with_schedule_reaches_final_sparsity_and_counts_steps(toy_data):
    x, y = toy_data
    schedule = PolynomialDecay(0.0, 0.9, begin_step=0, end_step=20, frequency=5)
    pruned = magnitude(make_mlp(0, softmax=True), schedule=schedule)
    assert sparsity_of(pruned) == 0.0  # masks start empty with a schedule
    _fit(pruned, x, y, [PruningCallback()], epochs=2)  # 26 steps
    assert pruned.pruning_state_.step == 26
    assert sparsity_of(pruned) == pytest.approx(0.9, abs=0.01)


def test_strip_gives_a_plain_model_that_round_trips_through_keras_file(tmp_path):
    model = ek.ensemble([make_mlp(0), make_mlp(1)])
    pruned = magnitude(model, sparsity=0.5)
    stripped = strip(pruned)
    assert not hasattr(stripped, "pruning_state_")
    path = tmp_path / "stripped.keras"
    stripped.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6)
    assert sparsity_of(loaded) == pytest.approx(0.5, abs=0.01)
    plain = magnitude(make_mlp(2), 0.5)
    assert all(type(layer).__module__.startswith("keras.") for layer in strip(plain).layers)


def test_n_m_keeps_n_of_every_m_along_the_input_axis():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, name="d"), keras.layers.Dense(4, name="o")])
    pruned = magnitude(model, n_m=(2, 4))
    for name in ("d", "o"):
        nonzero = kernel(pruned, name) != 0
        groups = nonzero.reshape(-1, 4, nonzero.shape[-1]).sum(axis=1)
        assert np.all(groups == 2), name
    assert nm_mask(np.array([[1.0], [-4.0], [3.0], [0.5]]), (1, 4)).ravel().tolist() == [0, 1, 0, 0]


def test_n_m_error_names_layer_and_shape_when_m_does_not_divide():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="d6")])
    with pytest.raises(ValueError, match=r"'d6'.*\(6, 4\)"):
        magnitude(model, n_m=(2, 4))


def test_layers_selects_by_name_and_type_and_rejects_unknown_names():
    model = make_mlp(0)
    only_hidden = magnitude(model, 0.5, layers=["hidden"])
    assert np.mean(kernel(only_hidden, "hidden") == 0) == 0.5
    assert np.all(kernel(only_hidden, "out") != 0)
    by_type = magnitude(model, 0.5, layers=[keras.layers.Dense], scope="layer")
    assert np.mean(kernel(by_type, "out") == 0) == 0.5
    with pytest.raises(ValueError, match="no layer 'nope'"):
        magnitude(model, 0.5, layers=["nope"])


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_sparsity_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        magnitude(make_mlp(0), sparsity=bad)


def test_other_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="Unknown scope"):
        magnitude(make_mlp(0), scope="model")
    with pytest.raises(ValueError, match="0 < N < M"):
        magnitude(make_mlp(0), n_m=(4, 4))
    with pytest.raises(ValueError, match="end_step > begin_step"):
        PolynomialDecay(0.0, 0.5, begin_step=10, end_step=10)
    with pytest.raises(ValueError, match="holds no pruning masks"):
        model = make_mlp(0)
        model.compile("sgd", "mse")
        model.fit(np.zeros((4, 8)), np.zeros((4, 3)), verbose=0, callbacks=[PruningCallback()])


@pytest.mark.slow
def test_mnist1d_cnn_80_percent_sparse_fine_tuned_loses_at_most_one_point(trained_cnn):
    model, (x, y), (xt, yt) = trained_cnn
    base = accuracy(model, xt, yt)
    steps_per_epoch = int(np.ceil(len(x) / 64))
    schedule = PolynomialDecay(0.5, 0.8, begin_step=0, end_step=2 * steps_per_epoch, frequency=steps_per_epoch // 3)
    pruned = fine_tune(magnitude(model, schedule=schedule), x, y, epochs=5, learning_rate=1e-3,
                       callbacks=[PruningCallback()])
    stripped = strip(pruned)
    assert sparsity_of(stripped) == pytest.approx(0.8, abs=0.005)
    assert accuracy(stripped, xt, yt) >= base - 0.01
    assert zipped_size(model) >= 3 * zipped_size(stripped)
