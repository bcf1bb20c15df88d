"""The trainable parts run unchanged under ``tf.distribute.MirroredStrategy``.

Two logical CPUs must be configured before TensorFlow initialises, so the flow runs in a
fresh interpreter. Every batch is split evenly over the 2 replicas (320 samples, batch 64,
no shuffling where we control it), so distributed training computes the same gradients:
Keras scales each replica's mean loss by 1/replicas and sums the replicas' gradients. Only
the float32 summation order differs; the largest difference measured was 7e-7 in a
probability, so the tolerance is 1e-5, while training itself moves the probabilities by
~0.2 (checked, so equal outputs cannot come from untrained models).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5

SCRIPT = r'''
import json
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
import numpy as np

import ensemblekit as ek
from ensemblekit.datasets import load_digits

(x, y), (x_test, _) = load_digits()
x, x_test = x.reshape(len(x), -1), x_test.reshape(len(x_test), -1)
x_fit, y_fit, x_val, y_val = x[:900], y[:900], x[900:1220], y[900:1220]  # 320 = 5 * 64


def member(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu", name="hidden"),
                              keras.layers.Dense(10, name="out")])
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_fit, y_fit, epochs=2, batch_size=128, verbose=0)
    return model


members = [member(seed) for seed in range(2)]
logits_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def fuse_then_unfreeze():
    model = ek.fuse(members, taps="hidden", fusion="gated", units=16)
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    untrained = model.predict(x_test, verbose=0)
    model.fit(x_val, y_val, epochs=3, batch_size=64, shuffle=False, verbose=0)
    ek.unfreeze(model, n_layers=1)
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    model.fit(x_val, y_val, epochs=1, batch_size=64, shuffle=False, verbose=0)
    return model, untrained


def stack():
    return ek.stack(members, x_val, y_val, meta="mlp", cv=2, epochs=5, verbose=0), None


def merge_then_fine_tune():
    model = ek.merge(members, method="linear")
    model.compile(keras.optimizers.SGD(0.05), logits_loss)
    untrained = model.predict(x_test, verbose=0)
    model.fit(x_val, y_val, epochs=2, batch_size=64, shuffle=False, verbose=0)
    return model, untrained


def prune_then_fine_tune():
    model = ek.prune.magnitude(members[0], sparsity=0.5)
    model.compile(keras.optimizers.SGD(0.05), logits_loss)
    model.fit(x_val, y_val, epochs=2, batch_size=64, shuffle=False, verbose=0,
              callbacks=[ek.prune.PruningCallback()])
    return model, None


mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
result = {}
for name, flow in [("fuse", fuse_then_unfreeze), ("stack", stack), ("merge", merge_then_fine_tune),
                   ("prune", prune_then_fine_tune)]:
    outputs = {}
    for label, strategy in [("plain", tf.distribute.get_strategy()), ("mirrored", mirrored)]:
        keras.utils.set_random_seed(7)
        with strategy.scope():
            model, untrained = flow()
            if name == "prune":
                model = ek.prune.strip(model)
        outputs[label] = model.predict(x_test, verbose=0)
        entry = result.setdefault(name, {})
        entry[f"{label}_replicas"] = model.distribute_strategy.num_replicas_in_sync
        if untrained is not None:
            entry["moved_by_training"] = float(np.abs(outputs[label] - untrained).max())
        if name == "prune":
            kernels = [keras.ops.convert_to_numpy(l.kernel) for l in model.layers if hasattr(l, "kernel")]
            entry[f"{label}_zeros"] = int(sum((k == 0).sum() for k in kernels))
    result[name]["max_diff"] = float(np.abs(outputs["plain"] - outputs["mirrored"]).max())
with mirrored.scope():  # odd folds: one uneven batch once broke the initial held-out loss
    odd = ek.stack(members, x_val[:201], y_val[:201], cv=2, epochs=2, verbose=0)
result["stack_odd_folds"] = {"shape": list(odd.predict(x_test[:3], verbose=0).shape)}
print("RESULT " + json.dumps(result))
'''


@pytest.fixture(scope="module")
def distributed_vs_plain(tmp_path_factory):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                               timeout=300, env=env, cwd=tmp_path_factory.mktemp("distribute"))
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and lines, completed.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("flow", ["fuse", "stack", "merge", "prune"])
def test_training_under_mirrored_strategy_matches_plain(distributed_vs_plain, flow):
    result = distributed_vs_plain[flow]
    assert result["plain_replicas"] == 1 and result["mirrored_replicas"] == 2
    assert result["max_diff"] < TOLERANCE, result
    if "moved_by_training" in result:
        assert result["moved_by_training"] > 100 * TOLERANCE, result
    if flow == "prune":
        assert result["plain_zeros"] == result["mirrored_zeros"] > 0


@pytest.mark.slow
def test_stack_with_odd_folds_runs_under_mirrored_strategy(distributed_vs_plain):
    assert distributed_vs_plain["stack_odd_folds"]["shape"] == [3, 10]
