import h5py
import keras
import numpy as np
import pytest

from ensemblekit.merge import merge
from ensemblekit.merge.streaming import H5Source
from tests.conftest import make_mlp, save_all


def _cnn(seed, width=4):
    keras.utils.set_random_seed(seed)
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(width, name="inner_d")], name="inner")
    inputs = keras.Input((6,))
    h = keras.layers.BatchNormalization(name="bn")(inner(inputs))
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(h))


def test_streamed_merge_equals_in_memory_merge(tmp_path):
    models = [_cnn(s) for s in range(3)]
    paths = save_all(models, tmp_path)
    base = tmp_path / "base.keras"
    models[0].save(base)
    for method, kwargs in [("linear", {"weights": [1, 2, 3]}),
                           ("ties", {"base": base, "density": 0.5}),
                           ("dare", {"base": base, "seed": 1})]:
        streamed = merge(paths, method, stream=True, **kwargs)
        in_memory_kwargs = dict(kwargs, base=models[0]) if "base" in kwargs else kwargs
        expected = merge(models, method, **in_memory_kwargs)
        for got, want in zip(streamed.get_weights(), expected.get_weights(), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=method)


def test_weights_h5_members_need_a_template(tmp_path):
    a, b = make_mlp(0), make_mlp(1)
    a.save_weights(tmp_path / "a.weights.h5")
    b.save_weights(tmp_path / "b.weights.h5")
    files = [tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"]
    with pytest.raises(ValueError, match="weights only.*pass template="):
        merge(files)
    merged = merge(files, weights=[0, 1], template=make_mlp(5))
    for got, want in zip(merged.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_file_mismatch_lists_all_tensors_without_loading_models(tmp_path):
    make_mlp(0).save(tmp_path / "a.keras")
    make_mlp(1, hidden=5).save(tmp_path / "b.keras")
    with pytest.raises(ValueError) as info:
        merge([tmp_path / "a.keras", tmp_path / "b.keras"])
    message = str(info.value)
    assert "(3 incompatible weights)" in message
    assert "member 1 ('b.keras'): 'hidden/kernel' (8, 5) vs member 0 ('a.keras')'s 'hidden/kernel' (8, 16)" in message


def test_nan_in_a_file_is_an_error(tmp_path):
    a, b = make_mlp(0), make_mlp(1)
    a.save_weights(tmp_path / "a.weights.h5")
    b.save_weights(tmp_path / "b.weights.h5")
    with h5py.File(tmp_path / "b.weights.h5", "r+") as f:
        f["layers/dense/vars/1"][0] = np.inf
    with pytest.raises(ValueError, match=r"member 1 \('b.weights.h5'\): weight 'hidden/bias' holds 1 NaN"):
        merge([tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"], template=a)


def test_missing_file_and_greedy_soup_stream_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        H5Source(tmp_path / "nope.keras", "member 0")
    make_mlp(0).save(tmp_path / "a.keras")
    with pytest.raises(ValueError, match="needs whole models; use stream=False"):
        merge([tmp_path / "a.keras"] * 2, "greedy_soup", stream=True, validation_data=(np.zeros((1, 8)), [0]))
