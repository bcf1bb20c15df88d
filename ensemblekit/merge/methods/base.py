"""The base of every merge method: declared parameters, validation, per-tensor merge.

A method is one small class over *tensors* (numpy arrays of one weight from
every member); walking models or files is done once in
``ensemblekit.merge.core`` and ``ensemblekit.merge.streaming`` (the layout of
mergekit's ``merge_methods``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import numbers

import numpy as np

DEFAULT_KEYS = ("default", "*")


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One parameter of a merge method: its default and a value check.

    ``check(value, where)`` raises ``ValueError``/``TypeError`` naming ``where``
    (e.g. ``"density['dense_1/*']"``) and returns the normalised value.
    """

    default: object
    check: object
    per_layer: bool = True


def check_number(low=None, high=None, low_open=False):
    """A ``Parameter.check`` for a real number in ``[low, high]`` (``(low, high]`` if ``low_open``)."""

    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{where} must be a number, got {type(value).__name__} {value!r}.")
        value = float(value)
        if not np.isfinite(value):
            raise ValueError(f"{where} is {value}; it must be finite.")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            left = "(" if low_open else "["
            raise ValueError(f"{where} is {value:g}; it must be in {left}{low}, {high}].")
        return value

    return check


def check_bool(value, where):
    """A ``Parameter.check`` for booleans."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where} must be True or False, got {value!r}.")
    return bool(value)


def check_int(value, where):
    """A ``Parameter.check`` for integers (seeds)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} must be an integer, got {type(value).__name__} {value!r}.")
    return int(value)


def check_any(value, where):
    return value


def _check_per_layer(name, value, check):
    """Validate a plain value or a ``{layer pattern: value}`` dict; return it normalised."""
    if not isinstance(value, dict):
        return check(value, name)
    if not value:
        raise ValueError(f"{name} is an empty dict; give at least a 'default' entry.")
    checked = {}
    for pattern, item in value.items():
        if not isinstance(pattern, str):
            raise TypeError(f"{name} keys must be layer-name patterns (str), got {pattern!r}.")
        checked[pattern] = check(item, f"{name}[{pattern!r}]")
    return checked


def resolve_per_layer(params, paths):
    """Resolve per-layer parameters to one value per weight path.

    A parameter given as ``{pattern: value}`` takes the value of the first
    pattern (``fnmatch`` on the weight path, e.g. ``"dense_1/*"``) that matches,
    else its ``"default"``/``"*"`` entry.

    Args:
        params: ``{name: value or {pattern: value}}``.
        paths: the weight paths, in order.

    Returns:
        A list with one ``{name: value}`` dict per path.

    Raises:
        ValueError: a weight matches no pattern and there is no default, or a
            pattern matches no weight (a typo would otherwise be ignored silently).

    Example:
        >>> resolve_per_layer({"t": {"d1/*": 0.2, "default": 0.7}}, ["d1/kernel", "d2/kernel"])
        [{'t': 0.2}, {'t': 0.7}]
    """
    resolved = [{} for _ in paths]
    for name, value in params.items():
        if not isinstance(value, dict):
            for entry in resolved:
                entry[name] = value
            continue
        patterns = [key for key in value if key not in DEFAULT_KEYS]
        fallback_key = next((key for key in DEFAULT_KEYS if key in value), None)
        used = set()
        for entry, path in zip(resolved, paths, strict=True):
            match = next((p for p in patterns if fnmatch.fnmatchcase(path, p)), None)
            if match is None and fallback_key is None:
                raise ValueError(
                    f"{name}: weight {path!r} matches none of the patterns {patterns} and there is "
                    "no 'default' entry."
                )
            used.add(match)
            entry[name] = value[match if match is not None else fallback_key]
        unused = [p for p in patterns if p not in used]
        if unused:
            raise ValueError(
                f"{name}[{unused[0]!r}] matches no weight path (paths look like {paths[0]!r})."
            )
    return resolved


class MergeMethod:
    """Base class: merge one weight tensor of K members into one tensor.

    Subclasses set ``name``, ``parameters`` (``{name: Parameter}``), ``base``
    (``"required"``, ``"optional"`` or ``"unused"``), ``n_models`` (``None`` or
    the exact count) and implement ``merge_tensor``.
    """

    name = ""
    parameters: dict = {}
    base = "unused"
    n_models = None
    uses_weights = True
    streamable = True

    def check_params(self, params):
        """Validate ``params`` (unknown names, values, per-layer dicts); fill in defaults."""
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            accepted = ", ".join(sorted(self.parameters)) or "none"
            raise ValueError(
                f"merge method {self.name!r} got unknown parameter {unknown[0]!r}; "
                f"it accepts: {accepted}."
            )
        checked = {}
        for name, spec in self.parameters.items():
            value = params.get(name, spec.default)
            if value is None and spec.default is None:
                checked[name] = None
            elif spec.per_layer:
                checked[name] = _check_per_layer(name, value, spec.check)
            else:
                checked[name] = spec.check(value, name)
        return checked

    def tensor_params(self, params):
        """The subset of ``params`` passed to ``merge_tensor`` (all by default)."""
        return {k: v for k, v in params.items() if self.parameters[k].per_layer}

    def prepare(self, members, base, weights, params, merge_fn, verbose=0):
        """Model-level step before the tensor loop; returns ``(members, weights)`` to merge."""
        return members, weights

    def merge_tensor(self, tensors, base, weights, path, **params):
        """Merge ``tensors`` (float64 arrays, one per member) into one array.

        Args:
            tensors: list of K arrays of one shape.
            base: the base model's array, or ``None``.
            weights: float64 array of K per-member weights for this tensor.
            path: the weight path (for seeding and messages).
            **params: this tensor's resolved parameters.
        """
        raise NotImplementedError


    def merge_statistic(self, tensors, weights, path, **params):
        """Merge a normalization statistic (moving mean or variance): the members' mean,
        weighted by their merge weights when those are non-negative with a positive sum
        (uniform otherwise), so a variance stays a variance. Methods with their own
        interpolation (``slerp``) override it."""
        weights = np.asarray(weights, dtype="float64")
        if np.any(weights < 0) or not np.sum(weights) > 0:
            weights = np.ones(len(tensors))
        return np.tensordot(weights / np.sum(weights), np.stack(tensors), axes=1)


def deltas(tensors, base):
    """Task vectors ``θ_i - θ_base`` stacked on a new leading axis."""
    return np.stack([t - base for t in tensors])


def expand(weights, ndim):
    """Per-member weights shaped to broadcast against stacked tensors of ``ndim`` axes."""
    return np.asarray(weights, dtype="float64").reshape((-1,) + (1,) * ndim)
