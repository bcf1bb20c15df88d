import keras
import numpy as np
import pytest

from ensemblekit.merge import align, merge
from ensemblekit.merge.permutation import permutation_spec
from tests.conftest import make_mlp

L = keras.layers


def _randomize(model, seed):
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = rng.normal(scale=0.5, size=variable.shape)
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


@pytest.mark.parametrize("build,shape", [
    (lambda s: _randomize(make_mlp(s, hidden=32), s), (8,)),
    (_cnn, (16, 1)),
])
@pytest.mark.parametrize("method", ["weight_matching", "activation_matching"])
def test_aligned_models_predict_exactly_like_the_originals(build, shape, method):
    models = [build(0), build(1), build(2)]
    x = np.random.default_rng(0).normal(size=(64,) + shape).astype("float32")
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

