"""Metrics against hand-computed values; evaluate on logit and probability models."""

import keras
import numpy as np
import pytest

from ensemblekit import metrics

PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
LABELS = np.array([0, 1, 1, 2])


def test_accuracy_nll_brier_by_hand():
    assert metrics.accuracy(PROBS, LABELS) == 0.75
    assert metrics.nll(PROBS, LABELS) == pytest.approx(-np.mean(np.log([0.7, 0.6, 0.4, 0.6])))
    onehot = np.eye(3)[LABELS]
    assert metrics.brier(PROBS, LABELS) == pytest.approx(np.mean(((PROBS - onehot) ** 2).sum(1)))
    assert metrics.accuracy(PROBS, np.eye(3)[LABELS]) == 0.75  # one-hot labels accepted


def test_ece_by_hand_with_three_bins():
    # confidences 0.7, 0.6, 0.5, 0.6 -> bins (1/3, 2/3] hold all four; accuracy 3/4; mean conf 0.6
    assert metrics.ece(PROBS, LABELS, bins=3) == pytest.approx(abs(0.75 - 0.6))
    perfect = np.eye(3)[LABELS]
    assert metrics.ece(perfect, LABELS) == 0.0


def test_evaluate_applies_softmax_only_to_logit_models():
    x = np.random.default_rng(0).normal(size=(50, 4)).astype("float32")
    y = np.arange(50) % 3
    logits = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    probs = keras.Sequential([keras.Input((4,)), logits, keras.layers.Softmax()])
    a, b = metrics.evaluate(logits, x, y), metrics.evaluate(probs, x, y)
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-6)


def test_label_errors():
    with pytest.raises(ValueError, match="y has 3 labels but x has 4 samples"):
        metrics.accuracy(PROBS, LABELS[:3])
    with pytest.raises(ValueError, match="integer class labels"):
        metrics.nll(PROBS, np.array([0.5, 1, 1, 2]))
    with pytest.raises(ValueError, match="probabilities must have shape"):
        metrics.nll(PROBS[0], LABELS)


# --- binary, multilabel, regression and OOD metrics against independent references ----------

RNG = np.random.default_rng(7)
Y_BIN = RNG.integers(0, 2, size=200)
# Probabilities correlated with the labels, rounded to 0.1 so that many ties occur.
P_BIN = np.clip(np.round(0.5 + 0.25 * (Y_BIN - 0.5) + RNG.normal(0, 0.2, size=200), 1), 0, 1)


def test_binary_metrics_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    assert len(np.unique(P_BIN)) < 20  # ties, so the rank-based AUROC must average them
    assert metrics.binary_accuracy(P_BIN, Y_BIN) == pytest.approx(sk.accuracy_score(Y_BIN, P_BIN > 0.5))
    assert metrics.auroc(P_BIN, Y_BIN) == pytest.approx(sk.roc_auc_score(Y_BIN, P_BIN), abs=1e-12)
    clipped = np.clip(P_BIN, 1e-12, 1 - 1e-12)
    assert metrics.binary_nll(P_BIN, Y_BIN) == pytest.approx(sk.log_loss(Y_BIN, clipped), rel=1e-9)
    assert metrics.binary_brier(P_BIN, Y_BIN) == pytest.approx(sk.brier_score_loss(Y_BIN, P_BIN))
    # (n, 1) probabilities with (n,) labels, and the other way round, are the same thing
    assert metrics.score_binary(P_BIN[:, None], Y_BIN) == metrics.score_binary(P_BIN, Y_BIN[:, None])


