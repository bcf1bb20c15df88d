import importlib

import keras
import numpy as np
import pytest

from ensemblekit._graph import get_arrays
from ensemblekit.merge import align, merge
from ensemblekit.merge.permutation import permutation_spec
from tests.conftest import make_mlp

L = keras.layers
align_module = importlib.import_module("ensemblekit.merge.align")  # ek.merge.align is the function


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



def test_weight_matching_follows_units_into_a_nested_model():
    def member(seed):
        keras.utils.set_random_seed(seed)
        inner = keras.Sequential([keras.Input((8,)), L.Dense(12, activation="relu"),
                                  L.Dense(6, activation="relu")], name="base")
        inputs = keras.Input((8,))
        return _randomize(keras.Model(inputs, L.Dense(3)(inner(inputs))), seed)

    models, x = [member(0), member(1)], _inputs((8,))
    aligned, perms = align(models, verbose=0, return_permutations=True)
    assert sorted(len(p) for p in perms[1].values()) == [6, 12]
    assert all(not np.array_equal(p, np.arange(len(p))) for p in perms[1].values())
    np.testing.assert_allclose(aligned[1].predict(x, verbose=0), models[1].predict(x, verbose=0), atol=1e-5)
    # activation matching reads layers by name in the outer model: nested models stay refused
    with pytest.raises(ValueError, match=r"layer 'base' \(Sequential\): nested models are not supported"):
        align(models, method="activation_matching", x=x)


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


def _deep_mlp(seed, depth=12, width=10):
    keras.utils.set_random_seed(seed)
    layers = [L.Dense(width, activation="relu") for _ in range(depth)]
    return _randomize(keras.Sequential([keras.Input((6,)), *layers, L.Dense(3)]), seed)


def test_a_sweep_permutes_each_weight_axis_once_not_the_whole_model_per_group(monkeypatch):
    reference, other = _deep_mlp(0), _deep_mlp(1)
    spec = permutation_spec(reference)
    permuted = []
    original = align_module.permute_weight

    def counting(array, spec, index, perms, skip_axis=None):
        permuted.append((index, skip_axis))
        return original(array, spec, index, perms, skip_axis)

    monkeypatch.setattr(align_module, "permute_weight", counting)
    identity = {g: np.arange(n) for g, n in spec.sizes.items()}
    align_module._ascend(spec, get_arrays(reference), get_arrays(other), identity,
                         np.random.default_rng(0), max_iter=1, verbose=0)
    weight_axes = [(index, axis) for index, entries in spec.axes.items() for axis, _, _ in entries]
    # 12 hidden layers: 11 kernels with 2 unit axes, the first and the output kernel with 1, 12 biases
    assert len(weight_axes) == 11 * 2 + 2 + 12
    assert sorted(permuted) == sorted(weight_axes)


def test_group_cost_reads_only_the_weights_carrying_the_group():
    reference, other = _deep_mlp(0), _deep_mlp(1)
    spec = permutation_spec(reference)
    ref_arrays, other_arrays = get_arrays(reference), get_arrays(other)
    rng = np.random.default_rng(0)
    perms = {g: rng.permutation(n) for g, n in spec.sizes.items()}
    for group in spec.sizes:
        carrying = {index for index, _, _ in spec.weights_of(group)}
        assert len(carrying) == 3 < len(ref_arrays)  # its layer's kernel and bias, the next kernel
        hidden = [[a if i in carrying else None for i, a in enumerate(arrays)]
                  for arrays in (ref_arrays, other_arrays)]
        cost = align_module.group_cost(spec, group, *hidden, perms)
        # the objective's definition: <reference, other with every group but this one permuted>
        others_only = {**perms, group: np.arange(spec.sizes[group])}
        moved = align_module.permute_arrays(other_arrays, spec, others_only)
        want = sum(ref_arrays[i].astype("float64").T @ moved[i].astype("float64") if axis == 1
                   else ref_arrays[i].astype("float64").reshape(spec.sizes[group], -1)
                   @ moved[i].astype("float64").reshape(spec.sizes[group], -1).T
                   for i, axis, _ in spec.weights_of(group))
        np.testing.assert_allclose(cost, want, rtol=1e-12, atol=1e-12)


