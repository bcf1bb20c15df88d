"""ek.ensemble: methods against numpy, one graph, save/load, adapters, and every bad input."""

import keras
import numpy as np
import pytest
from scipy import special

import ensemblekit as ek
from tests.conftest import make_mlp


@pytest.fixture
def members():
    return [make_mlp(0), make_mlp(1, softmax=True), make_mlp(2)]


def member_probs(members, x):
    outs = []
    for m in members:
        raw = m.predict(x, verbose=0)
        outs.append(raw if ek.detect_output_kind(m) == "probs" else special.softmax(raw, axis=1))
    return np.stack(outs)


def test_detects_final_softmax(members):
    assert [ek.detect_output_kind(m) for m in members] == ["logits", "probs", "logits"]
    act = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Activation("softmax")])
    assert ek.detect_output_kind(act) == "probs"
    assert ek.detect_output_kind(ek.ensemble([act, act])) == "probs"


@pytest.mark.parametrize("method", ["mean", "logit_mean", "geometric", "vote", "weighted"])
def test_methods_match_numpy_reference(members, toy_data, method):
    x, _ = toy_data
    weights = [0.2, 0.3, 0.5] if method == "weighted" else None
    out = ek.ensemble(members, method, weights=weights).predict(x, verbose=0)
    probs = member_probs(members, x)
    w = np.array(weights or [1 / 3] * 3)
    if method in ("mean", "weighted"):
        expected = np.einsum("k,knc->nc", w, probs)
    elif method in ("logit_mean", "geometric"):
        expected = special.softmax(np.einsum("k,knc->nc", w, np.log(probs)), axis=1)
    else:
        votes = np.stack([np.bincount(row, minlength=3) for row in probs.argmax(2).T])
        expected_argmax = np.where(
            votes.max(1, keepdims=True) == votes, probs.mean(0), -1).argmax(1)
        np.testing.assert_array_equal(out.argmax(1), expected_argmax)
        expected = None
    if expected is not None:
        np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("method", ["mean", "logit_mean", "geometric", "vote", "weighted"])
def test_save_load_round_trip_in_safe_mode(members, toy_data, tmp_path, method):
    x, _ = toy_data
    model = ek.ensemble(members, method, weights=[1, 2, 3] if method == "weighted" else None)
    path = tmp_path / "ensemble.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_one_graph_with_members_nested_and_jit_compile(members, toy_data):
    x, _ = toy_data
    model = ek.ensemble(members)
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert len(nested) == 3
    expected = model.predict(x, verbose=0)
    model.compile(jit_compile=True)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-5)
    # A single symbolic call of the composed model produces the ensemble output.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), expected, atol=1e-5)


def test_members_with_same_names_do_not_collide(toy_data, tmp_path):
    x, _ = toy_data
    twins = [make_mlp(0, name="twin"), make_mlp(1, name="twin")]
    model = ek.ensemble(twins)
    assert [m.name for m in twins] == ["twin", "twin"]  # the user's models are untouched
    path = tmp_path / "twins.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    # The second twin's own weights are used, not the first's.
    assert not np.allclose(twins[0].predict(x, verbose=0), twins[1].predict(x, verbose=0))
    ref = ek.ensemble([twins[0], make_mlp(1, name="other")]).predict(x, verbose=0)
    np.testing.assert_allclose(model.predict(x, verbose=0), ref, atol=1e-6)


def test_members_from_keras_and_h5_paths(members, toy_data, tmp_path):
    x, _ = toy_data
    members[0].save(tmp_path / "a.keras")
    members[1].save(tmp_path / "b.h5")
    model = ek.ensemble([str(tmp_path / "a.keras"), tmp_path / "b.h5", members[2]])
    expected = ek.ensemble(members).predict(x, verbose=0)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-6)


def test_adapters_map_shared_input_to_each_member(toy_data):
    small = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    large = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"expects input shape \(None, 8, 8, 1\).*adapters"):
        ek.ensemble([small, large])
    model = ek.ensemble([small, large], adapters=[None, keras.layers.Resizing(8, 8)])
    x = np.random.default_rng(0).random((2, 4, 4, 1)).astype("float32")
    assert model.predict(x, verbose=0).shape == (2, 3)