def _ece_reference(confidence, correct, bins):
    total = 0.0
    for low, high in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        inside = (confidence > low) & (confidence <= high) if low > 0 else confidence <= high
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def test_binary_ece_uses_the_confidence_of_the_predicted_class():
    rng = np.random.default_rng(2)
    p = rng.uniform(size=500)
    y = (rng.uniform(size=500) < 0.5 + 0.5 * (p - 0.5)).astype(int)  # overconfident both ways
    expected = _ece_reference(np.maximum(p, 1 - p), (p > 0.5) == y, 10)
    assert metrics.binary_ece(p, y, bins=10) == pytest.approx(expected, abs=1e-12)
    assert metrics.binary_ece(p, y, bins=10) > 0.08  # about E|p - q| = 0.125
    # two-column softmax probabilities give the multiclass ECE (except at exactly 0.5)
    assert metrics.binary_ece(p, y) == pytest.approx(metrics.ece(np.c_[1 - p, p], y), abs=1e-12)


def test_aupr_and_fpr95_match_sklearn_with_ties():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for scores in (P_BIN, rng.normal(size=200), np.round(rng.normal(size=200))):
        assert metrics.aupr(scores, Y_BIN) == pytest.approx(sk.average_precision_score(Y_BIN, scores),
                                                            abs=1e-12)
        fpr, tpr, _ = sk.roc_curve(Y_BIN, scores, drop_intermediate=False)
        assert metrics.fpr_at_tpr(scores, Y_BIN) == pytest.approx(fpr[np.searchsorted(tpr, 0.95)])


def test_ood_detection_treats_ood_as_positive():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(4)
    scores_in, scores_out = rng.normal(0, 1, 300), rng.normal(1.5, 1, 100)
    result = metrics.ood_detection(scores_in, scores_out)
    labels, scores = np.r_[np.zeros(300), np.ones(100)], np.r_[scores_in, scores_out]
    assert result["auroc"] == pytest.approx(sk.roc_auc_score(labels, scores))
    assert result["aupr"] == pytest.approx(sk.average_precision_score(labels, scores))
    assert 0.8 < result["auroc"] < 0.95
    separated = metrics.ood_detection([0.1, 0.2, 0.3], [0.8, 0.9])
    assert separated == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}
    assert metrics.ood_detection([0.8, 0.9], [0.1, 0.2, 0.3])["auroc"] == 0.0


def test_ood_scores_and_entropy():
    from scipy.stats import entropy as scipy_entropy

    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(4), size=30)
    scores = metrics.ood_scores(probs, mutual_information=np.full(30, 0.1))
    np.testing.assert_allclose(scores["entropy"], scipy_entropy(probs, axis=1), atol=1e-9)
    np.testing.assert_allclose(scores["max_prob"], -probs.max(axis=1))
    np.testing.assert_allclose(scores["mutual_information"], 0.1)
    # binary: Bernoulli entropy, confidence max(p, 1 - p); multilabel: summed over labels
    p = rng.uniform(size=(30, 3))
    bernoulli = scipy_entropy(np.stack([p, 1 - p]), axis=0)
    np.testing.assert_allclose(metrics.entropy(p, "multilabel"), bernoulli.sum(axis=1), atol=1e-9)
    np.testing.assert_allclose(metrics.ood_scores(p[:, :1], "binary")["max_prob"],
                               -np.maximum(p[:, 0], 1 - p[:, 0]))


