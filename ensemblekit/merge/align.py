"""``align``: permute hidden units so that models line up before merging (Git Re-Basin).

Ainsworth, Hayase & Srinivasa (2022), "Git Re-Basin: Merging models modulo
permutation symmetries": weight matching (Sec. 3.2, Alg. 1) solves one linear
assignment per permutation group, holding the others fixed, and sweeps the
groups in random order until no assignment improves; activation matching
(Sec. 3.1) matches units by the correlation of their activations on data.
"""

from __future__ import annotations

import keras
import numpy as np
from scipy.optimize import linear_sum_assignment

from ensemblekit._graph import check_same_architecture, get_arrays, set_arrays
from ensemblekit._io import load_members, predict
from ensemblekit._validate import check_choice, member_label
from ensemblekit.merge.permutation import permutation_spec

METHODS = ("weight_matching", "activation_matching")


def _unit_major(array, axis, units):
    """The slices of ``array`` along ``axis`` at ``units`` (``(tile, size)`` indices) as ``(size, -1)``."""
    tile, size = units.shape
    moved = np.moveaxis(np.take(array, units.ravel(), axis=axis), axis, 0)
    moved = moved.reshape((tile, size) + moved.shape[1:])
    return np.swapaxes(moved, 0, 1).reshape(size, -1)


def _axis_index(spec, index, axis, length, perms):
    """Where each position along ``axis`` of weight ``index`` reads from under ``perms``."""
    order = np.arange(length)
    for entry_axis, group, _ in spec.axes[index]:
        if entry_axis == axis:
            units = spec.unit_positions(index, axis, group)
            order[units.ravel()] = units[:, perms[group]].ravel()
    return order


def permute_arrays(arrays, spec, perms, skip=None):
    """Apply ``perms`` (``{group: index array}``) to ``arrays`` along the spec's axes.

    Args:
        arrays: weight arrays in ``weight_refs`` order.
        spec: the ``PermutationSpec``.
        perms: ``{group: perm}``; unit ``i`` after is unit ``perm[i]`` before.
        skip: optional ``(weight index, axis)`` left unpermuted (weight matching's
            "all other groups" view).

    Returns:
        The permuted arrays (the others shared with ``arrays``).

    Example:
        >>> import keras, numpy as np
        >>> from ensemblekit.merge.permutation import permutation_spec
        >>> m = keras.Sequential([keras.Input((1,)), keras.layers.Dense(3), keras.layers.Dense(1)])
        >>> arrays = [np.array([[0., 1., 2.]]), np.zeros(3), np.ones((3, 1)), np.zeros(1)]
        >>> permute_arrays(arrays, permutation_spec(m), {0: np.array([2, 0, 1])})[0]
        array([[2., 0., 1.]])
    """
    permuted = list(arrays)
    for index, entries in spec.axes.items():
        array = arrays[index]
        for axis in dict.fromkeys(entry[0] for entry in entries):
            if (index, axis) != skip:
                array = np.take(array, _axis_index(spec, index, axis, array.shape[axis], perms), axis=axis)
        permuted[index] = array
    return permuted


def weight_matching(spec, reference, other, seed=0, max_iter=100):
    """Permutations of ``other``'s units that maximise ``Σ <W_ref, P W_other>`` (Alg. 1).

    Args:
        spec: the ``PermutationSpec`` of the architecture.
        reference, other: lists of weight arrays (``weight_refs`` order).
        seed: order of the sweeps over groups.
        max_iter: at most this many sweeps.

    Returns:
        ``{group: perm}``; unit ``i`` of the aligned model is unit ``perm[i]`` of ``other``.
    """
    rng = np.random.default_rng(seed)
    reference = [np.asarray(a, dtype="float64") for a in reference]
    other = [np.asarray(a, dtype="float64") for a in other]
    perms = {g: np.arange(n) for g, n in spec.sizes.items()}
    members = {g: spec.weights_of(g) for g in spec.sizes}
    for _ in range(max_iter):
        improved = False
        for group in rng.permutation(sorted(spec.sizes)):
            size = spec.sizes[group]
            cost = np.zeros((size, size))
            for index, axis, _ in members[group]:
                current = permute_arrays(other, spec, perms, skip=(index, axis))[index]
                units = spec.unit_positions(index, axis, group)
                cost += _unit_major(reference[index], axis, units) @ _unit_major(current, axis, units).T
            new = linear_sum_assignment(cost, maximize=True)[1]
            rows = np.arange(size)
            if cost[rows, new].sum() > cost[rows, perms[group]].sum() + 1e-12 * abs(cost).sum():
                perms[group], improved = new, True
        if not improved:
            break
    return perms


