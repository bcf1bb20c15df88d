"""``align``: permute hidden units so that models line up before merging (Git Re-Basin).

Ainsworth, Hayase & Srinivasa (2022), "Git Re-Basin: Merging models modulo
permutation symmetries": weight matching (Sec. 3.2, Alg. 1) solves one linear
assignment per permutation group, holding the others fixed, and sweeps the
groups in random order until no assignment improves (here from a start
that matches units by their sorted weights, ``sorted_group_cost``); activation matching
(Sec. 3.1) matches units by the correlation of their activations on data.
"""

from __future__ import annotations

import keras
import numpy as np
from scipy.optimize import linear_sum_assignment

from ensemblekit._data import check_reiterable, collect
from ensemblekit._graph import check_same_architecture, get_arrays, weight_refs
from ensemblekit._io import load_members
from ensemblekit._validate import check_choice, member_label
from ensemblekit.merge.permutation import permutation_spec

METHODS = ("weight_matching", "activation_matching")


def _unit_major(array, axis, units):
    """The slices of ``array`` along ``axis`` at ``units`` (``(tile, size)`` indices) as float64 ``(size, -1)``."""
    tile, size = units.shape
    moved = np.moveaxis(np.take(array, units.ravel(), axis=axis), axis, 0)
    moved = moved.reshape((tile, size) + moved.shape[1:])
    return np.swapaxes(moved, 0, 1).reshape(size, -1).astype("float64", copy=False)


def _axis_index(spec, index, axis, length, perms):
    """Where each position along ``axis`` of weight ``index`` reads from under ``perms``."""
    order = np.arange(length)
    for entry_axis, group, _ in spec.axes[index]:
        if entry_axis == axis:
            units = spec.unit_positions(index, axis, group)
            order[units.ravel()] = units[:, perms[group]].ravel()
    return order


def permute_weight(array, spec, index, perms, skip_axis=None):
    """Weight ``index`` of the spec with ``perms`` applied along each of its unit axes.

    Args:
        array: the weight's array.
        spec: the ``PermutationSpec``.
        index: the weight's index in ``weight_refs`` order.
        perms: ``{group: perm}``; unit ``i`` after is unit ``perm[i]`` before.
        skip_axis: an axis left as it is (weight matching's view of the other
            groups while it solves the group on this axis).

    Returns:
        The permuted array (``array`` itself when no axis moves).

    Example:
        >>> import keras, numpy as np
        >>> from ensemblekit.merge.permutation import permutation_spec
        >>> m = keras.Sequential([keras.Input((1,)), keras.layers.Dense(3), keras.layers.Dense(1)])
        >>> permute_weight(np.array([[0., 1., 2.]]), permutation_spec(m), 0, {0: np.array([2, 0, 1])})
        array([[2., 0., 1.]])
    """
    for axis in dict.fromkeys(entry[0] for entry in spec.axes.get(index, ())):
        if axis != skip_axis:
            array = np.take(array, _axis_index(spec, index, axis, array.shape[axis], perms), axis=axis)
    return array


def permute_arrays(arrays, spec, perms):
    """Apply ``perms`` (``{group: index array}``) to ``arrays`` (``weight_refs`` order), one weight at a time.

    Example:
        >>> import keras, numpy as np
        >>> from ensemblekit.merge.permutation import permutation_spec
        >>> m = keras.Sequential([keras.Input((1,)), keras.layers.Dense(3), keras.layers.Dense(1)])
        >>> arrays = [np.array([[0., 1., 2.]]), np.zeros(3), np.ones((3, 1)), np.zeros(1)]
        >>> permute_arrays(arrays, permutation_spec(m), {0: np.array([2, 0, 1])})[0]
        array([[2., 0., 1.]])
    """
    return [permute_weight(array, spec, index, perms) for index, array in enumerate(arrays)]


def group_cost(spec, group, reference, other, perms):
    """Weight matching's ``(size, size)`` objective for ``group``, all other groups held at ``perms``.

    ``cost[i, j] = Σ_w <unit i of reference w, unit j of P(other w)>`` over the
    weights ``w`` carrying ``group`` only, each with the other groups'
    permutations applied along its other axes (Ainsworth et al., 2022, Eq. 3):
    one term per weight axis, so a sweep reads every weight axis once.

    Args:
        spec: the ``PermutationSpec``.
        group: the group solved.
        reference, other: lists of weight arrays (``weight_refs`` order).
        perms: ``{group: perm}``, the current permutations of ``other``.

    Returns:
        A float64 ``(size, size)`` array.
    """
    rows, columns = [], []
    for index, axis, _ in spec.weights_of(group):
        units = spec.unit_positions(index, axis, group)
        rows.append(_unit_major(reference[index], axis, units))
        columns.append(_unit_major(permute_weight(other[index], spec, index, perms, skip_axis=axis), axis, units))
    return _gram(rows, columns, spec.sizes[group])


