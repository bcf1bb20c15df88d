"""Non-finite outputs: evaluate scores the finite rows and names the member; fitting refuses them."""

import re

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit import metrics
from ensemblekit._tasks import reduce_members
from tests.conftest import make_mlp

ROWS, ODD_ROW, NAN_ROW = 40, 7, 5
X_ARG = r"x(_val)?"  # the held-out data argument's name


def make_sqrt_member(name="odd"):
    """A member whose logits are ``sqrt(x[:, :3])``: NaN exactly where one of those features is negative.

    Its output layer is a plain linear ``Dense`` (read as logits, no probe needed).
    """
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, use_bias=False, activation=keras.ops.sqrt),
                              keras.layers.Dense(3, use_bias=False, name="out")], name=name)
    model.layers[0].set_weights([np.eye(8, dtype="float32")])
    model.layers[1].set_weights([np.eye(8, 3, dtype="float32")])
    return model


@pytest.fixture(scope="module")
def members():
    """Two relu MLPs (TensorFlow's fused CPU kernels turn their NaN into 0) and the sqrt member (untrained)."""
    return [make_mlp(seed, name=f"mlp_{seed}") for seed in range(2)] + [make_sqrt_member()]


@pytest.fixture(scope="module")
def data():
    """Positive inputs with a negative feature in row ODD_ROW, labels."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, size=(ROWS, 8)).astype("float32")
    x[ODD_ROW, 0] = -1.0
    return x, rng.integers(0, 3, ROWS)


def with_nan_row(x):
    x = x.copy()
    x[NAN_ROW] = np.nan
    return x


def finite_rows(*rows):
    return np.setdiff1d(np.arange(ROWS), rows)


def assert_same_metrics(result, reference):
    assert set(result) == set(reference) | {"non_finite_rows"}
    for name, value in reference.items():
        assert result[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_the_sqrt_member_is_non_finite_on_its_row_only(members, data):
    x, _ = data
    out = members[2].predict(x, verbose=0)
    assert np.flatnonzero(~np.isfinite(out).all(axis=1)).tolist() == [ODD_ROW]


@pytest.mark.parametrize("method", ["mean", "logit_mean", "vote"])
def test_evaluate_scores_finite_rows_and_names_the_member(members, data, method):
    x, y = data
    model = ek.ensemble(members, method)
    assert not np.isfinite(model.predict(x, verbose=0)[ODD_ROW]).any()  # the vote keeps the NaN too
    with pytest.warns(UserWarning) as caught:
        result = ek.evaluate(model, x, y)
    message = str(caught[0].message)
    assert message.startswith(f"evaluate: 1 of {ROWS} rows of x have non-finite outputs (first: row {ODD_ROW}), "
                              "from member 2 ('odd')")
    assert "mlp_" not in message
    assert result["non_finite_rows"] == 1
    keep = finite_rows(ODD_ROW)
    assert_same_metrics(result, ek.evaluate(model, x[keep], y[keep]))


def test_evaluate_catches_a_nan_input_row_that_relu_hides(members, data):
    """The issue's case: a NaN input row gave finite metrics; every member is NaN there, op by op."""
    x, y = data
    x = with_nan_row(x)
    model = ek.ensemble(members[:2], "mean")
    with pytest.warns(UserWarning, match=re.escape(
            f"2 of {ROWS} rows of x have non-finite outputs (first: row {NAN_ROW}), from member 0 ('mlp_0') "
            "(1 row), member 1 ('mlp_1') (1 row), member 2 ('odd') (2 rows); the metrics are over the 38 finite rows")):
        result = ek.evaluate(ek.ensemble(members, "mean"), x, y)
    assert result["non_finite_rows"] == 2
    with pytest.warns(UserWarning, match=rf"1 of {ROWS} rows .* from member 0 \('mlp_0'\) \(1 row\), member 1"):
        result = ek.evaluate(model, x, y)
    assert result["non_finite_rows"] == 1
    keep = finite_rows(NAN_ROW)
    assert_same_metrics(result, ek.evaluate(model, x[keep], y[keep]))


def test_evaluate_names_the_model_when_it_has_no_members(members, data):
    x, y = data
    with pytest.warns(UserWarning, match=r"from model 'odd'; the metrics are over the 39 finite rows"):
        result = ek.evaluate(members[2], x, y)
    assert result["non_finite_rows"] == 1


def test_evaluate_refuses_when_no_row_is_finite(members, data):
    x, y = data
    with pytest.raises(ValueError, match=r"^evaluate: 3 of 3 rows of x have non-finite outputs .*nothing to score"):
        ek.evaluate(members[2], np.full((3, 8), -1.0, "float32"), y[:3])


def test_finite_data_keeps_its_result_shape(members, data):
    x, y = data
    assert sorted(ek.evaluate(ek.ensemble(members[:2]), x, y)) == ["accuracy", "brier", "ece", "nll"]


def test_combinations_keep_a_members_nan():
    """trimmed_mean used to sort a NaN member away; a vote's argmax reads NaN as a class."""
    values = np.arange(10, dtype="float32").reshape(2, 5, 1)
    values[0, 4, 0] = np.nan
    out = keras.ops.convert_to_numpy(reduce_members(values, "regression", "trimmed_mean")).ravel()
    assert np.isnan(out[0]) and out[1] == pytest.approx(np.mean(np.sort(values[1, :, 0])[1:4]))
    log_probs = np.log(np.full((2, 3, 4), 0.25, "float32"))
    log_probs[0, 1, 2] = np.nan
    out = keras.ops.convert_to_numpy(reduce_members(log_probs, "multiclass", "vote"))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_probability_metrics_refuse_nan_rows():
    probs = np.array([[0.2, 0.8], [np.nan, np.nan]])
    with pytest.raises(ValueError, match=r"probabilities must be finite; 1 of 2 rows are not \(first: row 1\)"):
        metrics.accuracy(probs, [1, 0])


def refusal(function, member):
    return rf"^{function}: {re.escape(member)} outputs non-finite values on 1 row of {X_ARG} \(first: row {ODD_ROW}\)"


def test_optimize_weights_refuses(members, data):
    x, y = data
    with pytest.raises(ValueError, match=refusal("optimize_weights", "member 2 ('odd')")):
        ek.optimize_weights(members, x, y)


def test_select_refuses(members, data):
    x, y = data
    with pytest.raises(ValueError, match=refusal("select", "member 2 ('odd')")):
        ek.select(members, x, y)


def test_stack_refuses(members, data):
    x, y = data
    with pytest.raises(ValueError, match=refusal("stack", "member 2 ('odd')")):
        ek.stack(members, x, y, cv=2, epochs=1, verbose=0)


def test_calibrate_refuses_naming_the_ensembles_member(members, data):
    x, y = data
    model = ek.ensemble(members, "mean", name="trio")
    with pytest.raises(ValueError, match=refusal("calibrate", "member 0 ('trio')") + r", from its member 2 \('odd'\)"):
        ek.calibrate(model, x, y)


def test_refusals_see_a_nan_input_row_that_relu_hides(members, data):
    x, y = data
    x = with_nan_row(x)
    with pytest.raises(ValueError, match=rf"^optimize_weights: member 0 \('mlp_0'\) outputs non-finite values on "
                                         rf"1 row of {X_ARG} \(first: row {NAN_ROW}\) \(also member 1 \('mlp_1'\)\)"):
        ek.optimize_weights(members[:2], x, y)
    with pytest.raises(ValueError, match=r"^calibrate: member 0 \('mlp_0'\) outputs non-finite values on 1 row"):
        ek.calibrate(members[0], x, y)
