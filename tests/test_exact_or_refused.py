"""Property test: every composition of drawn members equals a NumPy reference, or refuses clearly.

A seeded generator draws small members of many kinds — plain, LoRA-enabled,
int8-quantized, mixed precision; a readable or an opaque (custom-layer) head;
probabilities or logits; multiclass, binary or regression — and what the user
says about them (``task=``, ``output_kind=``, or nothing). ``ensemble``,
``pack``, ``merge``, ``calibrate`` and ``evaluate`` must each give the NumPy
reference within tolerance or raise one ``ValueError``/``TypeError``: no third
outcome. ``EK_PROPERTY_CASES`` runs more cases (the README reports a longer run).
"""

import os
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import ensemblekit as ek

SEED = int(os.environ.get("EK_PROPERTY_SEED", "0"))
CASES = int(os.environ.get("EK_PROPERTY_CASES", "24"))
FEATURES, HIDDEN, ROWS = 6, 8, 48


@keras.saving.register_keras_serializable(package="ensemblekit_tests")
class OpaqueHead(keras.layers.Layer):
    """A custom head whose ``call`` ends in a softmax or sigmoid the detector cannot read."""

    def __init__(self, units, squash, **kwargs):
        super().__init__(**kwargs)
        self.units, self.squash = units, squash
        self.dense = keras.layers.Dense(units, dtype=kwargs.get("dtype"))

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, inputs):
        logits = self.dense(inputs)
        return ops.softmax(logits) if self.squash == "softmax" else ops.sigmoid(logits)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "squash": self.squash}


def draw_case(rng):
    """One case: the members' kind and head, and what the caller states."""
    task = rng.choice(["multiclass", "binary", "regression"])
    kind = "logits" if task == "regression" else rng.choice(["probs", "logits"])
    return {
        "task": str(task),
        "kind": str(kind),
        "opaque": bool(kind == "probs" and rng.random() < 0.5),
        "storage": [str(rng.choice(["plain", "lora", "int8", "mixed"])) for _ in range(2)],
        "say_task": bool(rng.random() < 0.5),
        "say_kind": bool(rng.random() < 0.5),
        "seed": int(rng.integers(1 << 20)),
    }


def build_member(case, index):
    keras.utils.set_random_seed(case["seed"] + index)
    storage = case["storage"][index]
    dtype = "mixed_float16" if storage == "mixed" else None
    units = 3 if case["task"] == "multiclass" else 1
    squash = "softmax" if case["task"] == "multiclass" else "sigmoid"
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(HIDDEN, activation="relu", dtype=dtype)(inputs)
    if case["opaque"]:
        output = OpaqueHead(units, squash, dtype=dtype)(hidden)
    else:
        activation = squash if case["kind"] == "probs" else None
        output = keras.layers.Dense(units, activation=activation, dtype=dtype)(hidden)
    model = keras.Model(inputs, output, name=f"m{index}_{storage}")
    dense = dense_layers(model)
    if storage == "lora":
        rng = np.random.default_rng(case["seed"])
        for layer in dense:
            layer.enable_lora(2)
            layer.lora_kernel_b.assign(rng.normal(size=layer.lora_kernel_b.shape) * 0.5)
    elif storage == "int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.quantize("int8")
    return model


def dense_layers(model):
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.Dense)]


def float_kernel(layer):
    """The float kernel ``layer`` computes with, written out independently of ensemblekit."""
    if layer.quantization_mode == "int8":
        kernel = layer._kernel.numpy().astype("float64") / layer.kernel_scale.numpy()
    else:
        kernel = np.asarray(layer._kernel.numpy(), dtype="float64")
    if layer.lora_enabled:
        kernel = kernel + (layer.lora_alpha / layer.lora_rank) * (
            layer.lora_kernel_a.numpy() @ layer.lora_kernel_b.numpy())
    return kernel


def squash(values, case):
    """The members' probabilities (classification) or values (regression) from their outputs."""
    values = np.asarray(values, dtype="float64")
    if case["task"] == "regression" or case["kind"] == "probs":
        return values
    if case["task"] == "binary":
        return 1 / (1 + np.exp(-values))
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def forward(kernels, biases, x, case):
    hidden = np.maximum(x @ kernels[0] + biases[0], 0)
    out = hidden @ kernels[1] + biases[1]
    if case["kind"] == "logits":
        return out
    return squash(out, {**case, "kind": "logits"})


