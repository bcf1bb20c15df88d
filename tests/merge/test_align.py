import keras
import numpy as np
import pytest

from ensemblekit.merge import align, merge
from ensemblekit.merge.permutation import permutation_spec
from tests.conftest import make_mlp

L = keras.layers


def _randomize(model, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = rng.normal(scale=scale, size=variable.shape)
        if "variance" in variable.path:
            value = np.abs(value) + 0.5
        variable.assign(value.astype("float32"))
    return model


def _cnn(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 1))
    h = L.ReLU()(L.BatchNormalization()(L.Conv1D(8, 3, padding="same")(inputs)))
    r = L.BatchNormalization()(L.Conv1D(8, 3, padding="same")(h))
    h = L.Add()([h, L.ReLU()(r)])
    h = L.Flatten()(L.MaxPooling1D()(h))
    h = L.LayerNormalization()(L.Dense(12, activation="relu")(h))
    return _randomize(keras.Model(inputs, L.Dense(3)(h)), seed)


def _depthwise_cnn(seed):
    """Depthwise, separable and transposed convolutions, a last-axis Concatenate, then Flatten."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    h = L.Conv2D(6, 3, padding="same", name="stem")(inputs)
    h = L.ReLU()(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", name="dw")(h)))
    a = L.SeparableConv2D(4, 3, padding="same", name="sep")(h)
    b = L.Conv2DTranspose(3, 3, padding="same", name="up")(h)
    h = L.Flatten()(L.MaxPooling2D(3)(L.Concatenate()([a, b])))
    return _randomize(keras.Model(inputs, L.Dense(3)(L.Activation("tanh")(h))), seed, scale=0.3)


def _embedding_model(seed):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((5,), dtype="int32")
    h = L.Embedding(12, 8, name="emb")(tokens)
    h = L.Add()([h, L.Dense(8, activation="relu")(L.LayerNormalization()(h))])
    return _randomize(keras.Model(tokens, L.Dense(3)(L.GlobalAveragePooling1D()(h))), seed)


def _inputs(shape):
    rng = np.random.default_rng(0)
    if shape == "tokens":
        return rng.integers(0, 12, size=(64, 5))
    return rng.normal(size=(64,) + shape).astype("float32")


@pytest.mark.parametrize("build,shape", [
    (lambda s: _randomize(make_mlp(s, hidden=32), s), (8,)),
    (_cnn, (16, 1)),
    (_depthwise_cnn, (6, 6, 2)),
    (_embedding_model, "tokens"),
])
@pytest.mark.parametrize("method", ["weight_matching", "activation_matching"])
def test_aligned_models_predict_exactly_like_the_originals(build, shape, method):
    models = [build(0), build(1), build(2)]
    x = _inputs(shape)
    aligned, perms = align(models, method=method, x=x, return_permutations=True)
    assert aligned[0] is models[0]
    for original, moved in zip(models, aligned, strict=True):
        np.testing.assert_allclose(moved.predict(x, verbose=0), original.predict(x, verbose=0), atol=1e-5)
    assert any(not np.array_equal(p, np.arange(len(p))) for p in perms[1].values())


def test_weight_matching_recovers_a_known_permutation():
    model = _randomize(make_mlp(0, hidden=32), 0)
    spec = permutation_spec(model)
    shuffled = keras.models.clone_model(model)
    rng = np.random.default_rng(1)
    perm = rng.permutation(32)
    kernel, bias, out_kernel, out_bias = model.get_weights()
    shuffled.set_weights([kernel[:, perm], bias[perm], out_kernel[perm], out_bias])
    aligned = align([model, shuffled])[1]
    for got, want in zip(aligned.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert list(spec.sizes.values()) == [32]


@pytest.mark.slow
def test_align_then_average_recovers_independent_mnist1d_mlps(mnist1d):
    (x, y), (xt, yt) = mnist1d
    x, xt = x[..., 0], xt[..., 0]

    def trained(seed):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((40,)), L.Dense(128, activation="relu"),
                                  L.Dense(128, activation="relu"), L.Dense(10)])
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, epochs=12, batch_size=128, verbose=0)
        return model

    a, b = trained(0), trained(1)
    acc = lambda m: float(np.mean(m.predict(xt, verbose=0).argmax(1) == yt))  # noqa: E731
    members = (acc(a) + acc(b)) / 2
    naive, aligned = acc(merge([a, b])), acc(merge(align([a, b])))
    assert naive < members - 0.15
    assert aligned > naive + 0.15
    assert aligned > members - 0.12


def test_align_errors():
    with pytest.raises(ValueError, match="needs x="):
        align([make_mlp(0), make_mlp(1)], method="activation_matching")
    with pytest.raises(ValueError, match="reference must be a member index"):
        align([make_mlp(0), make_mlp(1)], reference=2)
    with pytest.raises(ValueError, match="incompatible weights"):
        align([make_mlp(0), make_mlp(1, hidden=5)])


def test_align_accepts_members_loaded_from_keras_files_and_used_elsewhere(tmp_path):
    # A Sequential loaded from .keras (and a member also called inside an ensemble)
    # has layer call nodes from other graphs; only the model's own graph counts.
    import ensemblekit as ek

    def member(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                                 keras.layers.Dense(3)])

    paths = []
    for seed in range(2):
        paths.append(str(tmp_path / f"m{seed}.keras"))
        member(seed).save(paths[-1])
    models = [keras.saving.load_model(path) for path in paths]
    ek.ensemble(models)
    x = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
    aligned = ek.align(models)
    np.testing.assert_allclose(aligned[1].predict(x, verbose=0), models[1].predict(x, verbose=0),
                               atol=1e-5, rtol=0)



def test_depthwise_kernels_are_permuted_with_their_input_channels():
    reference, other = _depthwise_cnn(0), _depthwise_cnn(1)
    aligned, perms = align([reference, other], return_permutations=True)
    spec = permutation_spec(reference)
    stem = next(g for g, layers in spec.sources.items() if [layer.name for layer in layers] == ["stem"])
    perm = perms[1][stem]
    assert not np.array_equal(perm, np.arange(6))
    np.testing.assert_array_equal(aligned[1].get_layer("dw").get_weights()[0],
                                  other.get_layer("dw").get_weights()[0][:, :, perm, :])
    x = _inputs((6, 6, 2))
    np.testing.assert_allclose(aligned[1].predict(x, verbose=0), other.predict(x, verbose=0), atol=1e-5)


def test_align_and_prune_channels_see_the_same_groups_of_a_residual_model():
    from ensemblekit.prune import channels
    from tests.prune.conftest import make_residual_cnn

    model = make_residual_cnn(width=8)
    spec = permutation_spec(model)
    _, report = channels(model, 0.5, return_report=True)
    permuted = sorted((spec.sizes[g], [layer.name for layer in spec.sources[g]]) for g in spec.sizes)
    pruned = sorted((g.size, g.layers) for g in report.groups if g.reason is None)
    assert permuted == pruned == [(8, ["conv_a", "conv_b"]), (16, ["conv_c"]), (16, ["hidden"])]
