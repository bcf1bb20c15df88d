"""The models config file of ``ensemblekit serve --models-config FILE``: names, versions, paths.

A JSON or YAML file (by its suffix: ``.json``, ``.yaml``/``.yml``) listing each
model once, with either one ``path`` (served as version 1) or ``versions``
mapping version numbers to paths; relative paths are taken from the file's folder::

    models:
      - name: ensemble
        versions: {1: ensemble_v1.keras, 2: ensemble_v2.keras}
      - name: member
        path: member.keras

It maps 1:1 onto ``ek.deploy.serve({"ensemble": {1: ..., 2: ...}, "member": ...})``.
As in TensorFlow Serving, ``/v1/models/ensemble:predict`` uses the highest
version and ``/v1/models/ensemble/versions/1:predict`` a given one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MODEL_KEYS = {"name", "path", "versions"}


def _version_number(value, where):
    text = str(value)
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"{where}: version {value!r} is not an integer >= 1.")
    return int(text)


def _read(path):
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(f'reading {str(path)!r} needs pyyaml; pip install "ensemblekit[merge]" '
                              "or write the config as JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"models config {str(path)!r} is not valid YAML: "
                             f"{str(error).splitlines()[0]}") from None
    if path.suffix != ".json":
        raise ValueError(f"models config {str(path)!r} must end with .json, .yaml or .yml.")
    try:
        return json.loads(text)
    except ValueError as error:
        raise ValueError(f"models config {str(path)!r} is not valid JSON: {error}") from None


def _model_entry(entry, index, folder, where):
    here = f"{where}: models[{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{here} is {entry!r}; expected {{name: ..., path: ...}} or {{name: ..., versions: ...}}.")
    unknown = sorted(set(entry) - _MODEL_KEYS)
    if unknown:
        raise ValueError(f"{here} has unknown key {unknown[0]!r}; the keys are name, path, versions.")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(f"{here}.name is {name!r}; use letters, digits, '_', '.' and '-'.")
    if ("path" in entry) == ("versions" in entry):
        raise ValueError(f"{here} ({name!r}) needs exactly one of path or versions.")
    versions = entry["versions"] if "versions" in entry else {1: entry["path"]}
    if not isinstance(versions, dict) or not versions:
        raise ValueError(f"{here}.versions is {versions!r}; expected {{version number: path}}.")
    paths = {}
    for version, model_path in versions.items():
        number = _version_number(version, f"{here}.versions")
        if number in paths:
            raise ValueError(f"{here}.versions repeats version {number}.")
        if not isinstance(model_path, str) or not model_path:
            raise ValueError(f"{here}.versions[{number}] is {model_path!r}; expected a path to a .keras file.")
        paths[number] = str(folder / os.path.expanduser(model_path))
    return name, dict(sorted(paths.items()))


def load_models_config(path):
    """Read a models config file into ``{name: {version: path}}``.

    Args:
        path: a ``.json``, ``.yaml`` or ``.yml`` file (see the module docstring).

    Returns:
        ``{name: {version: absolute or config-relative path}}``, versions ascending.

    Raises:
        ValueError: the file is malformed; the message names the key.

    Example:
        >>> import json, os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> config = os.path.join(folder, "models.json")
        >>> with open(config, "w") as f:
        ...     json.dump({"models": [{"name": "m", "versions": {"2": "b.keras", "1": "a.keras"}}]}, f)
        >>> {n: {v: os.path.basename(p) for v, p in vs.items()} for n, vs in load_models_config(config).items()}
        {'m': {1: 'a.keras', 2: 'b.keras'}}
    """
    path = Path(os.fspath(path))
    where = f"models config {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{where} does not exist.")
    config = _read(path)
    if not isinstance(config, dict) or not isinstance(config.get("models"), list) or not config["models"]:
        raise ValueError(f"{where} must hold a non-empty list under 'models', e.g. "
                         "models: [{name: m, path: m.keras}].")
    unknown = sorted(set(config) - {"models"})
    if unknown:
        raise ValueError(f"{where} has unknown top-level key {unknown[0]!r}; the only key is 'models'.")
    models = {}
    for index, entry in enumerate(config["models"]):
        name, versions = _model_entry(entry, index, path.parent, where)
        if name in models:
            raise ValueError(f"{where}: model name {name!r} is listed twice.")
        models[name] = versions
    return models
