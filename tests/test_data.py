"""The one data path: every kind of data Keras reads gives the array path's result, in one pass."""

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit._data import batches, check_reiterable, collect

TF = keras.backend.backend() == "tensorflow"
RNG = np.random.default_rng(0)
X = RNG.normal(size=(50, 4)).astype("float32")
Y = RNG.integers(0, 3, size=50)
W = RNG.uniform(0.5, 2.0, size=50).astype("float32")


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])


class Batches(keras.utils.PyDataset):
    def __init__(self, endless=False):
        super().__init__()
        self.endless = endless

    @property
    def num_batches(self):
        return None if self.endless else 4

    def __getitem__(self, index):
        rows = slice(16 * index, min(16 * index + 16, 50))
        return X[rows], Y[rows]


def generator():
    for start in range(0, 50, 16):
        yield X[start:start + 16], Y[start:start + 16]


def datasets():
    kinds = {
        "arrays": (X, Y),
        "pydataset": (Batches(), None),
        "generator": (generator(), None),
        "factory": (generator, None),
    }
    if TF:
        import tensorflow as tf

        kinds["tf.data"] = (tf.data.Dataset.from_tensor_slices((X, Y)).batch(16), None)
    return kinds


@pytest.mark.parametrize("kind", list(datasets()))
def test_every_kind_of_data_gives_the_array_predictions_and_labels(model, kind):
    x, y = datasets()[kind]
    got = collect([model], x, y, function="test", needs_labels=True)
    np.testing.assert_allclose(got.outputs[0], model.predict(X, verbose=0), atol=1e-6)
    np.testing.assert_array_equal(got.y, Y)
    assert got.rows == 50


@pytest.mark.skipif(not TF, reason="tf.data needs TensorFlow")
def test_a_reshuffling_dataset_keeps_labels_aligned_with_predictions(model):
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(50, reshuffle_each_iteration=True).batch(7)
    got = collect([model, model], data, function="test")
    order = np.argsort([np.flatnonzero((X == row).all(1))[0] for row in _inputs(data, got.rows)])
    assert got.outputs[0].shape == (50, 3)
    # Each collected prediction belongs to the label collected beside it: compare with the sorted arrays.
    reference = model.predict(X, verbose=0)
    matches = [np.flatnonzero(np.isclose(reference, row, atol=1e-6).all(1)) for row in got.outputs[0]]
    assert all(Y[m[0]] == label for m, label in zip(matches, got.y, strict=True) if len(m) == 1)
    assert len(order) == 50


def _inputs(data, rows):
    return np.concatenate([np.asarray(x) for x, _ in data])[:rows]


def test_sample_weights_come_from_arrays_or_from_the_dataset(model):
    got = collect([model], X, Y, W, function="test")
    np.testing.assert_allclose(got.sample_weight, W)

    def weighted():
        for start in range(0, 50, 16):
            yield X[start:start + 16], Y[start:start + 16], W[start:start + 16]

    np.testing.assert_allclose(collect([model], weighted, function="test").sample_weight, W)


