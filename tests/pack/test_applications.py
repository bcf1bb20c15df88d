"""ek.pack on every keras.applications family: pack == ensemble, unpack exact, save/load in safe_mode.

K=2 members (seeds 0 and 1) of each family in ``tests.applications.FAMILIES`` and
the keras.io transfer-learning recipe (a base model nested in a new head). Norm
statistics, LayerScale and the input Normalization are randomized per member, so
the members' probabilities differ from each other and from uniform and the
per-member constant form (``MemberConstants``) is exercised. Each family's
members are built and packed once for the module.
"""

import dataclasses

import keras
import numpy as np
import pytest

from ensemblekit import _graph
from ensemblekit.compose import ensemble
from ensemblekit.costs import macs
from ensemblekit.pack import (
    GroupedConv,
    GroupedDepthwiseConv,
    GroupedScale,
    GroupedSeparableConv,
    MemberConstants,
    pack,
    unpack,
)
from tests.applications import FAMILIES, FAST, build, sample, transfer_learning

TRANSFER = "MobileNetV2"  # the transfer-learning recipe is checked on this family
CASES = [pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in FAMILIES]
CASES.append(pytest.param(f"transfer:{TRANSFER}"))
# Grouped forms a family's packed model must hold (beyond GroupedDense/GroupedConv and norms).
EXPECTED_FORMS = {
    "MobileNet": {"depthwise"},
    "MobileNetV2": {"depthwise"},
    "MobileNetV3Small": {"depthwise"},
    "MobileNetV3Large": {"depthwise"},
    "EfficientNetB0": {"depthwise", "per-member constants"},
    "EfficientNetV2B0": {"depthwise"},
    "Xception": {"separable"},
    "NASNetMobile": {"separable"},
    "ConvNeXtTiny": {"scale", "groups > 1"},
    f"transfer:{TRANSFER}": {"depthwise"},
}


def grouped_forms(model):
    """The grouped forms among ``model``'s layers, by name."""
    forms = {
        "depthwise": lambda layer: type(layer) is GroupedDepthwiseConv,
        "separable": lambda layer: isinstance(layer, GroupedSeparableConv),
        "per-member constants": lambda layer: isinstance(layer, MemberConstants),
        "scale": lambda layer: isinstance(layer, GroupedScale),
        "groups > 1": lambda layer: isinstance(layer, GroupedConv) and layer.groups > 1,
    }
    return {name for name, test in forms.items() if any(test(layer) for layer in model.layers)}


def randomize(model, seed):
    """Per-member norm statistics, LayerScale gammas and input Normalization constants."""
    rng = np.random.default_rng(seed)
    for _, layer in _graph.iter_layers(model):
        kind = type(layer).__name__
        for variable in layer.weights:
            name, shape = variable.name, tuple(variable.shape)
            if kind == "Normalization" and name in ("mean", "variance"):
                low, high = (0.3, 0.6) if name == "mean" else (0.04, 0.09)  # after Rescaling(1/255)
                value = rng.uniform(low, high, size=shape)
            elif name in ("gamma", "moving_variance"):
                value = rng.uniform(0.8, 1.2, size=shape)
            elif name in ("beta", "moving_mean"):
                value = rng.normal(0.0, 0.05, size=shape)
            else:
                continue
            variable.assign(value.astype(variable.dtype))
        if hasattr(layer, "finalize_state"):
            layer.finalize_state()  # Normalization derives its constants from its weights
    return model


def member(case, seed):
    if case.startswith("transfer:"):
        return randomize(transfer_learning(case.split(":")[1], seed), seed)
    return randomize(build(case, seed), seed)


def inputs(case, members):
    """Two rows in [0, 255] for families that preprocess themselves (and VGG16, whose logits need
    that scale: it has no normalization), in [-1, 1] for the others (not saturating NASNet)."""
    family = case.split(":")[-1]
    x = sample(family, rows=2)
    preprocessed = any(type(layer).__name__ in ("Rescaling", "Normalization")
                       for _, layer in _graph.iter_layers(members[0]))
    return x if preprocessed or family == "VGG16" else x / 127.5 - 1.0


def run(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


@dataclasses.dataclass
class Packed:
    case: str
    members: list
    x: np.ndarray
    packed: keras.Model
    expected: np.ndarray  # ek.ensemble(members, "mean") on x
    output: np.ndarray  # the packed model on x


@pytest.fixture(scope="module", params=CASES)
def family(request):
    case = request.param
    members = [member(case, seed) for seed in (0, 1)]
    x = inputs(case, members)
    packed = pack(members, "mean")
    yield Packed(case, members, x, packed, run(ensemble(members, "mean"), x), run(packed, x))
    keras.backend.clear_session()


def test_pack_equals_ensemble(family):
    member_probs = [keras.ops.convert_to_numpy(keras.ops.softmax(run(m, family.x)))
                    if family.case.startswith("transfer:") else run(m, family.x) for m in family.members]
    # a real check: the members differ and their probabilities are not saturated
    assert np.abs(member_probs[0] - member_probs[1]).max() > 1e-3
    assert max(p.max() for p in member_probs) < 0.999
    np.testing.assert_allclose(family.output, family.expected, atol=1e-5, rtol=0)
    assert macs(family.packed) == sum(macs(m) for m in family.members)


def test_packed_model_is_flat_and_uses_the_grouped_forms(family):
    assert not any(isinstance(layer, keras.Model) for layer in family.packed.layers)
    assert grouped_forms(family.packed) == EXPECTED_FORMS.get(family.case, set())


def test_unpack_returns_the_members_exactly(family):
    for original, back in zip(family.members, unpack(family.packed), strict=True):
        assert back.name == original.name
        assert [type(layer).__name__ for layer in back.layers] == [
            type(layer).__name__ for layer in original.layers]  # nesting kept
        weights, weights_back = original.get_weights(), back.get_weights()
        assert len(weights) == len(weights_back)
        for a, b in zip(weights, weights_back, strict=True):
            np.testing.assert_array_equal(a, b)


def test_save_and_load_in_safe_mode(family, tmp_path):
    path = tmp_path / "packed.keras"
    family.packed.save(path)
    loaded = keras.saving.load_model(path)  # safe_mode=True, no custom_objects
    np.testing.assert_allclose(run(loaded, family.x), family.output, atol=1e-6, rtol=0)
