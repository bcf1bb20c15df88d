"""ek.ensemble for every kind of member: binary, multilabel, regression, dense maps, several inputs/outputs."""

import keras
import numpy as np
import pytest
from scipy import special

import ensemblekit as ek

RNG = np.random.default_rng(1)
X = RNG.normal(size=(16, 4)).astype("float32")


def mlp(units, activation=None, seed=0, name=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(units, activation=activation)], name=name)


def outputs_of(models, x=X):
    return np.stack([m.predict(x, verbose=0) for m in models], axis=1).astype("float64")


def test_binary_sigmoid_members_detected_and_averaged():
    members = [mlp(1, "sigmoid", seed=s) for s in range(3)]
    model = ek.ensemble(members)
    probs = outputs_of(members)
    np.testing.assert_allclose(model.predict(X, verbose=0), probs.mean(axis=1), atol=1e-6)
    logit_mean = ek.ensemble(members, "logit_mean").predict(X, verbose=0)
    np.testing.assert_allclose(logit_mean, special.expit(special.logit(probs).mean(axis=1)), atol=1e-5)
    assert ek.detect_output_kind(model) == "probs"


def test_binary_logit_members_need_the_task_and_vote_by_threshold():
    members = [mlp(1, seed=s) for s in range(3)]
    with pytest.raises(ValueError, match="cannot be told; pass task="):
        ek.ensemble(members)
    vote = ek.ensemble(members, "vote", task="binary", threshold=0.7).predict(X, verbose=0)
    probs = special.expit(outputs_of(members))
    yes = (probs > 0.7).mean(axis=1)
    tie = 0.5 / 3
    np.testing.assert_allclose(vote, (yes + tie * probs.mean(axis=1)) / (1 + tie), atol=1e-6)


def test_multilabel_members_per_unit():
    members = [mlp(3, "sigmoid", seed=s) for s in range(3)]
    model = ek.ensemble(members, "weighted", weights=[1, 1, 2])
    reference = np.einsum("nkc,k->nc", outputs_of(members), [0.25, 0.25, 0.5])
    np.testing.assert_allclose(model.predict(X, verbose=0), reference, atol=1e-6)


@pytest.mark.parametrize("method", ["mean", "median", "trimmed_mean"])
def test_regression_methods_and_std(method, tmp_path):
    members = [mlp(2, seed=s) for s in range(5)]
    model = ek.ensemble(members, method, task="regression", uncertainty=True, trim=0.2)
    out = model.predict(X, verbose=0)
    values = outputs_of(members)
    reference = {"mean": values.mean(axis=1), "median": np.median(values, axis=1),
                 "trimmed_mean": np.sort(values, axis=1)[:, 1:4].mean(axis=1)}[method]
    np.testing.assert_allclose(out["prediction"], reference, atol=1e-5)
    np.testing.assert_allclose(out["std"], values.std(axis=1), atol=1e-5)
    path = tmp_path / "regression.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    again = loaded.predict(X, verbose=0)
    np.testing.assert_array_equal(again["std"], out["std"])


def test_classifier_uncertainty_outputs_and_identical_members():
    members = [mlp(4, "softmax", seed=s) for s in range(3)]
    out = ek.ensemble(members, uncertainty=True).predict(X, verbose=0)
    assert sorted(out) == ["disagreement", "expected_entropy", "mutual_information",
                           "prediction", "predictive_entropy"]
    probs = outputs_of(members)
    mean = probs.mean(axis=1)
    entropy = lambda p: -(p * np.log(p)).sum(axis=-1)  # noqa: E731
    np.testing.assert_allclose(out["mutual_information"],
                               entropy(mean) - entropy(probs).mean(axis=1), atol=1e-5)
    twins = [mlp(4, "softmax", seed=7, name=f"twin_{i}") for i in range(3)]
    same = ek.ensemble(twins, uncertainty=True).predict(X, verbose=0)
    assert np.abs(same["mutual_information"]).max() < 1e-6


