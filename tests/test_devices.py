"""The member passes across devices: the same numbers under ``tf.distribute.MirroredStrategy``
(TensorFlow) and ``keras.distribution.DataParallel`` (JAX), on 2 logical CPU devices.

Devices must be configured before the backend initialises, so each flow runs in a fresh
interpreter. The members are built once outside any strategy and once inside it with the same
weights; every function that reads data (``ek.predict``, ``ek.evaluate`` on arrays and a
dataset, ``ek.calibrate``, ``ek.optimize_weights``, ``ek.advise``) must give the same result
both ways (float32 summation order aside: tolerance 1e-5), and the distributed members must
really hold the devices' replicas.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5

COMMON = r'''
import json
import keras
import numpy as np
import ensemblekit as ek

def members():
    result = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        result.append(keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu"),
                                        keras.layers.Dense(4)], name=f"m{seed}"))
    return result

rng = np.random.default_rng(0)
x = rng.normal(size=(200, 12)).astype("float32")
y = (x[:, :4].argmax(axis=1)).astype("int64")

def run(models, dataset=None):
    ensemble = ek.ensemble(models, "logit_mean")
    out = {"predict": ek.predict(ensemble, x, batch_size=64).tolist(),
           "evaluate": ek.evaluate(ensemble, x, y, batch_size=64),
           "temperature": float(ek.calibrate(ensemble, x, y, batch_size=64).layers[-1].temperature),
           "weights": ek.optimize_weights(models, x, y, batch_size=64).tolist(),
           "advise": [[r["name"], r["nll"]] for r in ek.advise(models, x, y, verbose=0, batch_size=64).rows]}
    if dataset is not None:
        out["evaluate_dataset"] = ek.evaluate(ensemble, dataset)
    return out
'''

TENSORFLOW = r'''
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
''' + COMMON + r'''
dataset = lambda: tf.data.Dataset.from_tensor_slices((x, y)).batch(50)
plain = members()
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    mirrored = members()
    for model, source in zip(mirrored, plain):
        model.set_weights(source.get_weights())
replicas = [m.distribute_strategy.num_replicas_in_sync for m in mirrored]
with strategy.scope():
    distributed = run(mirrored, dataset())
print("RESULT " + json.dumps({"plain": run(plain, dataset()), "distributed": distributed, "replicas": replicas}))
'''

JAX = COMMON + r'''
import jax
devices = keras.distribution.list_devices("cpu")
plain_out = run(members())
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
spread = members()
distributed = run(spread)
keras.distribution.set_distribution(None)
replicas = [len(m.weights[0].value.sharding.device_set) for m in spread]  # variables on both devices
print("RESULT " + json.dumps({"plain": plain_out, "distributed": distributed, "replicas": replicas}))
'''


def _run(script, backend):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [row for row in done.stdout.splitlines() if row.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _assert_close(a, b, path="result"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for index, (left, right) in enumerate(zip(a, b)):
            _assert_close(left, right, f"{path}[{index}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= TOLERANCE * max(1.0, abs(a)), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs TensorFlow")
def test_mirrored_strategy_gives_the_same_numbers():
    result = _run(TENSORFLOW, "tensorflow")
    assert result["replicas"] == [2, 2, 2]
    _assert_close(result["distributed"], result["plain"])
    assert result["plain"]["evaluate_dataset"] == pytest.approx(result["plain"]["evaluate"], abs=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs JAX")
def test_jax_data_parallel_gives_the_same_numbers():
    result = _run(JAX, "jax")
    assert result["replicas"] == [2, 2, 2]
    _assert_close(result["distributed"], result["plain"])