def statements(case):
    kwargs = {}
    if case["say_task"]:
        kwargs["task"] = case["task"]
    if case["say_kind"] and case["task"] != "regression":
        kwargs["output_kind"] = case["kind"]
    return kwargs


class Outcomes:
    def __init__(self):
        self.exact, self.refused = {}, {}

    def run(self, name, case, call, check):
        """``call()`` must return a result that passes ``check`` or raise ValueError/TypeError."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = call()
        except (ValueError, TypeError) as error:
            message = str(error)
            assert message.strip(), f"{name} {case}: an empty error message"
            self.refused[name] = self.refused.get(name, 0) + 1
            return
        check(result)
        self.exact[name] = self.exact.get(name, 0) + 1


def check_case(case, outcomes, x, y):
    members = [build_member(case, i) for i in range(2)]
    tolerance = 3e-2 if "mixed" in case["storage"] else 1e-4
    member_values = [squash(m.predict(x, verbose=0), case) for m in members]
    reference = np.mean(member_values, axis=0)
    said = statements(case)

    def close(result, expected=reference, atol=tolerance):
        result = np.asarray(result, dtype="float64")
        assert result.shape == expected.shape, (case, result.shape, expected.shape)
        np.testing.assert_allclose(result, expected, atol=atol, rtol=atol, err_msg=str(case))

    ensemble = {}

    def build_ensemble():
        ensemble["model"] = ek.ensemble(members, "mean", **said)
        return ensemble["model"].predict(x, verbose=0)

    outcomes.run("ensemble", case, build_ensemble, close)
    outcomes.run("pack", case, lambda: ek.pack(members, "mean", **said).predict(x, verbose=0), close)

    def merged_reference():
        kernels, biases = [], []
        for position in range(2):
            layers = [dense_layers(m)[position] for m in members]
            kernels.append(np.mean([float_kernel(layer) for layer in layers], axis=0))
            biases.append(np.mean([layer.bias.numpy() for layer in layers], axis=0))
        return forward(kernels, biases, x.astype("float64"), case)

    outcomes.run("merge", case,
                 lambda: ek.merge(members, quantize=False).predict(x, verbose=0),
                 lambda result: close(result, merged_reference(), max(tolerance, 1e-4)))
    if "model" not in ensemble or case["task"] == "regression":
        return
    model = ensemble["model"]

    def check_calibrated(calibrated):
        probs = np.asarray(calibrated.predict(x, verbose=0), dtype="float64")
        before, after = nll(reference, y, case), nll(probs, y, case)
        assert after <= before + 1e-4, (case, before, after)  # T = 1 (a = 1, b = 0) is feasible
        if case["task"] == "multiclass":
            np.testing.assert_array_equal(probs.argmax(-1), reference.argmax(-1))

    outcomes.run("calibrate", case, lambda: ek.calibrate(model, x, y), check_calibrated)

    def check_scores(scores):
        assert abs(scores["nll"] - nll(reference, y, case)) < max(tolerance, 1e-5), (case, scores)
        assert abs(scores["accuracy"] - accuracy(reference, y, case)) < 1e-9, (case, scores)

    outcomes.run("evaluate", case, lambda: ek.evaluate(model, x, y), check_scores)


def nll(probs, y, case):
    probs = np.clip(probs, 1e-12, 1 - 1e-12) if case["task"] == "binary" else np.clip(probs, 1e-12, 1)
    if case["task"] == "binary":
        p = probs[:, 0]
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return float(-np.mean(np.log(probs[np.arange(len(y)), y])))


def accuracy(probs, y, case):
    predicted = (probs[:, 0] > 0.5).astype(int) if case["task"] == "binary" else probs.argmax(-1)
    return float(np.mean(predicted == y))


@pytest.mark.slow
def test_every_composition_is_exact_or_refuses():
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(ROWS, FEATURES)).astype("float32")
    outcomes = Outcomes()
    for _ in range(CASES):
        case = draw_case(rng)
        y = rng.integers(0, 3 if case["task"] == "multiclass" else 2, size=ROWS)
        check_case(case, outcomes, x, y)
    print("exact:", outcomes.exact, "refused:", outcomes.refused)
    # The property would hold vacuously if everything refused: each function must compute.
    for name in ("ensemble", "pack", "merge", "calibrate", "evaluate"):
        assert outcomes.exact.get(name, 0) >= 1, (name, outcomes.exact, outcomes.refused)
