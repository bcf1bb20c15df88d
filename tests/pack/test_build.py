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


def make_nested(seed):
    """A base model nested in a new head (the keras.io transfer-learning recipe); the base nests a
    Sequential block whose layer names clash with the head's."""
    keras.utils.set_random_seed(seed)
    block = keras.Sequential([L.Conv2D(4, 3, padding="same", name="conv"), L.BatchNormalization(name="bn")],
                             name="block")
    x = keras.Input((8, 8, 3))
    base = keras.Model(x, L.ReLU(name="relu")(block(L.Rescaling(1 / 255, name="scale")(x))), name="base")
    inputs = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 1, name="conv")(base(inputs, training=False))
    outputs = L.Dense(3, name="dense")(L.GlobalAveragePooling2D(name="pool")(h))
    return keras.Model(inputs, outputs, name=f"nested_{seed}")


def test_nested_models_are_flattened_and_unpacked_with_their_nesting(tmp_path):
    models = randomize_norms([make_nested(seed) for seed in range(2)])
    x = np.random.default_rng(0).uniform(0, 255, size=(4, 8, 8, 3)).astype("float32")
    packed = pack(models, "mean")
    assert not any(isinstance(layer, keras.Model) for layer in packed.layers)
    np.testing.assert_allclose(packed.predict(x, verbose=0), ensemble(models).predict(x, verbose=0),
                               atol=1e-5, rtol=0)
    packed.save(tmp_path / "packed.keras")
    for original, back in zip(models, unpack(keras.saving.load_model(tmp_path / "packed.keras")),
                              strict=True):
        assert [layer.name for layer in back.layers] == [layer.name for layer in original.layers]
        inner, inner_back = original.get_layer("base").get_layer("block"), back.get_layer("base").get_layer("block")
        assert isinstance(inner_back, keras.Sequential)
        for a, b in zip(inner.get_weights(), inner_back.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)  # by position, although "conv" names two layers
        for a, b in zip(original.get_weights(), back.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def make_squeeze_excite(seed, scale=1 / 255):
    """Rescaling, depthwise on the shared input, an SE gate (Reshape + Multiply), separable conv, ops."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((6, 6, 3))
    h = L.DepthwiseConv2D(3, padding="same")(L.Rescaling(scale)(x))
    h = L.Conv2D(8, 1, activation="relu")(h)
    gate = L.Reshape((1, 1, 8))(L.GlobalAveragePooling2D()(h))
    h = L.Multiply()([h, L.Conv2D(8, 1, activation="sigmoid")(gate)])
    h = L.SeparableConv2D(6, 3, padding="same")(h)
    h = keras.ops.add(L.ReLU(6.0)(h + 3.0) * (1.0 / 6.0), h)  # hard-sigmoid ops (MobileNetV3)
    return keras.Model(x, L.Dense(4)(L.GlobalAveragePooling2D()(h)), name=f"se_{seed}")


@pytest.mark.parametrize("scales", [(1 / 255, 1 / 255), (1 / 255, 1 / 127.5)])
def test_squeeze_excite_blocks_and_input_constants_pack(scales):
    from ensemblekit.pack import GroupedDepthwiseConv, GroupedSeparableConv, MemberConstants

    models = [make_squeeze_excite(seed, scale) for seed, scale in enumerate(scales)]
    x = np.random.default_rng(0).uniform(0, 255, size=(3, 6, 6, 3)).astype("float32")
    packed = pack(models, "logit_mean")
    np.testing.assert_allclose(packed.predict(x, verbose=0), ensemble(models, "logit_mean").predict(x, verbose=0),
                               atol=1e-5, rtol=0)
    kinds = {type(layer) for layer in packed.layers}
    assert {GroupedDepthwiseConv, GroupedSeparableConv} <= kinds
    assert (MemberConstants in kinds) == (scales[0] != scales[1])  # equal constants are carried once
    for original, back in zip(models, unpack(packed), strict=True):
        assert back.get_config()["layers"][1]["config"]["scale"] == original.layers[1].scale
        for a, b in zip(original.get_weights(), back.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_pointwise_convolutions_get_the_dense_lowering():
    from ensemblekit.pack import GroupedConv

    def build(seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((6, 6, 3))
        h = L.Conv2D(4, 1, name="pointwise")(L.Conv2D(4, 3, name="spatial")(x))
        return keras.Model(x, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="pw2")(h))))

    convs = {layer.name: layer.lowering for layer in pack([build(0), build(1)]).layers
             if isinstance(layer, GroupedConv)}
    assert convs == {"spatial": "loop", "pointwise": "auto", "pw2": "auto"}


def test_pack_rejects_a_layer_called_twice():
    def build(seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((8,))
        shared = L.Dense(8, name="shared")
        return keras.Model(x, L.Dense(2)(shared(shared(x))))

    with pytest.raises(ValueError, match=r"layer 'shared' \(Dense\) is called more than once"):
        pack([build(0), build(1)])


def test_pack_rejects_different_op_constants():
    def build(seed, constant):
        keras.utils.set_random_seed(seed)
        x = keras.Input((8,))
        return keras.Model(x, L.Dense(2)(L.Dense(8)(x) + constant))

    with pytest.raises(ValueError, match=r"member 1 .* is called with different inputs or arguments"):
        pack([build(0, 3.0), build(1, 2.0)])


def test_pack_bad_arguments():
    models = [make_mlp(0), make_mlp(1)]
    with pytest.raises(ValueError, match="method 'median' is not defined for task 'multiclass'"):
        pack(models, reduce="median")
    with pytest.raises(ValueError, match="Unknown reduce 'blend'"):
        pack(models, reduce="blend")
    with pytest.raises(ValueError, match="Unknown lowering 'fast'"):
        pack(models, lowering="fast")
    with pytest.raises(ValueError, match="at least 2 members"):
        pack(models[:1])
    with pytest.raises(ValueError, match="not made by ek.pack"):
        unpack(models[0])
    with pytest.raises(TypeError, match="keras.Model"):
        unpack("model.keras")
