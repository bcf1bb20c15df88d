"""The per-task reductions and uncertainty over members, against numpy references."""

import keras
import numpy as np
import pytest
from scipy import special

from ensemblekit._tasks import (
    METHODS,
    VARIANCE_KINDS,
    MemberMixture,
    MemberReduce,
    MemberUncertainty,
    canonical,
    check_method,
    check_mixture_method,
    member_uncertainty,
    mixture_moments,
    reduce_members,
    to_variance,
    variance_pairs,
)

RNG = np.random.default_rng(0)
K = 5


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _binary_logits(shape=(7, K, 3)):
    return RNG.normal(scale=2.0, size=shape).astype("float32")


def _numpy_reduce(stacked, task, method, weights, trim=0.2, threshold=0.5):
    """Independent reference: loops over members, numpy only."""
    w = weights.reshape([1, -1] + [1] * (stacked.ndim - 2))
    if task == "regression":
        if method == "median":
            return np.median(stacked, axis=1)
        if method == "trimmed_mean":
            cut = int(trim * stacked.shape[1])
            return np.sort(stacked, axis=1)[:, cut:stacked.shape[1] - cut].mean(axis=1)
        return (stacked * w).sum(axis=1)
    if task == "multiclass":
        probs = special.softmax(stacked, axis=-1)
        decisions = np.eye(stacked.shape[-1])[stacked.argmax(axis=-1)]
    else:
        probs = special.expit(stacked)
        decisions = (probs > threshold).astype("float64")
    mean = (probs * w).sum(axis=1)
    if method in ("mean", "weighted"):
        return mean
    if method in ("logit_mean", "geometric"):
        logits = (stacked * w).sum(axis=1)
        return special.softmax(logits, axis=-1) if task == "multiclass" else special.expit(logits)
    votes = (decisions * w).sum(axis=1)
    tie = 0.5 * weights.min()
    return (votes + tie * mean) / (1 + tie)


@pytest.mark.parametrize("task,method", [(t, m) for t, ms in METHODS.items() for m in ms])
def test_reduce_members_matches_numpy(task, method):
    stacked = _binary_logits()
    if task == "multiclass":
        stacked = special.log_softmax(stacked, axis=-1).astype("float32")
    weights = RNG.uniform(0.5, 2.0, size=K)
    weights /= weights.sum()
    use_weights = None if method in ("median", "trimmed_mean") else weights.tolist()
    reference_weights = weights if use_weights is not None else np.full(K, 1.0 / K)
    out = _np(reduce_members(stacked, task, method, use_weights))
    np.testing.assert_allclose(out, _numpy_reduce(stacked.astype("float64"), task, method, reference_weights),
                               atol=2e-6)


def test_dense_outputs_reduce_elementwise():
    maps = RNG.normal(size=(2, K, 4, 4, 3)).astype("float32")
    out = _np(reduce_members(special.log_softmax(maps, axis=-1), "multiclass", "mean"))
    assert out.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(out, special.softmax(maps, axis=-1).mean(axis=1), atol=1e-6)


def test_canonical_binary_from_probs_and_logits_agree():
    logits = _binary_logits((4, 3))
    probs = special.expit(logits).astype("float32")
    np.testing.assert_allclose(_np(canonical(probs, "binary", "probs")), logits, atol=1e-3)
    np.testing.assert_array_equal(_np(canonical(logits, "binary", "logits")), logits)


