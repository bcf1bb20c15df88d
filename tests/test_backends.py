"""``import ensemblekit`` and the core paths under the JAX backend, with TensorFlow unimportable.

That is the GPU machine's setting (JAX, no TensorFlow); each test runs in a subprocess.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("jax", reason="the JAX backend is tested where jax is installed (the test extra)")

BLOCK_TENSORFLOW = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("tensorflow is blocked for this test")
sys.meta_path.insert(0, Block())
"""

IMPORT_ONLY = BLOCK_TENSORFLOW + """
import ensemblekit as ek
import keras
assert keras.backend.backend() == "jax", keras.backend.backend()
assert "tensorflow" not in sys.modules
print("import ok")
"""

SCRIPT = BLOCK_TENSORFLOW + """
import keras, numpy as np
import ensemblekit as ek
assert keras.backend.backend() == "jax"

def member(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((12, 1)), keras.layers.Conv1D(4, 3, activation="relu"),
                             keras.layers.BatchNormalization(), keras.layers.Flatten(),
                             keras.layers.Dense(3)])

members = [member(s) for s in range(3)]
x = np.random.default_rng(0).normal(size=(16, 12, 1)).astype("float32")
ensemble = ek.ensemble(members, "mean")
expected = ensemble.predict(x, verbose=0)
packed = ek.pack(members, reduce="mean")
assert np.abs(packed.predict(x, verbose=0) - expected).max() < 1e-5
fast = ek.compile_for_inference(packed)
assert np.abs(fast(x) - expected).max() < 1e-5
packed.predict(x, verbose=0)  # Keras' jitted predict donates the variables' arrays
assert np.abs(fast(x) - expected).max() < 1e-5
assert set(fast.lowerings_.values()) <= {"grouped", "loop", "ensemble"} and len(fast.lowerings_) == 1
auto = ek.compile_for_inference(packed, jit_compile="auto")  # everything is jitted on JAX
assert np.abs(auto(x) - expected).max() < 1e-5 and auto.jit_compile_ == {x.shape: True}
merged = ek.merge([members[0], members[0]], method="linear")
assert np.abs(merged.predict(x, verbose=0) - members[0].predict(x, verbose=0)).max() < 1e-6
path = sys.argv[1]
ensemble.save(path)
loaded = keras.saving.load_model(path)
assert np.abs(loaded.predict(x, verbose=0) - expected).max() == 0.0
assert "tensorflow" not in sys.modules
print("jax ok")
"""


def run_under_jax(script, *args):
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script, *args], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_without_tensorflow():
    assert "import ok" in run_under_jax(IMPORT_ONLY)


def test_ensemble_pack_compile_merge_and_save_under_jax(tmp_path):
    assert "jax ok" in run_under_jax(SCRIPT, str(tmp_path / "e.keras"))