def _gram(rows, columns, size):
    """``Σ_k rows[k] @ columns[k].T`` as one product of the side-by-side slices (one ``(size, size)`` array)."""
    if not rows:
        return np.zeros((size, size))
    return np.concatenate(rows, axis=1) @ np.concatenate(columns, axis=1).T


SORTED_POINTS = 64  # order statistics kept per sorted block of units (sorted_group_cost)


def _sort_axis(array, spec, index, axis):
    """``array`` with each occurrence of each group along ``axis`` sorted, then cut to ``SORTED_POINTS``.

    An occurrence of ``n > SORTED_POINTS`` units keeps ``SORTED_POINTS``
    evenly spaced order statistics, scaled by ``sqrt(n / SORTED_POINTS)`` so
    inner products keep their size; positions no group holds are kept. The
    result does not depend on how those groups are permuted, and sorting one
    axis after another keeps that for every axis sorted.
    """
    blocks = [block for entry_axis, group, _ in spec.axes[index] if entry_axis == axis
              for block in spec.unit_positions(index, axis, group)]
    held = np.concatenate(blocks) if blocks else np.zeros(0, "int64")
    parts = [np.take(array, np.setdiff1d(np.arange(array.shape[axis]), held), axis=axis)]
    for block in blocks:
        part = np.sort(np.take(array, block, axis=axis), axis=axis)
        if len(block) > SORTED_POINTS:
            points = np.linspace(0, len(block) - 1, SORTED_POINTS).round().astype("int64")
            part = np.take(part, points, axis=axis) * np.sqrt(len(block) / SORTED_POINTS)
        parts.append(part)
    return np.concatenate(parts, axis=axis)


def sorted_group_cost(spec, group, reference, other):
    """Weight matching's starting score for ``group``: ``-|sorted unit i - sorted unit j|^2 / 2``.

    Each unit's slices of the weights carrying ``group`` are sorted along
    their other unit axes (:func:`_sort_axis`, which keeps at most
    ``SORTED_POINTS`` order statistics of each). By the rearrangement
    inequality ``<sorted unit i, sorted unit j>`` is the largest inner
    product the two units' slices can have over arrangements of the units on
    the other axes: an optimistic score of how well unit ``i`` of
    ``reference`` can match unit ``j`` of ``other``, whatever the other
    groups' permutations, so every group can be solved at once. The score is
    that inner product less row and column constants (the sorted slices'
    squared norms): the same assignment, which the LAP solver finds far
    faster than on near-equal inner products. Weight matching starts from these
    assignments instead of the identity (an arbitrary, for unrelated models
    random, starting point). A permuted copy of the reference has equal
    sorted slices unit for unit, so (when no two units of a group are equal)
    each starting assignment is already the copy's own: the global optimum,
    which the first sweep confirms (from the identity, ascent can stop in a
    local optimum first).

    Returns:
        A float64 ``(size, size)`` array.
    """
    slices = ([], [])
    for index, axis, _ in spec.weights_of(group):
        units = spec.unit_positions(index, axis, group)
        for side, array in zip(slices, (reference[index], other[index]), strict=True):
            array = np.asarray(array)
            for other_axis in dict.fromkeys(entry[0] for entry in spec.axes[index]):
                if other_axis != axis:
                    array = _sort_axis(array, spec, index, other_axis)
            side.append(_unit_major(array, axis, units))
    size = spec.sizes[group]
    norms = [sum((np.einsum("ij,ij->i", s, s) for s in side), np.zeros(size)) for side in slices]
    return _gram(*slices, size) - (norms[0][:, None] + norms[1][None, :]) / 2