def test_multilabel_per_label_and_macro_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, size=(120, 3))
    p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, size=(120, 3)), 0, 1)
    result = metrics.multilabel_metrics(p, y)
    np.testing.assert_allclose([row["auroc"] for row in result["per_label"]],
                               sk.roc_auc_score(y, p, average=None))
    assert result["auroc"] == pytest.approx(sk.roc_auc_score(y, p, average="macro"))
    assert result["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert result["accuracy"] == pytest.approx(np.mean((p > 0.5) == y))
    assert result["per_label"][1] == metrics.score_binary(p[:, 1], y[:, 1])


def test_regression_metrics_match_references():
    from scipy.stats import norm

    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    y, mean = rng.normal(size=(80, 2)), rng.normal(size=(80, 2))
    std = rng.uniform(0.5, 2.0, size=(80, 2))
    assert metrics.rmse(mean, y) == pytest.approx(np.sqrt(sk.mean_squared_error(y, mean)))
    assert metrics.mae(mean, y) == pytest.approx(sk.mean_absolute_error(y, mean))
    assert metrics.gaussian_nll(mean, std, y) == pytest.approx(-norm.logpdf(y, mean, std).mean())
    inside = (y > mean - 1.96 * std) & (y < mean + 1.96 * std)
    assert metrics.coverage(mean, std, y) == pytest.approx(inside.mean())
    # a calibrated Gaussian covers ~95%
    truth = rng.normal(size=20000)
    assert metrics.coverage(np.zeros(20000), np.ones(20000), truth) == pytest.approx(0.95, abs=0.01)
    # (n, 1) predictions go with (n,) targets
    assert metrics.rmse(mean[:, :1], y[:, 0]) == pytest.approx(metrics.rmse(mean[:, 0], y[:, 0]))


def test_single_class_and_bad_inputs_raise_clear_errors():
    for fn in (metrics.auroc, metrics.aupr, metrics.fpr_at_tpr):
        with pytest.raises(ValueError, match="needs both classes in y; all 3 labels are 1"):
            fn([0.2, 0.5, 0.9], [1, 1, 1])
    with pytest.raises(ValueError, match="label 1: auroc needs both classes"):
        metrics.multilabel_metrics(np.full((3, 2), 0.5), np.array([[0, 1], [1, 1], [0, 1]]))
    with pytest.raises(ValueError, match="binary labels 0/1; got 2"):
        metrics.binary_nll([0.2, 0.5], [0, 2])
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\].*\[-1, 0.5\]"):
        metrics.binary_brier([-1.0, 0.5], [0, 1])
    with pytest.raises(ValueError, match=r"p has shape \(2, 2\) but y has shape \(2,\)"):
        metrics.binary_accuracy(np.full((2, 2), 0.5), [0, 1])
    with pytest.raises(ValueError, match="std must be non-negative"):
        metrics.gaussian_nll([0.0, 1.0], [1.0, -1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match=r"prediction has shape \(3,\) but y has shape \(2,\)"):
        metrics.rmse([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="Unknown task 'ranking'"):
        metrics.score_task(np.zeros(2), np.zeros(2), "ranking")


# --- evaluate on binary, regression, multi-output and dense Keras models ----------------------


def _dense_model(units, activation=None, seed=0, name=None):
    """One Dense layer on 4 inputs with fixed weights drawn from ``seed``."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, activation=activation)], name=name)
    rng = np.random.default_rng(seed)
    model.layers[0].set_weights([rng.normal(0, 1, (4, units)).astype("float32"), np.zeros(units, "float32")])
    return model


def _binary_data(rows=80, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4)).astype("float32")
    return x, (x @ np.array([1.0, -1.0, 0.5, 0.0]) + rng.normal(0, 0.5, rows) > 0).astype(int)


def test_evaluate_binary_model_scores_its_sigmoid_probabilities():
    x, y = _binary_data()
    probs_model = _dense_model(1, "sigmoid")
    logits_model = _dense_model(1)
    result = metrics.evaluate(probs_model, x, y)
    assert set(result) == {"accuracy", "auroc", "nll", "brier", "ece"}
    assert result == pytest.approx(metrics.score_binary(probs_model.predict(x, verbose=0), y), abs=1e-6)
    # binary logits: a sigmoid is applied once (the softmax of one column would be all ones)
    from_logits = metrics.evaluate(logits_model, x, y, task="binary")
    assert from_logits == pytest.approx(result, abs=1e-6)
    with pytest.raises(ValueError, match=r"shape \(None, 1\)\) ends without a softmax or sigmoid.* pass task="):
        metrics.evaluate(logits_model, x, y)


def test_evaluate_regression_model_and_its_errors():
    x, _ = _binary_data()
    model = _dense_model(2)
    y = x[:, :2] * 2.0
    prediction = model.predict(x, verbose=0)
    result = metrics.evaluate(model, x, y, task="regression")
    assert result == pytest.approx({"rmse": np.sqrt(np.mean((prediction - y) ** 2)),
                                    "mae": np.mean(np.abs(prediction - y))}, rel=1e-5)
    with pytest.raises(ValueError, match=r"output 'dense.*' \(regression, shape \(80, 2\)\): prediction has "
                                         r"shape \(80, 2\) but y has shape \(80, 3\)"):
        metrics.evaluate(model, x, x[:, :3], task="regression")
    with pytest.raises(ValueError, match="needs the model's 'std' output"):
        metrics.evaluate(model, x, y, task="regression", x_ood=x)


def test_evaluate_several_outputs_gives_one_dict_per_output():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, {"label": keras.layers.Dense(3, activation="softmax")(inputs),
                                 "flag": keras.layers.Dense(1, activation="sigmoid")(inputs)})
    x, flag = _binary_data()
    label = np.arange(80) % 3
    result = metrics.evaluate(model, x, {"label": label, "flag": flag}, x_ood=x + 3)
    out = model.predict(x, verbose=0)
    assert sorted(result) == ["flag", "label"]
    assert {k: v for k, v in result["label"].items() if k != "ood"} == pytest.approx(
        metrics.score_probs(out["label"], label), abs=1e-6)
    assert result["flag"]["auroc"] == pytest.approx(metrics.auroc(out["flag"], flag))
    assert sorted(result["flag"]["ood"]) == ["entropy", "max_prob"]
    with pytest.raises(ValueError, match=r"has outputs \['flag', 'label'\]; y must be a dict"):
        metrics.evaluate(model, x, label)


def test_evaluate_dense_multiclass_outputs_score_every_position():
    model = keras.Sequential([keras.Input((6, 2)), keras.layers.Conv1D(3, 1, activation="softmax")])
    x = np.random.default_rng(1).normal(size=(10, 6, 2)).astype("float32")
    y = np.random.default_rng(2).integers(0, 3, size=(10, 6))
    probs = model.predict(x, verbose=0)
    assert metrics.evaluate(model, x, y) == pytest.approx(
        metrics.score_probs(probs.reshape(-1, 3), y.reshape(-1)), abs=1e-6)


def test_evaluate_x_ood_scores_max_prob_and_entropy():
    model = _dense_model(3, "softmax")
    x = np.random.default_rng(3).normal(size=(60, 4)).astype("float32")
    far = x * 6.0  # logits scale up: more confident, so "OOD" here means *lower* entropy
    result = metrics.evaluate(model, x, np.arange(60) % 3, x_ood=far)
    probs_in, probs_out = model.predict(x, verbose=0), model.predict(far, verbose=0)
    expected = metrics.ood_detection(metrics.entropy(probs_in), metrics.entropy(probs_out))
    assert result["ood"]["entropy"] == pytest.approx(expected)
    assert result["ood"]["max_prob"]["auroc"] < 0.5


# --- evaluate on ek.ensemble(..., task=..., uncertainty=True) ---------------------------------


def test_evaluate_binary_ensemble_with_uncertainty():
    import ensemblekit as ek

    x, y = _binary_data()
    members = [_dense_model(1, "sigmoid", seed=s) for s in range(3)]
    plain = metrics.evaluate(ek.ensemble(members, task="binary"), x, y)
    model = ek.ensemble(members, task="binary", uncertainty=True)
    far = x * 4.0
    result = metrics.evaluate(model, x, y, x_ood=far)
    assert {k: v for k, v in result.items() if k != "ood"} == pytest.approx(plain, abs=1e-6)
    member_probs = np.stack([m.predict(x, verbose=0) for m in members])
    assert result["nll"] == pytest.approx(metrics.binary_nll(member_probs.mean(0), y), abs=1e-6)
    mi_in, mi_out = model.predict(x, verbose=0), model.predict(far, verbose=0)
    expected = metrics.ood_detection(mi_in["mutual_information"].sum(1), mi_out["mutual_information"].sum(1))
    assert sorted(result["ood"]) == ["entropy", "max_prob", "mutual_information"]
    assert result["ood"]["mutual_information"] == pytest.approx(expected)
    assert result["ood"]["mutual_information"]["auroc"] > 0.6  # members disagree more far away


def test_evaluate_regression_ensemble_uses_its_std():
    import ensemblekit as ek

    x, _ = _binary_data()
    y = x[:, :1] - x[:, 1:2]
    members = [_dense_model(1, seed=s) for s in range(4)]
    model = ek.ensemble(members, task="regression", uncertainty=True)
    result = metrics.evaluate(model, x, y, x_ood=x * 5)
    member_values = np.stack([m.predict(x, verbose=0) for m in members])
    mean, std = member_values.mean(0), member_values.std(0)
    assert result["rmse"] == pytest.approx(metrics.rmse(mean, y), rel=1e-5)
    assert result["nll"] == pytest.approx(metrics.gaussian_nll(mean, std, y), rel=1e-4)
    assert result["coverage"] == pytest.approx(metrics.coverage(mean, std, y))
    assert result["ood"]["std"]["auroc"] > 0.9  # linear members spread linearly with |x|


def test_evaluate_multi_output_ensemble_pairs_each_output_with_its_uncertainty():
    import ensemblekit as ek

    def member(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((4,))
        return keras.Model(inputs, {"kind": keras.layers.Dense(3, activation="softmax", name="kind")(inputs),
                                    "size": keras.layers.Dense(1, name="size")(inputs)})

    members = [member(seed) for seed in range(3)]
    model = ek.ensemble(members, task={"size": "regression"}, uncertainty=True)
    x, _ = _binary_data(40)
    y = {"kind": np.arange(40) % 3, "size": x[:, :1]}
    result = metrics.evaluate(model, x, y, x_ood=x * 4)
    assert sorted(result) == ["kind", "size"]
    assert sorted(result["kind"]) == ["accuracy", "brier", "ece", "nll", "ood"]
    assert sorted(result["kind"]["ood"]) == ["entropy", "max_prob", "mutual_information"]
    sizes = np.stack([m.predict(x, verbose=0)["size"] for m in members])
    assert result["size"]["coverage"] == pytest.approx(metrics.coverage(sizes.mean(0), sizes.std(0), y["size"]))
    assert sorted(result["size"]["ood"]) == ["std"]


def test_evaluate_model_with_two_inputs_and_a_partial_last_batch():
    first, second = keras.Input((4,), name="first"), keras.Input((2,), name="second")
    joined = keras.layers.Concatenate()([first, second])
    model = keras.Model([first, second], keras.layers.Dense(1, activation="sigmoid")(joined))
    x, y = _binary_data(70)
    inputs = [x, x[:, :2] * 2]
    result = metrics.evaluate(model, inputs, y, batch_size=32)
    expected = metrics.score_binary(model.predict(inputs, verbose=0), y)
    assert result == pytest.approx(expected, abs=1e-6)


def test_evaluate_calibrated_regression_ensemble_scores_the_scaled_std():
    import ensemblekit as ek

    x, _ = _binary_data(120)
    y = x[:, :1] - x[:, 1:2] + np.random.default_rng(4).normal(0, 0.5, (120, 1)).astype("float32")
    model = ek.ensemble([_dense_model(1, seed=s) for s in range(3)], task="regression", uncertainty=True)
    calibrated = ek.calibrate(model, x[:60], y[:60])
    out = metrics.predict_outputs(model, x[60:])
    scale = calibrated.layers[-1].scale
    result = metrics.evaluate(calibrated, x[60:], y[60:])
    assert result["coverage"] == pytest.approx(metrics.coverage(out["prediction"], scale * out["std"], y[60:]))
    assert result["nll"] == pytest.approx(metrics.gaussian_nll(out["prediction"], scale * out["std"], y[60:]),
                                          rel=1e-4)
    assert result["nll"] < metrics.evaluate(model, x[60:], y[60:])["nll"]
