"""Combiner layers against numpy references; config round trips; shape errors."""

import keras
import numpy as np
import pytest
from scipy import special

from ensemblekit.compose import layers as L

RNG = np.random.default_rng(0)
LOGITS = [RNG.normal(size=(6, 4)).astype("float32") * 3 for _ in range(3)]
PROBS = [special.softmax(z, axis=1) for z in LOGITS]


def run(layer, inputs):
    return keras.ops.convert_to_numpy(layer([keras.ops.convert_to_tensor(x) for x in inputs]))


def test_mean_probabilities_matches_numpy_for_logit_and_prob_members():
    layer = L.MeanProbabilities(["logits", "probs", "logits"])
    expected = np.mean(PROBS, axis=0)
    np.testing.assert_allclose(run(layer, [LOGITS[0], PROBS[1], LOGITS[2]]), expected, atol=1e-6)


def test_weighted_mean_uses_member_weights():
    weights = [0.5, 0.3, 0.2]
    layer = L.MeanProbabilities(["logits"] * 3, member_weights=weights)
    expected = sum(w * p for w, p in zip(weights, PROBS))
    np.testing.assert_allclose(run(layer, LOGITS), expected, atol=1e-6)


def test_logit_mean_is_softmax_of_mean_logits():
    expected = special.softmax(np.mean(LOGITS, axis=0), axis=1)
    np.testing.assert_allclose(run(L.LogitMean(["logits"] * 3), LOGITS), expected, atol=1e-6)


def test_geometric_mean_is_normalised_product_of_probabilities():
    product = np.prod(np.stack(PROBS), axis=0) ** (1 / 3)
    expected = product / product.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(run(L.GeometricMean(["probs"] * 3), PROBS), expected, atol=1e-5)


def test_vote_is_majority_and_ties_go_to_higher_mean_probability():
    # Two members vote class 0, one votes class 1: majority wins even with lower mean prob.
    a = np.array([[0.51, 0.49, 0.0]], "float32")
    b = np.array([[0.0, 1.0, 0.0]], "float32")
    out = run(L.MajorityVote(["probs"] * 3), [a, a, b])
    assert out.argmax() == 0
    np.testing.assert_allclose(out.sum(), 1.0, atol=1e-6)
    # Tie (one vote each): the class with the higher mean probability wins.
    c = np.array([[0.6, 0.4, 0.0]], "float32")
    d = np.array([[0.0, 0.9, 0.1]], "float32")
    assert run(L.MajorityVote(["probs"] * 2), [c, d]).argmax() == 1


def test_temperature_scaling_divides_log_probabilities():
    layer = L.TemperatureScaling(2.0, kind="logits")
    out = keras.ops.convert_to_numpy(layer(LOGITS[0]))
    np.testing.assert_allclose(out, special.softmax(LOGITS[0] / 2.0, axis=1), atol=1e-6)
    with pytest.raises(ValueError, match="temperature must be positive"):
        L.TemperatureScaling(0.0)


def test_member_log_probs_concatenates_or_stacks():
    flat = keras.ops.convert_to_numpy(L.MemberLogProbs(["logits"] * 3)(LOGITS))
    assert flat.shape == (6, 12)
    np.testing.assert_allclose(flat[:, 4:8], special.log_softmax(LOGITS[1], axis=1), atol=1e-5)
    stacked = keras.ops.convert_to_numpy(L.MemberLogProbs(["logits"] * 3, stack_axis=1)(LOGITS))
    assert stacked.shape == (6, 3, 4)


def test_pool_features_averages_spatial_axes():
    x = RNG.normal(size=(2, 5, 7, 3)).astype("float32")
    out = keras.ops.convert_to_numpy(L.PoolFeatures()(x))
    np.testing.assert_allclose(out, x.mean(axis=(1, 2)), atol=1e-6)
    flat = RNG.normal(size=(2, 3)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(L.PoolFeatures()(flat)), flat)


def test_gated_fusion_output_and_gates_start_uniform():
    layer = L.GatedFusion(units=5)
    feats = [RNG.normal(size=(4, 3)).astype("float32"), RNG.normal(size=(4, 6)).astype("float32")]
    out = keras.ops.convert_to_numpy(layer(feats))
    assert out.shape == (4, 5)
    projected = [f @ keras.ops.convert_to_numpy(w) for f, w in zip(feats, layer.projections)]
    np.testing.assert_allclose(out, 0.5 * projected[0] + 0.5 * projected[1], atol=1e-5)


@pytest.mark.parametrize("cls", [L.MeanProbabilities, L.LogitMean, L.GeometricMean, L.MajorityVote])
def test_combiner_config_round_trip(cls):
    layer = cls(["logits", "probs"], member_weights=[0.25, 0.75], name="c")
    clone = cls.from_config(layer.get_config())
    assert clone.kinds == ["logits", "probs"] and clone.member_weights == [0.25, 0.75]
    assert keras.saving.get_registered_name(cls) == f"ensemblekit>{cls.__name__}"


def test_combiner_rejects_mismatched_member_shapes():
    layer = L.MeanProbabilities(["logits", "logits"], name="combine")
    with pytest.raises(ValueError, match=r"member 1 outputs shape \(6, 5\)"):
        layer([LOGITS[0], np.zeros((6, 5), "float32")])