def group_cost_change(spec, group, reference, other, before, after):
    """How :func:`group_cost` changes from permutations ``before`` to ``after``, from the moved units only.

    Each term of the cost is a sum over the positions along the weight's
    other axes, so only the positions whose source moved contribute to the
    change: once the assignments settle and a few units move per sweep, a
    group's cost is kept up to date for a few percent of a recomputation.
    The other axes are moved one at a time (the cost is linear in each).

    Returns:
        A float64 ``(size, size)`` array, or ``0.0`` when nothing it reads moved.
    """
    change = 0.0
    for index, axis, _ in spec.weights_of(group):
        units, shape = spec.unit_positions(index, axis, group), other[index].shape
        others = [a for a in dict.fromkeys(entry[0] for entry in spec.axes[index]) if a != axis]
        orders = {a: _axis_index(spec, index, a, shape[a], before) for a in others}
        for moving in others:
            new_order = _axis_index(spec, index, moving, shape[moving], after)
            moved = np.flatnonzero(new_order != orders[moving])
            if moved.size:
                rest = other[index]
                for a in others:
                    if a != moving:
                        rest = np.take(rest, orders[a], axis=a)
                difference = (_unit_major(np.take(rest, new_order[moved], axis=moving), axis, units)
                              - _unit_major(np.take(rest, orders[moving][moved], axis=moving), axis, units))
                change = change + (_unit_major(np.take(reference[index], moved, axis=moving), axis, units)
                                   @ difference.T)
            orders[moving] = new_order
    return change


def _coupled_groups(spec):
    """``{group: groups on the other axes of the weights carrying it}``: what its cost depends on."""
    coupled = {group: set() for group in spec.sizes}
    for entries in spec.axes.values():
        for axis, group, _ in entries:
            coupled[group].update(other for other_axis, other, _ in entries if other_axis != axis)
    return {group: sorted(groups) for group, groups in coupled.items()}


def weight_matching(spec, reference, other, seed=0, max_iter=100, verbose=0):
    """Permutations of ``other``'s units that maximise ``Σ <W_ref, P W_other>`` (Alg. 1).

    Coordinate ascent from two starts, keeping the permutations with the
    larger objective (:func:`matching_objective`; the second start is skipped
    when the first reaches the objective's upper bound): the assignments of
    :func:`sorted_group_cost` (each group
    matched by what does not depend on the other groups' order: a permuted
    copy of ``reference`` is then put back exactly, where from the identity
    ascent can stop in a local optimum, as it did for EfficientNetV2's fused
    blocks; on independently trained members either start may end higher)
    and the identity (Alg. 1's start).
    Each sweep visits the groups in a seeded random order and solves one
    linear assignment per group on :func:`group_cost`; sweeps stop when no
    group's assignment improves, or after ``max_iter``. A group none of whose
    coupled groups changed since it was last solved would get the same cost
    matrix and assignment again, so it is skipped; the others' cost matrices
    are updated from the units that moved (:func:`group_cost_change`).
    Weights stay in their dtype; each term is computed in float64.

    Args:
        spec: the ``PermutationSpec`` of the architecture.
        reference, other: lists of weight arrays (``weight_refs`` order).
        seed: order of the sweeps over groups.
        max_iter: at most this many sweeps (from each start).
        verbose: 1 shows a ``keras.utils.Progbar`` per sweep, 0 is quiet.

    Returns:
        ``{group: perm}``; unit ``i`` of the aligned model is unit ``perm[i]`` of ``other``.
    """
    reference, other = [np.asarray(a) for a in reference], [np.asarray(a) for a in other]
    starts = {
        "sorted slices": {g: _assign(sorted_group_cost(spec, g, reference, other)) for g in spec.sizes},
        "identity": {g: np.arange(size) for g, size in spec.sizes.items()},
    }
    # no permutation scores above Σ ||W_ref|| ||W_other|| (Cauchy-Schwarz): a start that reaches it is optimal
    bound = sum(float(np.linalg.norm(np.asarray(r, "float64")) * np.linalg.norm(np.asarray(o, "float64")))
                for r, o in zip(reference, other))
    best, best_score = None, -np.inf
    for name, perms in starts.items():
        if verbose:
            print(f"Weight matching from the {name} start")
        perms = _ascend(spec, reference, other, perms, np.random.default_rng(seed), max_iter, verbose)
        score = matching_objective(spec, reference, other, perms)
        if score > best_score + 1e-12 * abs(score):
            best, best_score = perms, score
        if best_score >= bound * (1 - 1e-9):
            break  # e.g. a permuted copy put back exactly: the other start cannot do better
    return best