def test_classification_uncertainty_matches_definitions():
    stacked = special.log_softmax(_binary_logits((6, K, 4)), axis=-1).astype("float32")
    out = {k: _np(v) for k, v in member_uncertainty(stacked, "multiclass").items()}
    probs = np.exp(stacked.astype("float64"))
    mean = probs.mean(axis=1)
    entropy = lambda p: -(p * np.log(p)).sum(axis=-1)  # noqa: E731
    np.testing.assert_allclose(out["predictive_entropy"], entropy(mean), atol=1e-5)
    np.testing.assert_allclose(out["expected_entropy"], entropy(probs).mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(out["mutual_information"], entropy(mean) - entropy(probs).mean(axis=1), atol=1e-5)
    assert (out["mutual_information"] >= 0).all()
    disagree = (probs.argmax(-1) != mean.argmax(-1)[:, None]).mean(axis=1)
    np.testing.assert_allclose(out["disagreement"], disagree, atol=1e-6)


def test_mutual_information_is_zero_for_identical_members():
    one = _binary_logits((6, 1, 3))
    same = np.repeat(one, K, axis=1)
    for task in ("binary", "multilabel"):
        out = member_uncertainty(same, task)
        assert np.abs(_np(out["mutual_information"])).max() < 1e-6
        assert np.abs(_np(out["disagreement"])).max() == 0


def test_binary_uncertainty_is_per_unit_bernoulli():
    stacked = _binary_logits((5, K, 2))
    out = {k: _np(v) for k, v in member_uncertainty(stacked, "multilabel").items()}
    p = special.expit(stacked.astype("float64"))
    h = lambda q: -(q * np.log(q) + (1 - q) * np.log(1 - q))  # noqa: E731
    assert out["predictive_entropy"].shape == (5, 2)
    np.testing.assert_allclose(out["predictive_entropy"], h(p.mean(axis=1)), atol=1e-5)
    np.testing.assert_allclose(out["mutual_information"], h(p.mean(axis=1)) - h(p).mean(axis=1), atol=1e-5)


def test_regression_std_is_weighted_population_std():
    values = RNG.normal(size=(8, K, 2)).astype("float32")
    w = RNG.uniform(size=K)
    w /= w.sum()
    std = _np(member_uncertainty(values, "regression", w.tolist())["std"])
    mean = (values * w[None, :, None]).sum(axis=1)
    reference = np.sqrt((w[None, :, None] * (values - mean[:, None]) ** 2).sum(axis=1))
    np.testing.assert_allclose(std, reference, atol=1e-5)


def test_layers_take_lists_or_stacked_and_serialize():
    outputs = [_binary_logits((3, 2)) for _ in range(K)]
    layer = MemberReduce("multilabel", "vote", ["logits"] * K)
    from_list = _np(layer(outputs))
    from_stack = _np(MemberReduce("multilabel", "vote", ["logits"])(np.stack(outputs, axis=1)))
    np.testing.assert_array_equal(from_list, from_stack)
    clone = MemberReduce.from_config(layer.get_config())
    np.testing.assert_array_equal(_np(clone(outputs)), from_list)
    spread = MemberUncertainty("multilabel", ["logits"] * K)(outputs)
    assert sorted(spread) == ["disagreement", "expected_entropy", "mutual_information", "predictive_entropy"]


def test_bad_method_task_pairs_name_both():
    with pytest.raises(ValueError, match="method 'vote' is not defined for task 'regression'.*'median'"):
        check_method("vote", "regression")
    with pytest.raises(ValueError, match="method 'median' is not defined for task 'binary'"):
        MemberReduce("binary", "median", ["probs"])
    with pytest.raises(ValueError, match="Unknown task 'ranking'"):
        check_method("mean", "ranking")
    with pytest.raises(ValueError, match="trim must be in"):
        MemberReduce("regression", "trimmed_mean", ["probs"], trim=0.5)


# --- members that predict a variance: the Gaussian mixture ---------------------------------------

def _mixture_reference(means, variances, weights):
    """Independent reference: the mixture's second moment minus its squared mean."""
    w = weights.reshape([1, -1] + [1] * (means.ndim - 2))
    mean = (w * means).sum(axis=1)
    total = (w * (variances + means ** 2)).sum(axis=1) - mean ** 2
    return mean, total, (w * variances).sum(axis=1)


@pytest.mark.parametrize("kind", VARIANCE_KINDS)
def test_mixture_moments_match_numpy_for_each_variance_kind(kind):
    means = RNG.normal(size=(6, K, 2)).astype("float32")
    variances = RNG.uniform(0.1, 2.0, size=(6, K, 2))
    raw = {"variance": variances, "log_variance": np.log(variances), "std": np.sqrt(variances)}[kind]
    w = RNG.uniform(0.5, 2.0, size=K)
    w /= w.sum()
    out = {k: _np(v) for k, v in mixture_moments(means, to_variance(raw.astype("float32"), kind),
                                                   w.tolist()).items()}
    mean, total, aleatoric = _mixture_reference(means.astype("float64"), variances, w)
    np.testing.assert_allclose(out["prediction"], mean, atol=1e-5)
    np.testing.assert_allclose(out["variance"], total, atol=1e-5)
    np.testing.assert_allclose(out["aleatoric"], aleatoric, atol=1e-5)
    np.testing.assert_allclose(out["epistemic"], total - aleatoric, atol=1e-5)
    np.testing.assert_allclose(out["std"] ** 2, out["epistemic"], atol=1e-5)


def test_mixture_of_identical_members_is_the_member():
    means = np.repeat(RNG.normal(size=(4, 1, 3)), K, axis=1).astype("float32")
    variances = np.repeat(RNG.uniform(0.5, 1.0, size=(4, 1, 3)), K, axis=1).astype("float32")
    out = mixture_moments(means, variances)
    np.testing.assert_allclose(_np(out["variance"]), variances[:, 0], atol=1e-6)
    assert np.abs(_np(out["epistemic"])).max() < 1e-10


def test_mixture_layer_takes_lists_or_stacked_and_serializes():
    means = [RNG.normal(size=(3, 2)).astype("float32") for _ in range(K)]
    logvars = [RNG.normal(size=(3, 2)).astype("float32") for _ in range(K)]
    layer = MemberMixture("log_variance", uncertainty=True, mean_output="y", variance_output="y_var")
    from_list = {k: _np(v) for k, v in layer(means, logvars).items()}
    assert sorted(from_list) == ["aleatoric", "epistemic", "prediction", "std", "variance"]
    from_stack = MemberMixture("log_variance")(np.stack(means, 1), np.stack(logvars, 1))
    assert sorted(from_stack) == ["prediction", "variance"]
    np.testing.assert_allclose(_np(from_stack["variance"]), from_list["variance"], atol=1e-6)
    clone = MemberMixture.from_config(layer.get_config())
    assert (clone.mean_output, clone.variance_output, clone.variance_kind) == ("y", "y_var", "log_variance")
    np.testing.assert_allclose(_np(clone(means, logvars)["variance"]), from_list["variance"], atol=1e-6)


def test_variance_pairs_and_kinds_are_validated_with_one_message():
    assert variance_pairs(None, ["a"]) == {}
    assert variance_pairs("v", ["v", "m"]) == {1: 0}
    with pytest.raises(ValueError, match=r"variance='var' is not an output; the outputs are \['m', 'v'\]"):
        variance_pairs("var", ["m", "v"])
    with pytest.raises(ValueError, match="names one output but the members have 3 outputs"):
        variance_pairs("v", ["m", "v", "c"])
    with pytest.raises(ValueError, match="must pair distinct outputs"):
        variance_pairs({"m": "v", "c": "v"}, ["m", "v", "c"])
    with pytest.raises(ValueError, match="variance_kind must be one of 'variance', 'log_variance', 'std'"):
        MemberMixture("precision")
    with pytest.raises(ValueError, match="method 'median' for output cannot be used with a variance"):
        check_mixture_method("median")
