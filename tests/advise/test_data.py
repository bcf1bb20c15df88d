"""``ek.advise`` on data as Keras users hold it: datasets, generators, several inputs, read once."""

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit import _data, compositions

TF = keras.backend.backend() == "tensorflow"
needs_tf = pytest.mark.skipif(not TF, reason="tf.data needs TensorFlow")
COMPARED = ("accuracy", "nll", "brier")


def _member(seed, width=8):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(width, activation="relu"),
                             keras.layers.Dense(3)], name=f"member_{seed}")


@pytest.fixture(scope="module")
def members_and_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = (x[:, :3].argmax(axis=1)).astype("int64")
    members = [_member(seed) for seed in range(3)]
    for model in members:
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, epochs=3, verbose=0)
    return members, x, y


def _rows(advice):
    return {row["name"]: row for row in advice.rows}


def _assert_same_rows(got, expected, atol=1e-4):
    got, expected = _rows(got), _rows(expected)
    assert got.keys() == expected.keys()
    for name, row in expected.items():
        for key in COMPARED:
            if row[key] is None:
                assert got[name][key] is None, name
            else:
                assert got[name][key] == pytest.approx(row[key], abs=atol), (name, key)


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[rows], self.y[rows]


def test_every_data_kind_gives_the_array_advice(members_and_data):
    members, x, y = members_and_data
    expected = ek.advise(members, x, y, verbose=0)
    kinds = {"PyDataset": Batches(x, y, 20),
             "generator": (batch for batch in Batches(x, y, 32)),
             "callable": lambda: iter(Batches(x, y, 16))}
    if TF:
        import tensorflow as tf

        kinds["tf.data"] = tf.data.Dataset.from_tensor_slices((x, y)).batch(24)
        kinds["endless tf.data"] = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()
    for kind, data in kinds.items():
        steps = 3 if kind == "endless tf.data" else None
        got = ek.advise(members, data, verbose=0, steps=steps)
        assert (got.fit_size, got.score_size) == (expected.fit_size, expected.score_size), kind
        assert got.recommendation == expected.recommendation, kind
        _assert_same_rows(got, expected)
        assert got.barriers["0-1"]["barrier"] == pytest.approx(expected.barriers["0-1"]["barrier"], abs=1e-4)


@needs_tf
def test_a_dataset_that_reshuffles_every_pass_keeps_labels_and_inputs_aligned():
    """Members that are right on every sample: any misalignment of the halves' inputs, labels and
    member predictions would show as accuracy below 1 for some candidate (merges read the inputs again)."""
    import tensorflow as tf

    rng = np.random.default_rng(1)
    x = rng.uniform(0.1, 1.0, size=(120, 6)).astype("float32")  # positive: the ReLU keeps them
    y = x[:, :3].argmax(axis=1)
    members = []
    for seed in range(2):
        model = _member(seed, width=3)
        model.layers[0].set_weights([np.eye(6, 3, dtype="float32") * (1 + seed), np.zeros(3, "float32")])
        model.layers[1].set_weights([np.eye(3, dtype="float32") * 5, np.zeros(3, "float32")])
        members.append(model)
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(120, seed=0, reshuffle_each_iteration=True).batch(16)
    advice = ek.advise(members, data, verbose=0)
    scored = [row for row in advice.rows if row["accuracy"] is not None]
    assert len(scored) >= 6
    assert all(row["accuracy"] == 1.0 for row in scored), [(r["name"], r["accuracy"]) for r in scored]


def test_each_member_predicts_each_data_set_once(members_and_data, monkeypatch):
    """All output-level candidates (ensembles, weights, greedy, calibration, pruned subset) reuse the
    members' one pass; only new models (merges, the barrier paths, the pack) run on the data again."""
    members, x, y = members_and_data
    calls = {id(m): 0 for m in members}
    runner, call_outputs = _data._runner, compositions.call_outputs

    def counting_runner(model):
        run = runner(model)

        def counted(batch):
            if id(model) in calls:
                calls[id(model)] += 1
            return run(batch)
        return counted

    passes = {id(m): 0 for m in members}

    def counting_collect(models, *args, **kwargs):
        for model in models:
            if id(model) in passes:
                passes[id(model)] += 1
        return collect(models, *args, **kwargs)

    def counting_call_outputs(model, *args, **kwargs):
        if id(model) in passes:
            passes[id(model)] += 1
        return call_outputs(model, *args, **kwargs)

    collect = _data.collect
    monkeypatch.setattr(_data, "_runner", counting_runner)
    monkeypatch.setattr(_data, "collect", counting_collect)
    monkeypatch.setattr(compositions, "call_outputs", counting_call_outputs)
    advice = ek.advise(members, x, y, budget=2.0, verbose=0)
    assert {row["name"] for row in advice.rows if row["accuracy"] is not None} >= {
        "best_member", "ensemble", "ensemble_calibrated", "weighted", "greedy", "pruned_subset", "packed"}
    assert list(passes.values()) == [1, 1, 1]  # one pass of each member over the data
    batches = -(-len(x) // _data.DEFAULT_BATCH_SIZE)
    assert all(count == batches for count in calls.values()), calls


def test_members_with_several_inputs(members_and_data):
    """A dict of named inputs (as keras-hub text classifiers take) through every candidate."""
    _, x, y = members_and_data
    members = []
    for seed in range(2):
        keras.utils.set_random_seed(seed)
        a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
        hidden = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b]))
        members.append(keras.Model({"a": a, "b": b}, keras.layers.Dense(3)(hidden), name=f"two_inputs_{seed}"))
    data = {"a": x[:, :4], "b": x[:, 4:]}
    advice = ek.advise(members, data, y, verbose=0)
    rows = _rows(advice)
    assert rows["ensemble"]["nll"] is not None and rows["soup"]["nll"] is not None
    if TF:
        import tensorflow as tf

        streamed = ek.advise(members, tf.data.Dataset.from_tensor_slices((data, y)).batch(20), verbose=0)
        _assert_same_rows(streamed, advice)


def test_train_data_as_a_dataset_and_bad_train_data(members_and_data):
    members, x, y = members_and_data
    with pytest.raises(TypeError, match="advise: train_data must be a tuple"):
        ek.advise(members, x, y, train_data=[x, y], verbose=0)
    with pytest.raises(ValueError, match="advise: train_data is a one-shot Python generator"):
        ek.advise(members, x, y, train_data=(b for b in Batches(x, y, 32)), verbose=0)
    advice = ek.advise(members[:2], x, y, train_data=Batches(x, y, 32), verbose=0)
    student = _rows(advice)["distilled_student"]
    assert student["nll"] is not None, student["note"]
    assert "the training data" in student["note"]


def test_bad_data_gets_one_clear_error(members_and_data):
    members, x, y = members_and_data
    with pytest.raises(ValueError, match="advise: x yields no labels"):
        ek.advise(members, ((batch,) for batch, _ in Batches(x, y, 32)), verbose=0)
    with pytest.raises(ValueError, match="advise: y= was given, but x is a keras.utils.PyDataset"):
        ek.advise(members, Batches(x, y, 32), y, verbose=0)
    with pytest.raises(ValueError, match="advise: x does not fit model 'member_0'"):
        ek.advise(members, Batches(x[:, :5], y, 32), verbose=0)
    if TF:
        import tensorflow as tf

        with pytest.raises(ValueError, match="advise: x is an endless tf.data.Dataset"):
            ek.advise(members, tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat(), verbose=0)
