"""Files saved by ensemblekit 0.1.0 still load (safe_mode) and compute the same outputs.

The files in ``tests/data/v0_1_0`` were written by ``tests/data/v0_1_0/make_files.py``
with version 0.1.0, before layers and modules were moved and renamed.
"""

from pathlib import Path

import keras
import numpy as np
import pytest

import ensemblekit as ek

DATA = Path(__file__).parent / "data" / "v0_1_0"
NAMES = sorted(path.stem for path in DATA.glob("*.keras"))


def test_every_saved_kind_is_covered():
    assert len(NAMES) == 10


@pytest.mark.parametrize("name", NAMES)
def test_v0_1_0_file_loads_with_same_outputs(name):
    expected = np.load(DATA / "expected.npz")
    model = keras.saving.load_model(DATA / f"{name}.keras", safe_mode=True)
    outputs = model.predict(expected[f"{name}_x"], verbose=0)
    np.testing.assert_allclose(outputs, expected[f"{name}_y"], atol=1e-5)


@pytest.mark.parametrize("name", ["packed_mlp", "packed_cnn"])
def test_v0_1_0_packed_file_unpacks(name):
    expected = np.load(DATA / "expected.npz")
    packed = keras.saving.load_model(DATA / f"{name}.keras")
    members = ek.unpack(packed)
    x = expected[f"{name}_x"]
    reduce = "mean" if name == "packed_mlp" else "logit_mean"
    rebuilt = ek.ensemble(members, reduce)
    np.testing.assert_allclose(rebuilt.predict(x, verbose=0), expected[f"{name}_y"], atol=1e-5)