def test_dense_segmentation_maps_combine_per_pixel():
    def segmenter(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((6, 6, 3))
        return keras.Model(inputs, keras.layers.Conv2D(4, 3, padding="same", activation="softmax")(inputs))

    members = [segmenter(s) for s in range(3)]
    x = RNG.normal(size=(2, 6, 6, 3)).astype("float32")
    out = ek.ensemble(members, "vote", uncertainty=True).predict(x, verbose=0)
    assert out["prediction"].shape == (2, 6, 6, 4)
    assert out["mutual_information"].shape == (2, 6, 6)
    probs = outputs_of(members, x)
    np.testing.assert_array_equal(out["prediction"].argmax(-1),
                                  _vote_argmax(probs))


def _vote_argmax(probs):
    votes = np.eye(probs.shape[-1])[probs.argmax(-1)].sum(axis=1)
    return (votes + (0.5 / probs.shape[1]) * probs.mean(axis=1)).argmax(-1)


def two_headed(seed, dict_inputs=True, name=None):
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    hidden = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b]))
    outputs = {"label": keras.layers.Dense(3, activation="softmax")(hidden),
               "value": keras.layers.Dense(1)(hidden)}
    inputs = {"a": a, "b": b} if dict_inputs else [b, a]
    return keras.Model(inputs, outputs, name=name or f"two_headed_{seed}")


def test_several_inputs_and_outputs_by_name(tmp_path):
    # member 1 takes a list [b, a]: matched to member 0's dict inputs by name.
    members = [two_headed(0), two_headed(1, dict_inputs=False), two_headed(2)]
    model = ek.ensemble(members, {"label": "logit_mean", "value": "median"},
                        task={"value": "regression"}, uncertainty=True)
    x = {"a": RNG.normal(size=(9, 3)).astype("float32"), "b": RNG.normal(size=(9, 2)).astype("float32")}
    out = model.predict(x, verbose=0)
    assert {"label", "value", "label_mutual_information", "value_std"} <= set(out)
    member_out = [m.predict(x if i != 1 else [x["b"], x["a"]], verbose=0) for i, m in enumerate(members)]
    labels = np.stack([o["label"] for o in member_out], 1).astype("float64")
    values = np.stack([o["value"] for o in member_out], 1).astype("float64")
    np.testing.assert_allclose(out["label"], special.softmax(np.log(labels).mean(1), axis=-1), atol=1e-5)
    np.testing.assert_allclose(out["value"], np.median(values, 1), atol=1e-6)
    path = tmp_path / "two_headed.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True).predict(x, verbose=0)
    np.testing.assert_array_equal(loaded["value_std"], out["value_std"])


def test_several_outputs_errors_name_the_output():
    members = [two_headed(0), two_headed(1)]
    with pytest.raises(ValueError, match="output 'value'.*cannot be told"):
        ek.ensemble(members)
    with pytest.raises(ValueError, match="method 'median' is not defined for task 'multiclass' \\(output 'label'\\)"):
        ek.ensemble(members, "median", task={"value": "regression"})
    with pytest.raises(ValueError, match="method gives no method for output 'value'"):
        ek.ensemble(members, {"label": "mean"}, task={"value": "regression"})
    with pytest.raises(ValueError, match="task names output 'score'"):
        ek.ensemble(members, task={"score": "regression"})


def test_members_must_agree_on_task_and_inputs():
    with pytest.raises(ValueError, match=r"member 0 .* is a multilabel model but member 1 .* is multiclass"):
        ek.ensemble([mlp(2, "sigmoid", seed=0), mlp(2, "softmax", seed=1)])
    other = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1, activation="sigmoid")], name="wide")
    with pytest.raises(ValueError, match=r"member 1 \('wide'\) expects input shape \(None, 5\)"):
        ek.ensemble([mlp(1, "sigmoid"), other])
    single = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(ValueError, match="has 1 inputs .* but member 0 .* has 2"):
        ek.ensemble([two_headed(0), single])


def test_other_compositions_say_what_they_support():
    members = [mlp(1, "sigmoid", seed=s) for s in range(2)]
    assert ek.fuse(members, taps=0).get_layer("head").activation.__name__ == "sigmoid"  # binary: its own head
    with pytest.raises(ValueError, match=r"stack supports members with one \(batch, units\) output .* task 'multilabel'"):
        ek.stack([mlp(3, "sigmoid", seed=s) for s in range(2)], X, np.zeros((len(X), 3)), cv=2)


# --- members that predict a variance (deep ensembles) --------------------------------------------