def _nan_except(array, axis, keep):
    """``array`` as float64 with every slice along ``axis`` but ``keep`` set to NaN."""
    poisoned = np.full(array.shape, np.nan)
    index = [slice(None)] * array.ndim
    index[axis] = keep
    poisoned[tuple(index)] = array[tuple(index)]
    return poisoned


def test_group_cost_change_reads_only_the_moved_units_and_is_exact():
    reference, other = _deep_mlp(0, depth=4), _deep_mlp(1, depth=4)
    spec = permutation_spec(reference)
    ref_arrays, other_arrays = get_arrays(reference), get_arrays(other)
    rng = np.random.default_rng(0)
    before = {g: rng.permutation(n) for g, n in spec.sizes.items()}
    after = {g: p.copy() for g, p in before.items()}
    for p in after.values():
        p[[0, 1]] = p[[1, 0]]  # two units of every group swap
    for group in spec.sizes:
        change = align_module.group_cost_change(spec, group, ref_arrays, other_arrays, before, after)
        cost = align_module.group_cost(spec, group, ref_arrays, other_arrays, before)
        want = align_module.group_cost(spec, group, ref_arrays, other_arrays, after)
        np.testing.assert_allclose(cost + change, want, rtol=1e-12, atol=1e-12)
        assert align_module.group_cost_change(spec, group, ref_arrays, other_arrays, after, after) == 0.0
        # every weight carrying the group, NaN but for the two moved units of its other axis
        ref_seen, other_seen = list(ref_arrays), list(other_arrays)
        for index, axis, _ in spec.weights_of(group):
            for other_axis, other_group, _ in spec.axes[index]:
                if other_axis != axis:
                    ref_seen[index] = _nan_except(ref_arrays[index], other_axis, [0, 1])
                    other_seen[index] = _nan_except(other_arrays[index], other_axis,
                                                    before[other_group][[0, 1]])
        seen = align_module.group_cost_change(spec, group, ref_seen, other_seen, before, after)
        np.testing.assert_array_equal(seen, change)


def test_weight_matching_stops_at_a_point_no_group_can_improve():
    reference, other = _depthwise_cnn(0), _depthwise_cnn(1)
    spec = permutation_spec(reference)
    ref_arrays, other_arrays = get_arrays(reference), get_arrays(other)
    perms = align_module.weight_matching(spec, ref_arrays, other_arrays, seed=3)
    assert any(not np.array_equal(p, np.arange(len(p))) for p in perms.values())
    for group in spec.sizes:
        cost = align_module.group_cost(spec, group, ref_arrays, other_arrays, perms)
        assert not align_module._improve(cost, group, dict(perms))


def test_a_group_is_solved_again_only_after_a_coupled_group_changed(monkeypatch):
    solved = []
    original = align_module._improve
    monkeypatch.setattr(align_module, "_improve",
                        lambda cost, group, perms: solved.append(group) or original(cost, group, perms))
    # one group, coupled to none: the second sweep would solve the same assignment again
    models = [_randomize(make_mlp(s, hidden=8), s) for s in range(2)]
    spec = permutation_spec(models[0])
    identity = {0: np.arange(spec.sizes[0])}
    align_module._ascend(spec, get_arrays(models[0]), get_arrays(models[1]), identity,
                         np.random.default_rng(0), max_iter=100, verbose=0)
    assert solved == [0]
    # two hidden layers share the middle kernel: each is solved again after the other changed
    # (from the identity: the sorted-slices start leaves this pair of MLPs nothing to improve)
    solved.clear()
    models = [_deep_mlp(s, depth=2) for s in range(2)]
    spec = permutation_spec(models[0])
    identity = {g: np.arange(n) for g, n in spec.sizes.items()}
    align_module._ascend(spec, get_arrays(models[0]), get_arrays(models[1]), identity,
                         np.random.default_rng(0), max_iter=100, verbose=0)
    assert sorted(set(solved)) == [0, 1] and len(solved) >= 3