def test_several_inputs_as_a_dict_and_as_a_list():
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    two = keras.Model({"a": a, "b": b}, keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    xa, xb = X[:, :2], RNG.normal(size=(50, 3)).astype("float32")
    expected = two.predict({"a": xa, "b": xb}, verbose=0)
    np.testing.assert_allclose(ek.predict(two, {"a": xa, "b": xb}), expected, atol=1e-6)
    listed = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    np.testing.assert_allclose(ek.predict(listed, [xa, xb]), listed.predict([xa, xb], verbose=0), atol=1e-6)


def test_the_last_partial_batch_is_padded_not_retraced(model):
    got = ek.predict(model, X, batch_size=16)
    assert got.shape == (50, 3)
    np.testing.assert_allclose(got, model.predict(X, verbose=0), atol=1e-6)


@pytest.mark.parametrize("call,message", [
    (lambda m: collect([m], X, Y[:-1], function="f"), r"f: y has 49 rows but x has 50"),
    (lambda m: collect([m], generator(), Y, function="f"), r"f: y= was given, but x is a generator"),
    (lambda m: collect([m], X, function="f", needs_labels=True), r"f: x yields no labels"),
    (lambda m: collect([m], Batches(endless=True), function="f"), r"endless keras.utils.PyDataset.*steps="),
    (lambda m: collect([m], X[:, :3], function="f"), r"f: x does not fit model .*\(50, 3\)|f: x does not fit"),
    (lambda m: collect([m], X, Y, sample_weight=W[:3], function="f"), r"sample_weight has shape \(3,\)"),
    (lambda m: collect([m], (b for b in []), function="f"), r"f: x"),
    (lambda m: collect([m], steps=0, x=X, function="f"), r"steps must be a positive integer"),
])
def test_bad_data_gets_one_clear_error(model, call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(model)


@pytest.mark.skipif(not TF, reason="tf.data needs TensorFlow")
def test_an_endless_tf_dataset_needs_steps_and_then_stops(model):
    import tensorflow as tf

    endless = tf.data.Dataset.from_tensor_slices((X, Y)).batch(10).repeat()
    with pytest.raises(ValueError, match=r"endless tf.data.Dataset.*steps="):
        collect([model], endless, function="f")
    assert collect([model], endless, steps=7, function="f").rows == 70


def test_one_shot_generators_are_refused_where_data_is_read_twice():
    check_reiterable(X, "stack")
    check_reiterable(generator, "stack")
    with pytest.raises(ValueError, match=r"stack: x is a one-shot Python generator"):
        check_reiterable(generator(), "stack")


def test_rows_with_non_finite_inputs_are_kept_aside(model):
    x = X.copy()
    x[[3, 40]] = np.nan
    got = collect([model], x, batch_size=16, function="f")
    assert got.suspect_rows.tolist() == [3, 40]
    assert np.isnan(got.inputs_at([3, 40])).all()
    with pytest.raises(ValueError, match="were not kept"):
        got.inputs_at([4])


def test_batches_yields_numpy(model):
    shapes = [xb.shape for xb, _, _ in batches(X, batch_size=20)]
    assert shapes == [(20, 4), (20, 4), (10, 4)]


# --- every function that reads data: any kind gives the array path's result ----------------------


@pytest.fixture(scope="module")
def members():
    result = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        result.append(keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                        keras.layers.Dense(3, activation="softmax")], name=f"m{seed}"))
    return result


FUNCTIONS = {
    "evaluate": lambda ms, x, y: ek.evaluate(ek.ensemble(ms, "mean"), x, y),
    "calibrate": lambda ms, x, y: ek.calibrate(ek.ensemble(ms, "mean"), x, y).layers[-1].temperature,
    "optimize_weights": lambda ms, x, y: ek.optimize_weights(ms, x, y),
    "select": lambda ms, x, y: ek.select(ms, x, y, size=4),
    "stack": lambda ms, x, y: ek.stack(ms, x, y, cv=2, epochs=3, verbose=0).predict(X[:8], verbose=0),
    "select_members": lambda ms, x, y: _selection(ek.prune.select_members(ms, x, y, budget=2.0)),
}


def _selection(kept):
    return {"indices": list(kept.indices), "weights": kept.weights, "score": kept.score}


def _same(a, b, atol=1e-5):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key], atol)
    elif isinstance(a, (list, tuple)) and a and not isinstance(a[0], (int, float, np.number)):
        assert len(a) == len(b)
        for left, right in zip(a, b):
            _same(left, right, atol) if not isinstance(left, keras.Model) else None
    else:
        np.testing.assert_allclose(np.asarray(a, dtype="float64"), np.asarray(b, dtype="float64"),
                                   rtol=1e-4, atol=atol)


@pytest.mark.parametrize("kind", [k for k in datasets() if k != "arrays"])
@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_each_function_gives_the_array_result_on_every_kind_of_data(members, function, kind):
    expected = FUNCTIONS[function](members, X, Y)
    x, _ = datasets()[kind]
    _same(FUNCTIONS[function](members, x, None), expected)


