"""ek.pack / ek.unpack / compile_for_inference: exactness, round trip, save/load, errors."""

import keras
import numpy as np
import pytest

from ensemblekit.compose import ensemble
from ensemblekit.pack import pack, unpack
from tests.conftest import make_mlp, save_all

L = keras.layers
K = 3


def make_cnn1d(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((40, 1)),
        L.Conv1D(6, 5, activation="relu"),
        L.MaxPooling1D(2),
        L.Conv1D(6, 3, strides=2, padding="same", activation="relu"),
        L.Dropout(0.2),
        L.Flatten(),
        L.Dense(10),
    ])


def make_cnn2d(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((12, 12, 3)),
        L.Conv2D(4, 3, activation="relu"),
        L.AveragePooling2D(2),
        L.Conv2D(6, 3, padding="same", dilation_rate=1),
        L.ZeroPadding2D(1),
        L.GlobalAveragePooling2D(),
        L.Dense(5, activation="softmax"),
    ])


def make_resnet(seed):
    """Residual Conv1D net with BatchNorm, Add, Concatenate and LayerNorm."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((40, 1))
    h = L.ReLU()(L.BatchNormalization()(L.Conv1D(8, 3, padding="same")(x)))
    r = L.BatchNormalization()(L.Conv1D(8, 3, padding="same")(h))
    h = L.Activation("relu")(L.Add()([h, r]))
    h = L.Concatenate()([h, x])
    h = L.LayerNormalization()(L.GlobalMaxPooling1D()(h))
    return keras.Model(x, L.Dense(10)(h))


def randomize_norms(models, seed=0):
    """Give BatchNorm/LayerNorm parameters non-trivial values so packing them is tested."""
    rng = np.random.default_rng(seed)
    for model in models:
        for variable in model.weights:
            if any(key in variable.path for key in ("gamma", "beta", "moving")):
                variable.assign(rng.uniform(0.5, 1.5, size=variable.shape).astype("float32"))
    return models


BUILDERS = {
    "mlp": (lambda seed: make_mlp(seed, input_shape=(40, 1), classes=10), (40, 1)),
    "mlp_softmax": (lambda seed: make_mlp(seed, input_shape=(8,), softmax=True), (8,)),
    "cnn1d": (make_cnn1d, (40, 1)),
    "cnn2d": (make_cnn2d, (12, 12, 3)),
    "resnet": (make_resnet, (40, 1)),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request):
    build, shape = BUILDERS[request.param]
    models = randomize_norms([build(seed) for seed in range(K)])
    x = np.random.default_rng(1).normal(size=(9, *shape)).astype("float32")
    return request.param, models, x


@pytest.mark.parametrize("reduce", ["mean", "logit_mean"])
def test_pack_equals_ensemble(case, reduce):
    _, models, x = case
    expected = ensemble(models, reduce).predict(x, verbose=0)
    packed = pack(models, reduce)
    np.testing.assert_allclose(packed.predict(x, verbose=0), expected, atol=1e-5, rtol=0)


def test_packed_model_declares_probabilities_and_counts_its_members_macs(case):
    from ensemblekit.compose import detect_output_kind
    from ensemblekit.costs import macs
    from ensemblekit.metrics import evaluate

    _, models, x = case
    packed = pack(models, "mean")
    assert detect_output_kind(packed) == "probs"
    assert detect_output_kind(pack(models, "none")) == detect_output_kind(models[0])
    assert macs(packed) == sum(macs(m) for m in models) > 0
    y = np.arange(len(x)) % models[0].predict(x, verbose=0).shape[-1]
    packed_scores, ensemble_scores = evaluate(packed, x, y), evaluate(ensemble(models, "mean"), x, y)
    assert abs(packed_scores["nll"] - ensemble_scores["nll"]) < 1e-5


def test_pack_none_gives_member_outputs(case):
    _, models, x = case
    expected = np.stack([m.predict(x, verbose=0) for m in models], axis=1)
    outputs = pack(models, "none").predict(x, verbose=0)
    assert outputs.shape == (len(x), K, expected.shape[-1])
    np.testing.assert_allclose(outputs, expected, atol=1e-5, rtol=0)


def test_loop_lowering_equals_grouped(case):
    _, models, x = case
    grouped = pack(models, "none", lowering="grouped").predict(x, verbose=0)
    looped = pack(models, "none", lowering="loop").predict(x, verbose=0)
    np.testing.assert_allclose(looped, grouped, atol=1e-5, rtol=0)


def test_unpack_round_trip_is_exact(case):
    _, models, x = case
    members = unpack(pack(models, "mean"))
    assert [m.name for m in members] == [m.name for m in models]
    for original, back in zip(models, members, strict=True):
        weights, weights_back = original.get_weights(), back.get_weights()
        assert len(weights) == len(weights_back)
        for a, b in zip(weights, weights_back, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(back.predict(x, verbose=0), original.predict(x, verbose=0))


def test_save_load_safe_mode(case, tmp_path):
    _, models, x = case
    packed = pack(models, "logit_mean")
    path = tmp_path / "packed.keras"
    packed.save(path)
    loaded = keras.saving.load_model(path)  # safe_mode=True, no custom_objects
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), packed.predict(x, verbose=0))
    for original, back in zip(models, unpack(loaded), strict=True):
        for a, b in zip(original.get_weights(), back.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_pack_accepts_paths(tmp_path):
    models = [make_mlp(seed) for seed in range(2)]
    paths = save_all(models, tmp_path)
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    np.testing.assert_allclose(pack(paths).predict(x, verbose=0),
                               ensemble(models).predict(x, verbose=0), atol=1e-5, rtol=0)


def test_pack_rejects_different_architectures():
    models = [make_mlp(0), make_mlp(1, hidden=12)]
    with pytest.raises(ValueError, match=r"member 1 .*hidden/kernel.*\(8, 12\)"):
        pack(models)


def test_pack_rejects_different_activation():
    models = [make_mlp(0), make_mlp(1, softmax=True)]
    with pytest.raises(ValueError, match=r"member 1 .*layer 'out' \(Dense\).*activation"):
        pack(models)


def test_pack_rejects_unsupported_layer_naming_it():
    def build(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((6, 4)), L.LSTM(5, name="rnn"), L.Dense(3)], name=f"rnn{seed}")

    with pytest.raises(ValueError, match=r"member 0 \('rnn0'\), layer 'rnn' \(LSTM\) is not supported"):
        pack([build(0), build(1)])


def test_pack_rejects_nested_model():
    def build(seed):
        inner = make_mlp(seed, name=f"inner{seed}")
        x = keras.Input((8,))
        return keras.Model(x, inner(x))

    with pytest.raises(ValueError, match=r"layer 'inner0' is a nested model"):
        pack([build(0), build(1)])


def test_pack_bad_arguments():
    models = [make_mlp(0), make_mlp(1)]
    with pytest.raises(ValueError, match="Unknown reduce 'median'"):
        pack(models, reduce="median")
    with pytest.raises(ValueError, match="Unknown lowering 'fast'"):
        pack(models, lowering="fast")
    with pytest.raises(ValueError, match="at least 2 members"):
        pack(models[:1])
    with pytest.raises(ValueError, match="not made by ek.pack"):
        unpack(models[0])
    with pytest.raises(TypeError, match="keras.Model"):
        unpack("model.keras")
