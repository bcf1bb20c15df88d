"""``align`` on real architectures: keras.applications families with random weights.

Each family at its smallest input (``tests.applications``), with random
BatchNormalization/LayerNormalization scales and offsets, and ConvNeXt's
LayerScales (1e-6 at init, which makes every block nearly the identity) drawn
in [0.5, 1] as a fine-tuned model's are, so that every per-channel vector
carries units too. Aligning keeps each member's function (max probability
change <= 1e-4, where one weight left unpermuted changes it > 1e-2), and a
member whose units were shuffled by a known random permutation is put back
weight for weight. Covered: MobileNet, MobileNetV2, MobileNetV3Small/Large,
EfficientNetB0, EfficientNetV2B0, ResNet50, DenseNet121, InceptionV3 (in
float64, below), NASNetMobile, ConvNeXtTiny and the transfer-learning recipe
here; VGG16, ResNet50V2 and Xception in ``test_align_applications_large.py``.
"""

import functools

import keras
import numpy as np
import pytest

from ensemblekit._graph import get_arrays, iter_layers, set_arrays, weight_refs
from ensemblekit.merge import align
from tests import applications

# Fast (2-6 s a test on 2 CPU cores): MobileNetV2, MobileNetV3Small and the keras.io transfer-learning
# recipe (a base model nested in a new model). Slow-marked (still run in CI): the rest below.
TRANSFER = "transfer:MobileNetV2"
# InceptionV3 is compared in float64: in float32 its 94 BatchNorm layers with random statistics round
# the probabilities of one and the same model to within ~8e-5 of their float64 values (an aligned member
# differed by up to 1.6e-4), while in float64 aligned and original agree to ~2e-13.
FLOAT64 = ("InceptionV3",)
# VGG16, ResNet50V2 and Xception (30-90 s a test: VGG16's Dense 4096 assignments at a 32x32 input) run the
# same checks in test_align_applications_large.py, a file of their own so that pytest-xdist runs them on
# another worker.
FAMILIES = ["MobileNetV2", "MobileNetV3Small", TRANSFER] + [
    pytest.param(name, marks=pytest.mark.slow) for name in (
        "EfficientNetB0", "EfficientNetV2B0", "ResNet50", "DenseNet121", "MobileNet", "MobileNetV3Large",
        "NASNetMobile", "ConvNeXtTiny", "InceptionV3")]


def _family(name):
    return name.split(":")[-1]


def _member(name, seed):
    """``name`` (seeded): random BN/LN scales and offsets and LayerScales, BN statistics of its own activations.

    Statistics that match the activations keep every layer's signal alive, so
    the probabilities depend on every weight (a misplaced unit shows). One
    training-mode pass with momentum 0 stores each BN layer's batch statistics.
    """
    if name == TRANSFER:
        model = applications.transfer_learning(_family(name), seed)
    else:
        model = applications.build(name, seed)
    rng = np.random.default_rng(seed)
    for _, layer in iter_layers(model):
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization)):
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.0, layer.gamma.shape).astype("float32"))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0.0, 0.1, layer.beta.shape).astype("float32"))
            layer.momentum = 0.0
        elif type(layer).__name__ == "LayerScale":  # ConvNeXt's, 1e-6 at init: every block would be ~identity
            layer.gamma.assign(rng.uniform(0.5, 1.0, layer.gamma.shape).astype("float32"))
    if name == "VGG16":  # no BatchNorm: random weights give near-uniform probabilities; a fine-tuned head is sharper
        head = model.get_layer("predictions")
        head.kernel.assign(head.kernel.numpy() * 30.0)
    # the recipe calls its base with training=False: run the base itself
    runner = next((layer for layer in model.layers if isinstance(layer, keras.Model)), model)
    runner(applications.sample(_family(name), rows=32, seed=seed + 1), training=True)
    return model


@functools.cache
def _reference(name):
    """Member 0 of ``name``, built once for both tests."""
    return _member(name, 0)


def _inputs(name):
    return applications.sample(_family(name), rows=4)


@functools.cache
def _float64_model(name):
    """Family ``name`` built once under the float64 dtype policy."""
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        return applications.build(name)
    finally:
        keras.config.set_dtype_policy(policy)


def _in_float64(name, model):
    """The float64 build of family ``name`` holding ``model``'s weights."""
    copy = _float64_model(name)
    set_arrays(copy, [array.astype("float64") for array in get_arrays(model)])
    return copy


def _probabilities(name, model, x):
    if name in FLOAT64:
        model, x = _in_float64(name, model), x.astype("float64")
    outputs = model.predict(x, verbose=0)
    return keras.ops.convert_to_numpy(keras.ops.softmax(outputs)) if name == TRANSFER else outputs


@pytest.mark.parametrize("name", FAMILIES)
def test_aligned_members_predict_the_same_probabilities(name):
    check_aligned_members_predict_the_same_probabilities(name)


@pytest.mark.parametrize("name", FAMILIES)
def test_align_undoes_a_known_random_permutation_of_every_group(name):
    check_align_undoes_a_known_random_permutation(name)


def check_aligned_members_predict_the_same_probabilities(name):
    """Aligning keeps member 1's function, and the check can fail (shared with the large families' module)."""
    members = [_reference(name), _member(name, 1)]
    x = _inputs(name)
    # any permutation keeps the function: the start and one sweep move most groups (convergence is test 2's)
    aligned, perms = align(members, max_iter=1, verbose=0, return_permutations=True)
    assert aligned[0] is members[0]
    assert sum(not np.array_equal(p, np.arange(len(p))) for p in perms[1].values()) > len(perms[1]) // 2
    original = _probabilities(name, members[1], x)
    diff = np.abs(_probabilities(name, aligned[1], x) - original).max()
    assert diff <= 1e-4, f"{name}: aligned member's probabilities differ by {diff:.2e}"
    # the check can fail: one weight left unpermuted (the first that moved) changes the probabilities
    moved, unmoved = next((a, o) for a, o in zip(weight_refs(aligned[1]), weight_refs(members[1]), strict=True)
                          if not np.array_equal(a.numpy(), o.numpy()))
    moved.assign(unmoved.numpy())
    assert np.abs(_probabilities(name, aligned[1], x) - original).max() > 1e-2


def check_align_undoes_a_known_random_permutation(name):
    """A copy of member 0 shuffled by a known permutation is put back weight for weight."""
    member = _reference(name)
    shuffled, spec, weights = applications.shuffled_copy(member)
    kernels = [i for i in spec.axes if weights[i].ndim > 1]
    shuffled_arrays = get_arrays(shuffled)
    assert all(not np.array_equal(shuffled_arrays[i], weights[i]) for i in kernels)
    aligned = align([member, shuffled], verbose=0)[1]
    for ref, got, want in zip(weight_refs(aligned), get_arrays(aligned), weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{name}: {ref.path}")