@pytest.mark.skipif(not TF, reason="tf.data needs TensorFlow")
def test_a_shuffling_dataset_gives_the_sorted_arrays_metrics(members):
    import tensorflow as tf

    model = ek.ensemble(members, "mean")
    shuffled = tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(50, reshuffle_each_iteration=True).batch(9)
    _same(ek.evaluate(model, shuffled), ek.evaluate(model, X, Y))


def test_functions_that_need_labels_refuse_a_dataset_without_them(members):
    def inputs_only():
        for start in range(0, 50, 16):
            yield (X[start:start + 16],)

    with pytest.raises(ValueError, match=r"calibrate: x yields no labels"):
        ek.calibrate(ek.ensemble(members, "mean"), inputs_only)
    with pytest.raises(ValueError, match=r"evaluate: x yields no labels"):
        ek.evaluate(ek.ensemble(members, "mean"), inputs_only)


def test_sample_weights_are_refused_where_they_are_not_used_yet(members):
    def weighted():
        yield X, Y, W

    with pytest.raises(ValueError, match=r"calibrate: sample weights .* refused rather than ignored"):
        ek.calibrate(ek.ensemble(members, "mean"), weighted)


def test_stack_needs_arrays_for_passthrough(members):
    with pytest.raises(ValueError, match=r"stack: x is a .*passthrough=True"):
        ek.stack(members, generator, passthrough=True, cv=2, epochs=1, verbose=0)


@pytest.fixture(scope="module")
def text_members():
    """Three keras-hub BERT classifiers from a small config: a dict of three inputs each."""
    keras_hub = pytest.importorskip("keras_hub")
    result = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        backbone = keras_hub.models.BertBackbone(vocabulary_size=60, num_layers=1, num_heads=2, hidden_dim=16,
                                                 intermediate_dim=32, max_sequence_length=12)
        result.append(keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None))
    return result


def _tokens(rows=40):
    rng = np.random.default_rng(1)
    mask = np.ones((rows, 12), "int32")
    mask[:, 9:] = 0
    return ({"token_ids": rng.integers(1, 60, (rows, 12)).astype("int32") * mask,
             "segment_ids": np.zeros((rows, 12), "int32"), "padding_mask": mask},
            rng.integers(0, 3, rows))


@pytest.mark.parametrize("function", ["evaluate", "calibrate", "optimize_weights", "select", "stack"])
def test_several_input_text_members_work_with_dicts_and_datasets(text_members, function):
    x, y = _tokens()

    def generator():
        for start in range(0, 40, 16):
            yield {k: v[start:start + 16] for k, v in x.items()}, y[start:start + 16]

    call = {
        "evaluate": lambda x_, y_: ek.evaluate(ek.ensemble(text_members, "mean"), x_, y_),
        "calibrate": lambda x_, y_: ek.calibrate(ek.ensemble(text_members, "mean"), x_, y_).layers[-1].temperature,
        "optimize_weights": lambda x_, y_: ek.optimize_weights(text_members, x_, y_),
        "select": lambda x_, y_: ek.select(text_members, x_, y_, size=3),
        "stack": lambda x_, y_: ek.stack(text_members, x_, y_, cv=2, epochs=2, verbose=0).predict(x, verbose=0),
    }[function]
    # optimize_weights' L-BFGS optimum moves by ~1e-5 with the float rounding of another batching
    # (XLA under JAX); the predictions themselves agree to 1e-6.
    tolerance = 1e-4 if function == "optimize_weights" else 1e-5
    _same(call(generator, None), call(x, y), atol=tolerance)


def test_loss_barrier_and_quantize_read_datasets(members):
    from ensemblekit.merge import loss_barrier

    expected = loss_barrier(members[0], members[1], X, Y, points=(0.0, 0.5, 1.0))
    got = loss_barrier(members[0], members[1], Batches(), points=(0.0, 0.5, 1.0))
    _same(list(got.path), list(expected.path))
    with pytest.raises(ValueError, match="loss_barrier: x is a one-shot Python generator"):
        loss_barrier(members[0], members[1], generator(), points=(0.0, 0.5, 1.0))
    _, report = ek.quantize(members[0], "int8", Batches(), max_accuracy_drop=1.0, verbose=0)
    _, array_report = ek.quantize(members[0], "int8", X, Y, max_accuracy_drop=1.0, verbose=0)
    _same(report.after, array_report.after)