def matching_objective(spec, reference, other, perms):
    """``Σ <W_ref, P W_other>`` over every weight, in float64: what weight matching maximises.

    Example:
        >>> import keras, numpy as np
        >>> from ensemblekit.merge.permutation import permutation_spec
        >>> m = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2), keras.layers.Dense(1)])
        >>> a = [np.array([[1., 2.]]), np.zeros(2), np.array([[1.], [2.]]), np.zeros(1)]
        >>> b = [np.array([[2., 1.]]), np.zeros(2), np.array([[2.], [1.]]), np.zeros(1)]
        >>> spec = permutation_spec(m)
        >>> float(matching_objective(spec, a, b, {0: np.array([1, 0])}))
        10.0
    """
    permuted = permute_arrays(other, spec, perms)
    return sum(float(np.vdot(np.asarray(r, "float64"), np.asarray(p, "float64")))
               for r, p in zip(reference, permuted))


def _ascend(spec, reference, other, perms, rng, max_iter, verbose):
    """Coordinate ascent over the groups from ``perms`` (see :func:`weight_matching`)."""
    coupled, changes, solved_at = _coupled_groups(spec), dict.fromkeys(spec.sizes, 0), {}
    costs = _CostCache(spec, reference, other)
    sweep = 0
    for sweep in range(1, max_iter + 1):
        if verbose:
            print(f"Sweep {sweep}/{max_iter}")
        progress = keras.utils.Progbar(len(spec.sizes), verbose=verbose, unit_name="group")
        improved = 0
        for step, group in enumerate(rng.permutation(sorted(spec.sizes)), 1):
            inputs = [changes[g] for g in coupled[group]]
            if solved_at.get(group) != inputs:
                solved_at[group] = inputs
                if _improve(costs(group, perms), group, perms):
                    changes[group], improved = changes[group] + 1, improved + 1
            progress.update(step)
        if not improved:
            break
    if verbose:
        print(f"Weight matching: {sweep} sweeps, {sum(changes.values())} assignments improved.")
    return perms


def _improve(cost, group, perms):
    """Solve ``group``'s linear assignment on ``cost``; keep it in ``perms`` if it beats the current one."""
    new = _assign(cost)
    rows = np.arange(len(cost))
    if cost[rows, new].sum() > cost[rows, perms[group]].sum() + 1e-12 * abs(cost).sum():
        perms[group] = new
        return True
    return False


def _assign(cost):
    """The assignment maximising ``cost``: each row's best column when those differ, else the LAP's.

    Every row at its maximum bounds every assignment, so when the rows'
    best columns are all different they are the optimum (no LAP needed).
    """
    best = cost.argmax(axis=1)
    if len(np.unique(best)) == len(best):
        return best
    return linear_sum_assignment(cost, maximize=True)[1]


class _CostCache:
    """Each group's cost matrix: computed once, then updated by the units moved since it was read."""

    def __init__(self, spec, reference, other):
        self.spec, self.reference, self.other = spec, reference, other
        self.costs, self.read_at = {}, {}

    def __call__(self, group, perms):
        if group in self.costs:
            self.costs[group] += group_cost_change(self.spec, group, self.reference, self.other,
                                                   self.read_at[group], perms)
        else:
            self.costs[group] = group_cost(self.spec, group, self.reference, self.other, perms)
        self.read_at[group] = dict(perms)  # perms' arrays are replaced, never written in place
        return self.costs[group]


def activation_matching(spec, reference_model, other_model, x, batch_size=256, verbose=0):
    """Permutations matching units by the correlation of their activations on ``x`` (Sec. 3.1)."""
    groups = sorted(spec.sizes)
    perms = {}
    progress = keras.utils.Progbar(len(groups), verbose=verbose, unit_name="group")
    for step, group in enumerate(groups, 1):
        layers = spec.sources[group]
        cost = np.zeros((spec.sizes[group],) * 2)
        for layer in layers:
            other_layer = other_model.layers[reference_model.layers.index(layer)]
            ref_features, other_features = _features(
                [(reference_model, layer.name), (other_model, other_layer.name)], x, batch_size)
            cost += _correlation(ref_features, other_features)
        perms[group] = linear_sum_assignment(cost, maximize=True)[1]
        progress.update(step)
    return perms