def test_output_kind_argument_overrides_detection(toy_data):
    x, _ = toy_data
    relu_probs = [make_mlp(0), make_mlp(1)]
    as_logits = ek.ensemble(relu_probs, output_kind="logits").predict(x, verbose=0)
    as_probs = ek.ensemble(relu_probs, output_kind=["probs", "probs"]).predict(x, verbose=0)
    assert not np.allclose(as_logits, as_probs)
    with pytest.raises(ValueError, match="output_kind\\[1\\] is 'scores'"):
        ek.ensemble(relu_probs, output_kind=["logits", "scores"])


# --- bad input: one clear error each -------------------------------------------------------


def test_empty_list():
    with pytest.raises(ValueError, match="at least 2 members, got 0"):
        ek.ensemble([])


def test_one_member(members):
    with pytest.raises(ValueError, match="at least 2 members, got 1"):
        ek.ensemble(members[:1])


def test_not_a_list(members):
    with pytest.raises(TypeError, match="must be a list"):
        ek.ensemble(members[0])


def test_different_output_sizes(members):
    four = make_mlp(5, classes=4, name="four_classes")
    with pytest.raises(ValueError, match=r"member 3 \('four_classes'\) outputs shape \(None, 4\).*\(None, 3\)"):
        ek.ensemble(members + [four])


def test_non_keras_object(members):
    with pytest.raises(TypeError, match=r"member 1 is a dict"):
        ek.ensemble([members[0], {"not": "a model"}])


def test_missing_file(members, tmp_path):
    with pytest.raises(ValueError, match=r"member 1: file .*missing.keras' does not exist"):
        ek.ensemble([members[0], tmp_path / "missing.keras"])


def test_corrupt_file(members, tmp_path):
    bad = tmp_path / "corrupt.keras"
    bad.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match=r"member 1: .*corrupt.keras' is not a valid .keras archive"):
        ek.ensemble([members[0], bad])


def test_truncated_file_is_named_truncated_not_missing(members, tmp_path):
    path = tmp_path / "whole.keras"
    members[0].save(path)
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"member 1: .*truncated.keras' is not a valid .keras "
                                         r"archive \(truncated or corrupt"):
        ek.ensemble([members[0], truncated])


def test_safe_mode_is_passed_on_to_loading(tmp_path):
    inputs = keras.Input((4,))
    lambda_member = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0)(
        keras.layers.Dense(3)(inputs)))
    path = tmp_path / "lambda.keras"
    lambda_member.save(path)
    with pytest.raises(ValueError, match="member 0: could not load .*lambda.keras"):
        ek.ensemble([path, path])
    model = ek.ensemble([path, path], safe_mode=False)
    x = np.ones((2, 4), "float32")
    np.testing.assert_allclose(model.predict(x, verbose=0),
                               ek.ensemble([lambda_member, lambda_member]).predict(x, verbose=0),
                               atol=1e-6)


def test_weights_only_file(members, tmp_path):
    path = tmp_path / "m.weights.h5"
    members[0].save_weights(path)
    with pytest.raises(ValueError, match="holds weights only"):
        ek.ensemble([members[0], path])


def test_weights_wrong_length(members):
    with pytest.raises(ValueError, match="weights has 2 entries but there are 3 members"):
        ek.ensemble(members, "weighted", weights=[0.5, 0.5])


def test_negative_weights(members):
    with pytest.raises(ValueError, match=r"weights\[1\] is -1; weights must be non-negative"):
        ek.ensemble(members, "weighted", weights=[1, -1, 1])


def test_weighted_needs_weights(members):
    with pytest.raises(ValueError, match="needs weights"):
        ek.ensemble(members, "weighted")


def test_unknown_method(members):
    with pytest.raises(ValueError, match="Unknown method 'blend'; expected one of 'mean'"):
        ek.ensemble(members, "blend")
    with pytest.raises(ValueError, match="method 'median' is not defined for task 'multiclass'"):
        ek.ensemble(members, "median")


def test_linear_one_unit_output_asks_for_the_task():
    regressors = [keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]) for _ in range(2)]
    with pytest.raises(ValueError, match=r"shape \(None, 1\)\) ends without a softmax or sigmoid.*task="):
        ek.ensemble(regressors)
    with pytest.raises(ValueError, match=r"outputs shape \(None, 1\); members must be classifiers.*task='binary'"):
        ek.ensemble(regressors, task="multiclass")