@pytest.mark.skipif(not TF, reason="tf.data needs TensorFlow")
def test_activation_matching_on_a_reshuffling_dataset_equals_the_arrays():
    import tensorflow as tf

    def mlp(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
                                 keras.layers.Dense(3)])

    a, b = mlp(0), mlp(1)
    expected = ek.align([a, b], method="activation_matching", x=X)
    shuffled = tf.data.Dataset.from_tensor_slices(X).shuffle(50, reshuffle_each_iteration=True).batch(8)
    got = ek.align([a, b], method="activation_matching", x=shuffled)
    for left, right in zip(expected[1].get_weights(), got[1].get_weights(), strict=True):
        np.testing.assert_allclose(left, right, atol=1e-6)
    with pytest.raises(ValueError, match="align: x is a one-shot Python generator"):
        ek.align([a, b], method="activation_matching", x=(X[i:i + 8] for i in range(0, 50, 8)))


def test_taylor_channel_pruning_reads_a_dataset(members):
    model = members[0]

    class OneBatch(keras.utils.PyDataset):  # the arrays' batching (64 rows: all 50 in one batch)
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return X, Y

    from_arrays = ek.prune.channels(model, 0.5, importance="taylor", x=X, y=Y)
    from_dataset = ek.prune.channels(model, 0.5, importance="taylor", x=OneBatch())
    for left, right in zip(from_arrays.get_weights(), from_dataset.get_weights(), strict=True):
        np.testing.assert_allclose(left, right)


@pytest.mark.parametrize("task", ["multiclass", "binary", "regression"])
def test_sample_weights_weight_every_metric(task):
    from ensemblekit.metrics import score_task

    rng = np.random.default_rng(3)
    n = 60
    if task == "multiclass":
        logits = rng.normal(size=(n, 3))
        prediction = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        y = rng.integers(0, 3, n)
    elif task == "binary":
        prediction, y = rng.uniform(size=(n, 1)), rng.integers(0, 2, n)
    else:
        prediction, y = rng.normal(size=(n, 1)), rng.normal(size=n)
    counts = rng.integers(0, 4, n)  # integer weights: the same as repeating each row that often
    counts[0] = 1
    weighted = score_task(prediction, y, task, sample_weight=counts)
    repeated = score_task(np.repeat(prediction, counts, axis=0), np.repeat(y, counts), task)
    for key in repeated:
        assert weighted[key] == pytest.approx(repeated[key], abs=1e-9), key


def test_a_dataset_yielding_weights_weights_evaluate(members):
    model = ek.ensemble(members, "mean")

    def weighted():
        for start in range(0, 50, 16):
            yield X[start:start + 16], Y[start:start + 16], W[start:start + 16]

    _same(ek.evaluate(model, weighted), ek.evaluate(model, X, Y, sample_weight=W))
    unweighted = ek.evaluate(model, X, Y)
    assert ek.evaluate(model, X, Y, sample_weight=W)["nll"] != pytest.approx(unweighted["nll"], abs=1e-6)


def test_cost_latency_and_prune_report_read_datasets():
    from ensemblekit.costs import latencies
    from ensemblekit.prune import report

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    x = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")
    y = np.arange(40) % 3

    class Rows(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return x[10 * index:10 * index + 10], y[10 * index:10 * index + 10]

    assert latencies({"m": model}, Rows(), batch_size=8, repeats=1, target_s=0.001)["m"] > 0
    summary = report(model, model, Rows(), batch_sizes=(1,), repeats=1)
    assert summary["before"]["accuracy"] == pytest.approx(ek.evaluate(model, x, y)["accuracy"])
    assert summary["accuracy_delta"] == 0.0
