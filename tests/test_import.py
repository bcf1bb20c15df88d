"""``import ensemblekit`` works under KERAS_BACKEND=jax with TensorFlow unimportable (the GPU box)."""

import os
import subprocess
import sys

BLOCK_TENSORFLOW = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("tensorflow is blocked for this test")
sys.meta_path.insert(0, Block())
import ensemblekit as ek
import keras
assert keras.backend.backend() == "jax", keras.backend.backend()
assert "tensorflow" not in sys.modules
import numpy as np
members = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
out = ek.ensemble(members)(np.zeros((2, 4), "float32"))
print("ok", tuple(out.shape))
"""


def test_import_without_tensorflow():
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run([sys.executable, "-c", BLOCK_TENSORFLOW], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok (2, 3)" in result.stdout