def test_weight_matching_keeps_the_start_whose_ascent_ends_higher(monkeypatch):
    reference, other = _deep_mlp(0), _deep_mlp(1)
    spec = permutation_spec(reference)
    a, b = get_arrays(reference), get_arrays(other)
    ends = []
    original = align_module._ascend
    monkeypatch.setattr(align_module, "_ascend",
                        lambda *args: ends.append(original(*args)) or ends[-1])
    perms = align_module.weight_matching(spec, a, b)
    scores = [align_module.matching_objective(spec, a, b, end) for end in ends]
    assert len(ends) == 2  # the sorted-slices start and the identity
    assert align_module.matching_objective(spec, a, b, perms) == max(scores)


def test_verbose_shows_a_progress_bar_per_sweep_and_zero_is_quiet(capsys):
    models = [_randomize(make_mlp(s, hidden=8), s) for s in range(2)]
    align(models, verbose=0)
    assert capsys.readouterr().out == ""
    align(models)
    out = capsys.readouterr().out
    assert "Aligning member 1" in out and "Sweep 1/100" in out and "1/1" in out
    # one hidden layer between fixed input and output: the start is the optimum, one sweep confirms it
    assert "Weight matching: 1 sweeps, 0 assignments improved" in out


def test_weight_matching_starts_from_sorted_slices_and_undoes_a_permuted_copy_of_a_deep_chain():
    # from the identity (Alg. 1's start) coordinate ascent stops in a local optimum here: 2 groups of 12 wrong
    reference = _deep_mlp(0, depth=12, width=10)
    spec = permutation_spec(reference)
    arrays = get_arrays(reference)
    rng = np.random.default_rng(1)
    shuffle = {g: rng.permutation(n) for g, n in spec.sizes.items()}
    shuffled = align_module.permute_arrays(arrays, spec, shuffle)
    for group in spec.sizes:
        cost = align_module.sorted_group_cost(spec, group, arrays, shuffled)
        # the start does not depend on the other groups' permutations, and is the copy's own assignment
        others = {g: rng.permutation(n) if g != group else np.arange(n) for g, n in spec.sizes.items()}
        again = align_module.sorted_group_cost(spec, group, arrays,
                                               align_module.permute_arrays(shuffled, spec, others))
        np.testing.assert_allclose(again, cost, rtol=1e-12, atol=1e-9)
        np.testing.assert_array_equal(align_module._assign(cost), np.argsort(shuffle[group]))
    perms = align_module.weight_matching(spec, arrays, shuffled)
    assert all(np.array_equal(perms[g], np.argsort(p)) for g, p in shuffle.items())


def test_a_permuted_copy_reaches_the_bound_from_the_first_start_and_stops_there(monkeypatch):
    reference = _deep_mlp(0)
    spec = permutation_spec(reference)
    arrays = get_arrays(reference)
    rng = np.random.default_rng(1)
    shuffle = {g: rng.permutation(n) for g, n in spec.sizes.items()}
    shuffled = align_module.permute_arrays(arrays, spec, shuffle)
    starts = []
    original = align_module._ascend
    monkeypatch.setattr(align_module, "_ascend", lambda *args: starts.append(1) or original(*args))
    perms = align_module.weight_matching(spec, arrays, shuffled)
    assert len(starts) == 1  # the identity start is skipped: nothing can score higher
    for a, b in zip(arrays, align_module.permute_arrays(shuffled, spec, perms), strict=True):
        np.testing.assert_array_equal(a, b)
