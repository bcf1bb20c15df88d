"""Merge configs (YAML or JSON) that map 1:1 onto ``ensemblekit.merge`` (mergekit-style).

Example config::

    method: ties
    models: [ft_a.keras, ft_b.keras, ft_c.keras]
    base: base.keras
    weights: [1.0, 1.0, 0.5]
    parameters:
      density: {"dense_1/*": 0.5, default: 0.2}
      lambda_: 1.0
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ensemblekit.merge.methods import METHODS

KEYS = ("method", "models", "base", "weights", "parameters", "template", "output", "stream")
_NOT_IN_FILES = ("validation_data",)


def _read(path):
    path = Path(os.fspath(path))
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError('YAML configs need pyyaml: pip install pyyaml (or use JSON).') from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"config {str(path)!r} is not valid YAML: {error}") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"config {str(path)!r} is not valid JSON: {error}") from None
    raise ValueError(f"config {str(path)!r} must end in .yaml, .yml or .json.")


def _relative(entry, root, key):
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"config key {key!r} must be a file path, got {entry!r}.")
    path = Path(entry)
    return str(path if path.is_absolute() else root / path)


def load_config(path):
    """Read and validate a merge config; return the keyword arguments of ``merge``.

    Relative member paths are resolved against the config file's folder.

    Returns:
        ``{"models": [...], "method": ..., "base": ..., "weights": ..., **parameters}``
        plus ``"output"`` when the config names one.

    Raises:
        ValueError: naming the offending key (unknown keys, wrong types,
            unknown method or parameter).
    """
    config = _read(path)
    if not isinstance(config, dict):
        raise ValueError(f"config {str(path)!r} must be a mapping of keys to values.")
    unknown = [key for key in config if key not in KEYS]
    if unknown:
        raise ValueError(f"config key {unknown[0]!r} is unknown; expected keys: {', '.join(KEYS)}.")
    root = Path(os.fspath(path)).resolve().parent
    method = config.get("method", "linear")
    if method not in METHODS:
        raise ValueError(f"config key 'method' is {method!r}; expected one of {', '.join(METHODS)}.")
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError("config key 'models' must be a non-empty list of model file paths.")
    kwargs = {
        "models": [_relative(m, root, f"models[{i}]") for i, m in enumerate(models)],
        "method": method,
    }
    for key in ("base", "template"):
        if config.get(key) is not None:
            kwargs[key] = _relative(config[key], root, key)
    if config.get("weights") is not None:
        kwargs["weights"] = config["weights"]
    if "stream" in config:
        kwargs["stream"] = config["stream"]
    parameters = config.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ValueError("config key 'parameters' must be a mapping of parameter names to values.")
    for name in parameters:
        if name in _NOT_IN_FILES:
            raise ValueError(f"config key 'parameters.{name}' cannot be given in a file; call "
                             "ensemblekit.merge from Python for greedy_soup.")
        if name not in METHODS[method].parameters:
            accepted = ", ".join(sorted(METHODS[method].parameters)) or "none"
            raise ValueError(f"config key 'parameters.{name}' is not a parameter of {method!r}; "
                             f"it accepts: {accepted}.")
    kwargs.update(parameters)
    if config.get("output") is not None:
        kwargs["output"] = _relative(config["output"], root, "output")
    return kwargs


def merge_from_config(path, output=None, verbose=0):
    """Run the merge a config describes and save the result atomically.

    Args:
        path: the YAML/JSON config.
        output: where to save (overrides the config's ``output``).

    Returns:
        The path of the saved ``.keras`` (or ``.weights.h5``) file.
    """
    from ensemblekit._io import atomic_save
    from ensemblekit.merge.core import merge

    kwargs = load_config(path)
    output = output or kwargs.pop("output", None)
    kwargs.pop("output", None)
    if output is None:
        raise ValueError("no output path: pass -o/--output or set the config key 'output'.")
    if not str(output).endswith((".keras", ".weights.h5")):
        raise ValueError(f"output {str(output)!r} must end in .keras or .weights.h5.")
    merged = merge(**kwargs, verbose=verbose)
    return atomic_save(merged, output)
