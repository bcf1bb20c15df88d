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