def activation_matching(spec, reference_model, other_model, x, batch_size=256):
    """Permutations matching units by the correlation of their activations on ``x`` (Sec. 3.1)."""
    groups = sorted(spec.sizes)
    perms = {}
    for group in groups:
        layers = spec.sources[group]
        cost = np.zeros((spec.sizes[group],) * 2)
        for layer in layers:
            ref_features = _features(reference_model, layer.name, x, batch_size)
            other_layer = other_model.layers[reference_model.layers.index(layer)]
            other_features = _features(other_model, other_layer.name, x, batch_size)
            cost += _correlation(ref_features, other_features)
        perms[group] = linear_sum_assignment(cost, maximize=True)[1]
    return perms


def _features(model, layer_name, x, batch_size):
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    extractor = keras.Model(inputs, model.get_layer(layer_name).output)
    out = np.asarray(predict(extractor, x, batch_size), dtype="float64")
    return out.reshape(-1, out.shape[-1])


def _correlation(a, b):
    a = (a - a.mean(0)) / (a.std(0) + 1e-8)
    b = (b - b.mean(0)) / (b.std(0) + 1e-8)
    return a.T @ b / len(a)


def align(models, reference=0, method="weight_matching", x=None, seed=0, max_iter=100,
          return_permutations=False, safe_mode=True, verbose=0):
    """Permute every model's hidden units to line up with the reference model.

    The permutation groups (which axes of which weights move together) come
    from the channel-coupling graph shared with ``prune.channels``
    (``ensemblekit.merge.permutation``): Dense, Conv1D/2D/3D(Transpose),
    Depthwise/SeparableConv, Embedding, BatchNormalization/LayerNormalization,
    residual ``Add``-like merges, ``Concatenate`` and ``Flatten``. The outputs
    of every aligned model equal the input model's up to float rounding; only
    the order of hidden units changes, which makes a following ``merge``
    meaningful for independently trained models.

    Args:
        models: list of ``keras.Model`` or paths, one architecture.
        reference: index of the model the others are aligned to.
        method: ``"weight_matching"`` (Ainsworth et al., 2022, Alg. 1; no data)
            or ``"activation_matching"`` (Sec. 3.1; needs ``x``).
        x: inputs for activation matching.
        seed: the random order of weight matching's sweeps.
        max_iter: at most this many sweeps over the groups.
        return_permutations: also return ``[{group: perm}]`` per model.

    Returns:
        A list of models (the reference unchanged, the others permuted
        clones), and the permutations if ``return_permutations``.

    Example:
        >>> import keras, numpy as np
        >>> from ensemblekit.merge import align, merge
        >>> make = lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(2)])
        >>> a, b = make(), make()
        >>> aligned = align([a, b])
        >>> x = np.ones((1, 4), "float32")
        >>> bool(np.allclose(aligned[1].predict(x, verbose=0), b.predict(x, verbose=0), atol=1e-5))
        True
    """
    check_choice(method, METHODS, "align method")
    members = load_members(models, min_count=2, what="align", safe_mode=safe_mode)
    if not isinstance(reference, int) or not 0 <= reference < len(members):
        raise ValueError(f"reference must be a member index in [0, {len(members) - 1}], got {reference!r}.")
    if method == "activation_matching" and x is None:
        raise ValueError("align method 'activation_matching' needs x= (inputs to correlate units on).")
    check_same_architecture(members, [member_label(i, m) for i, m in enumerate(members)])
    spec = permutation_spec(members[reference])
    reference_arrays = get_arrays(members[reference])
    aligned, permutations = [], []
    progress = keras.utils.Progbar(len(members), verbose=verbose, unit_name="model")
    for index, model in enumerate(members):
        if index == reference:
            aligned.append(model)
            permutations.append({g: np.arange(n) for g, n in spec.sizes.items()})
        else:
            if method == "weight_matching":
                perms = weight_matching(spec, reference_arrays, get_arrays(model), seed, max_iter)
            else:
                perms = activation_matching(spec, members[reference], model, x)
            clone = keras.models.clone_model(model)
            clone.name = f"{model.name}_aligned"
            set_arrays(clone, permute_arrays(get_arrays(model), spec, perms))
            aligned.append(clone)
            permutations.append(perms)
        progress.add(1)
    return (aligned, permutations) if return_permutations else aligned