def gaussian_member(seed, units=2, head="softplus", name=None, label=False):
    """A mean head and a variance head (softplus: σ²; None: log σ²); optionally a classifier head too."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu")(x)
    outputs = {"mean": keras.layers.Dense(units, name="mu")(hidden),
               "var": keras.layers.Dense(units, activation=head, name="sigma2")(hidden)}
    if label:
        outputs["label"] = keras.layers.Dense(3, activation="softmax", name="cls")(hidden)
    return keras.Model(x, outputs, name=name or f"gaussian_{seed}")


def member_moments(members, raw_to_variance=lambda v: v):
    out = [m.predict(X, verbose=0) for m in members]
    means = np.stack([o["mean"] for o in out], 1).astype("float64")
    return means, raw_to_variance(np.stack([o["var"] for o in out], 1).astype("float64"))


def test_variance_members_give_the_mixtures_total_variance(tmp_path):
    members = [gaussian_member(s) for s in range(4)]
    weights = np.array([1.0, 2.0, 3.0, 2.0])
    model = ek.ensemble(members, "weighted", weights=weights, variance="var", uncertainty=True)
    out = model.predict(X, verbose=0)
    means, variances = member_moments(members)
    w = (weights / weights.sum())[None, :, None]
    mean = (w * means).sum(1)
    np.testing.assert_allclose(out["prediction"], mean, atol=1e-5)
    np.testing.assert_allclose(out["variance"], (w * (variances + means ** 2)).sum(1) - mean ** 2, atol=1e-5)
    np.testing.assert_allclose(out["aleatoric"], (w * variances).sum(1), atol=1e-5)
    np.testing.assert_allclose(out["epistemic"], (w * (means - mean[:, None]) ** 2).sum(1), atol=1e-5)
    assert (out["variance"] > out["aleatoric"]).all()
    path = tmp_path / "mixture.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True).predict(X, verbose=0)
    for key in out:
        np.testing.assert_array_equal(loaded[key], out[key])


def test_log_variance_heads_and_other_outputs_by_name():
    members = [gaussian_member(s, head=None, label=True) for s in range(3)]
    model = ek.ensemble(members, {"label": "mean", "mean": "mean"}, variance={"mean": "var"},
                        variance_kind="log_variance")
    out = model.predict(X, verbose=0)
    assert sorted(out) == ["label", "mean", "mean_variance"]
    means, variances = member_moments(members, np.exp)
    total = (variances + means ** 2).mean(1) - means.mean(1) ** 2
    np.testing.assert_allclose(out["mean_variance"], total, rtol=1e-5, atol=1e-6)


def test_evaluate_and_calibrate_read_the_total_variance():
    members = [gaussian_member(s, units=1) for s in range(3)]
    model = ek.ensemble(members, variance="var")
    y = RNG.normal(size=(len(X), 1)).astype("float32")
    out = model.predict(X, verbose=0)
    scores = ek.evaluate(model, X, y)
    reference = ek.metrics.score_task(out["prediction"], y, "regression", std=np.sqrt(out["variance"]))
    assert scores["nll"] == pytest.approx(reference["nll"])
    calibrated = ek.calibrate(model, X, y)
    s2 = np.mean((y - out["prediction"]) ** 2 / out["variance"])
    assert calibrated.layers[-1].scale == pytest.approx(s2, rel=1e-4)
    np.testing.assert_allclose(calibrated.predict(X, verbose=0)["variance"], s2 * out["variance"], rtol=1e-4)
    assert ek.evaluate(calibrated, X, y)["nll"] <= scores["nll"] + 1e-9


def test_variance_errors_name_member_output_and_shape():
    members = [gaussian_member(0), gaussian_member(1)]
    keras.utils.set_random_seed(2)
    x = keras.Input((4,))
    narrow = keras.Model(x, {"mean": keras.layers.Dense(2)(x),
                             "var": keras.layers.Dense(1, activation="softplus")(x)}, name="narrow")
    with pytest.raises(ValueError, match=r"member 0 \('narrow'\): variance output 'var' has shape \(None, 1\) "
                                         r"but its mean 'mean' has shape \(None, 2\)"):
        ek.ensemble([narrow, narrow], variance="var")
    linear = [gaussian_member(s, head=None) for s in range(2)]
    with pytest.raises(ValueError, match=r"member 0 \('gaussian_0'\): variance output 'var' \(layer 'sigma2', "
                                         r"shape \(None, 2\)\) ends in a linear layer.*variance_kind='log_variance'"):
        ek.ensemble(linear, variance="var")
    with pytest.raises(ValueError, match="method 'median' for output 'mean' cannot be used with a variance"):
        ek.ensemble(members, "median", variance="var")
    with pytest.raises(ValueError, match="output 'mean' is in a variance pair.*got task 'binary'"):
        ek.ensemble(members, variance="var", task={"mean": "binary"})
    with pytest.raises(ValueError, match="variance='sigma' is not an output"):
        ek.ensemble(members, variance="sigma")