def _features(model_layers, x, batch_size):
    """The activations of each ``(model, layer name)`` on ``x``, ``(rows, units)`` each, from ONE pass:
    rows of the models correspond even when ``x`` is a dataset that reshuffles."""
    extractors = []
    for model, layer_name in model_layers:
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        extractors.append(keras.Model(inputs, model.get_layer(layer_name).output))
    data = collect(extractors, x, batch_size=batch_size, function="align", argument="x")
    return [np.asarray(out, dtype="float64").reshape(-1, np.shape(out)[-1]) for out in data.outputs]


def _correlation(a, b):
    a = (a - a.mean(0)) / (a.std(0) + 1e-8)
    b = (b - b.mean(0)) / (b.std(0) + 1e-8)
    return a.T @ b / len(a)


def align(models, reference=0, method="weight_matching", x=None, seed=0, max_iter=100,
          return_permutations=False, safe_mode=True, verbose=1):
    """Permute every model's hidden units to line up with the reference model.

    The permutation groups (which axes of which weights move together) come
    from the channel-coupling graph shared with ``prune.channels``
    (``ensemblekit.merge.permutation``): Dense/Conv/SeparableConv/Embedding
    units, carried through normalization and depthwise convolutions, united
    by residual ``Add``-like merges and squeeze-and-excitation gates, joined
    by ``Concatenate`` and tiled by ``Flatten``. The outputs
    of every aligned model equal the input model's up to float rounding; only
    the order of hidden units changes, which makes a following ``merge``
    meaningful for independently trained models.

    Weight matching reads every weight axis once in its first sweep (a
    group's objective reads only the weights carrying it); later sweeps solve
    only the groups whose coupled groups changed and update their objectives
    from the units that moved. It holds about three members' weights at once
    (the reference's, the member's and the permuted clone's) and one
    ``(units, units)`` float64 matrix per group. It follows units into
    nested models (a transfer-learning base); activation matching, which
    reads layers of the outer model by name, needs one flat model.

    Args:
        models: list of ``keras.Model`` or paths, one architecture.
        reference: index of the model the others are aligned to.
        method: ``"weight_matching"`` (Ainsworth et al., 2022, Alg. 1; no data)
            or ``"activation_matching"`` (Sec. 3.1; needs ``x``).
        x: inputs for activation matching: arrays or any re-iterable data ``model.predict``
            accepts (a dataset's labels are ignored); read once per group of units, the two
            models on each batch together.
        seed: the random order of weight matching's sweeps.
        max_iter: at most this many sweeps over the groups (weight matching
            stops earlier when a sweep improves no group).
        return_permutations: also return ``[{group: perm}]`` per model.
        safe_mode: passed to ``keras.saving.load_model`` for paths.
        verbose: 1 names each member aligned and shows a
            ``keras.utils.Progbar`` over the groups (one per sweep of weight
            matching), 0 is quiet.

    Returns:
        A list of models (the reference unchanged, the others permuted
        clones), and the permutations if ``return_permutations``.

    Example:
        >>> import keras, numpy as np
        >>> from ensemblekit.merge import align, merge
        >>> make = lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(2)])
        >>> a, b = make(), make()
        >>> aligned = align([a, b], verbose=0)
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
    if method == "activation_matching":
        check_reiterable(x, "align")
    check_same_architecture(members, [member_label(i, m) for i, m in enumerate(members)],
                            function="align")
    spec = permutation_spec(members[reference], nested=method == "weight_matching")
    reference_arrays = get_arrays(members[reference])
    aligned, permutations = [], []
    for index, model in enumerate(members):
        if index == reference:
            aligned.append(model)
            permutations.append({g: np.arange(n) for g, n in spec.sizes.items()})
            continue
        if verbose:
            print(f"Aligning {member_label(index, model)} to member {reference}")
        if method == "weight_matching":
            perms = weight_matching(spec, reference_arrays, get_arrays(model), seed, max_iter, verbose)
        else:
            perms = activation_matching(spec, members[reference], model, x, verbose=verbose)
        aligned.append(_permuted_clone(model, spec, perms))
        permutations.append(perms)
    return (aligned, permutations) if return_permutations else aligned


def _permuted_clone(model, spec, perms):
    """A clone of ``model`` with its weights permuted by ``perms``, written one weight at a time."""
    clone = keras.models.clone_model(model)
    clone.name = f"{model.name}_aligned"
    for index, (source, target) in enumerate(zip(weight_refs(model), weight_refs(clone), strict=True)):
        target.assign(permute_weight(source.numpy(), spec, index, perms))
    return clone
