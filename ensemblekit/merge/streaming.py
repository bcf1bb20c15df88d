"""Out-of-core merging: read ``.keras``/``.weights.h5`` members tensor by tensor with h5py.

Only the merged model and one tensor per member are in memory at a time, so
peak memory stays near one or two members instead of K. The weights inside
a Keras 3 file live at class-derived keys (``layers/dense_1/vars/0``); each
``vars`` group carries its layer's name, which maps the file onto the model's
weight paths. Member files are matched to member 0's keys, so independently
built models of one architecture merge too.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np

from ensemblekit._graph import config_differences, special_layers, weight_refs
from ensemblekit.merge.engine import merge_weights
from ensemblekit.merge.variables import float_template

STREAM_SUFFIXES = (".keras", ".weights.h5")
_ZIP_WEIGHTS = "model.weights.h5"
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


def is_streamable_path(member):
    """True for a path ending in ``.keras`` or ``.weights.h5``."""
    return isinstance(member, (str, os.PathLike)) and os.fspath(member).endswith(STREAM_SUFFIXES)


def should_stream(models, base, method, stream):
    """Decide whether ``merge`` streams (see its ``stream`` argument)."""
    if stream not in ("auto", True, False):
        raise ValueError(f"stream must be 'auto', True or False, got {stream!r}.")
    paths = all(is_streamable_path(m) for m in models) and (base is None or is_streamable_path(base))
    if stream is True:
        if not paths:
            raise ValueError("stream=True needs every member (and the base) as a .keras or .weights.h5 path.")
        if not method.streamable:
            raise ValueError(f"merge method {method.name!r} needs whole models; use stream=False.")
    return bool(stream) and paths and method.streamable


class _WindowFile(io.RawIOBase):
    """A read-only file view of ``size`` bytes at ``offset`` (a stored zip entry) for h5py."""

    def __init__(self, path, offset, size):
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._offset, self._size, self._position = offset, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, position, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = base + position
        return self._position

    def tell(self):
        return self._position

    def readinto(self, buffer):
        count = max(0, min(len(buffer), self._size - self._position))
        self._file.seek(self._offset + self._position)
        read = self._file.readinto(memoryview(buffer)[:count])
        self._position += read
        return read

    def close(self):
        self._file.close()
        super().close()


class H5Source:
    """One member file, read one weight tensor at a time.

    Args:
        path: a ``.keras`` or ``.weights.h5`` file.
        label: how errors name it (``"member 3 ('a.keras')"``).
    """

    def __init__(self, path, label):
        self.path, self.label = Path(os.fspath(path)), label
        self._closers, self._datasets, self.config = [], [], None
        if not self.path.is_file():
            raise ValueError(f"{label}: file {str(self.path)!r} does not exist.")
        try:
            self.h5 = h5py.File(self._open_weights(), "r")
        except (OSError, zipfile.BadZipFile, KeyError) as error:
            self.close()
            raise ValueError(f"{label}: cannot read weights from {str(self.path)!r}: {error}") from None
        self._closers.append(self.h5)

    def _open_weights(self):
        if self.path.name.endswith(".weights.h5"):
            return self.path
        with zipfile.ZipFile(self.path) as archive:
            info = archive.getinfo(_ZIP_WEIGHTS)
            self.config = json.loads(archive.read("config.json"))
            if info.compress_type == zipfile.ZIP_STORED:
                with open(self.path, "rb") as raw:
                    raw.seek(info.header_offset)
                    header = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
                offset = info.header_offset + _LOCAL_HEADER.size + header[-2] + header[-1]
                window = _WindowFile(self.path, offset, info.file_size)
                self._closers.append(window)
                return window
            # Compressed archive: extract the weights file to disk, never to memory.
            workdir = tempfile.mkdtemp(prefix="ensemblekit-merge-")
            self._closers.append(_TempDir(workdir))
            return archive.extract(info, workdir)

    def layer_groups(self):
        """``{layer path: h5 path of its vars group}`` from the layer names stored in the file."""
        groups = {}

        def visit(container, prefix):
            layers = container.get("layers")
            for key in layers if isinstance(layers, h5py.Group) else []:
                child = layers[key]
                name = child["vars"].attrs.get("name") if "vars" in child else None
                if name is None:
                    raise ValueError(
                        f"{self.label}: {child.name!r} has no layer name (file written by an older "
                        "Keras?); merge with stream=False."
                    )
                name = name.decode() if isinstance(name, bytes) else str(name)
                if "layers" in child:
                    visit(child, f"{prefix}{name}/")
                else:
                    groups[f"{prefix}{name}"] = f"{child.name}/vars"

        visit(self.h5, "")
        return groups

    def dataset_paths(self):
        """Every dataset under ``layers/`` (the model's variables), as h5 paths."""
        found = []
        if "layers" in self.h5:
            self.h5["layers"].visititems(
                lambda name, obj: found.append(f"/layers/{name}") if isinstance(obj, h5py.Dataset) else None
            )
        return found

    def bind(self, dataset_paths):
        """Fix the h5 dataset read for each weight index."""
        self._datasets = list(dataset_paths)

    def read(self, index):
        return np.asarray(self.h5[self._datasets[index]][()])

    def close(self):
        for closer in reversed(self._closers):
            closer.close()
        self._closers = []


class _TempDir:
    def __init__(self, path):
        self.path = path

    def close(self):
        shutil.rmtree(self.path, ignore_errors=True)


def _template_model(first, template, safe_mode):
    """The merged model's architecture: ``template`` or member 0's ``config.json``."""
    if isinstance(template, keras.Model):
        return keras.models.clone_model(template)
    if template is not None:
        path = os.fspath(template)
        if not path.endswith(".keras") or not os.path.isfile(path):
            raise ValueError(f"template must be a keras.Model or an existing .keras file, got {path!r}.")
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    else:
        config = getattr(first, "config", None)
    if config is None:
        raise ValueError(
            f"{first.label} is a .weights.h5 file (weights only); pass template= (a keras.Model "
            "or .keras file with the architecture)."
        )
    return keras.saving.deserialize_keras_object(config, safe_mode=safe_mode)


def _float_architecture(model, first):
    """``model`` as the float architecture the files are merged into; quantized files refused.

    Keras folds LoRA adapters into the kernel when it saves, so a LoRA model's
    file holds plain kernels: its float template (no adapters) matches it. A
    quantized file holds integer codes and scales, which must not be averaged
    tensor by tensor.
    """
    quantized = [(path, kind) for path, kind in special_layers(model) if kind not in ("lora", "savedmodel")]
    if quantized:
        path, kind = quantized[0]
        raise ValueError(
            f"merge: {first.label}: layer {path!r} is stored {kind}-quantized; streamed merging "
            "reads tensors one by one and cannot dequantize them. Use stream=False (members are "
            "dequantized, merged in float and quantized again)."
        )
    return float_template(model)


def _check_configs(architecture, sources, safe_mode):
    """Refuse files whose layer configurations change the function (activation, epsilon...).

    Each ``.keras`` file's architecture is built from its ``config.json`` one at
    a time (weights initialized, not read) and compared with the merge's;
    ``.weights.h5`` files carry no configuration and take the template's.
    """
    for source in sources:
        if source.config is None:
            continue
        try:
            other = keras.saving.deserialize_keras_object(source.config, safe_mode=safe_mode)
        except Exception:  # no model described (weights-only archive): the template's layers hold
            continue
        problems = config_differences([architecture, other], ["the merged architecture", source.label])
        del other
        if problems:
            raise ValueError(
                f"merge: Models are not one architecture: {len(problems)} layer configuration "
                "key(s) that change the function differ:\n  " + "\n  ".join(problems)
            )


def map_weights(model, first):
    """The h5 dataset path of every weight of ``model`` in member 0's file."""
    groups = first.layer_groups()
    refs = weight_refs(model)
    paths, position = [], {}
    for ref in refs:
        if ref.layer_path not in groups:
            raise ValueError(
                f"{first.label}: no weights for layer {ref.layer_path!r} in the file (its layers: "
                f"{sorted(groups)[:8]}); the template does not match the file."
            )
        index = position.get(ref.layer_path, 0)
        position[ref.layer_path] = index + 1
        paths.append(f"{groups[ref.layer_path]}/{index}")
    return refs, paths


def file_differences(refs, paths, sources):
    """List every mismatch between the files and the model: missing, extra, reshaped weights."""
    problems = []
    first, expected = sources[0], set(paths)
    reference_datasets = set(first.dataset_paths())
    for ref, path in zip(refs, paths, strict=True):
        if path not in first.h5:
            problems.append(f"{first.label}: missing weight {ref.path!r} {ref.shape} ({path})")
        elif tuple(first.h5[path].shape) != ref.shape:
            problems.append(
                f"{first.label}: {ref.path!r} {tuple(first.h5[path].shape)} vs the model's {ref.shape}"
            )
    for source in sources[1:]:
        datasets = set(source.dataset_paths())
        for path in sorted(datasets - reference_datasets):
            problems.append(f"{source.label}: extra tensor {path} {source.h5[path].shape} not in {first.label}")
        for ref, path in zip(refs, paths, strict=True):
            if path not in datasets:
                problems.append(f"{source.label}: missing weight for {first.label}'s {ref.path!r} {ref.shape}")
            elif tuple(source.h5[path].shape) != tuple(first.h5[path].shape):
                problems.append(
                    f"{source.label}: {ref.path!r} {tuple(source.h5[path].shape)} vs {first.label}'s "
                    f"{ref.path!r} {tuple(first.h5[path].shape)}"
                )
        for path in sorted(reference_datasets - datasets - expected):
            problems.append(f"{source.label}: missing tensor {path} of {first.label}")
    return problems


def merge_files(models, method, base, weights, params, template=None, name=None, safe_mode=True,
                verbose=0):
    """Merge member files tensor by tensor; see ``ensemblekit.merge``."""
    sources = []
    try:
        for i, path in enumerate(models):
            sources.append(H5Source(path, f"member {i} ({Path(os.fspath(path)).name!r})"))
        base_source = None
        if base is not None:
            base_source = H5Source(base, f"base ({Path(os.fspath(base)).name!r})")
            sources.append(base_source)
        members = sources[:-1] if base_source is not None else sources
        architecture = _template_model(members[0], template, safe_mode)
        output = _float_architecture(architecture, members[0])
        refs, paths = map_weights(output, members[0])
        problems = file_differences(refs, paths, sources)
        if problems:
            raise ValueError(
                f"Models do not share one architecture ({len(problems)} incompatible weights):\n  "
                + "\n  ".join(problems)
            )
        _check_configs(architecture, sources, safe_mode)
        for source in sources:
            source.bind(paths)
        if name:
            output.name = name
        return merge_weights(output, members, base_source, method, weights, params, verbose)
    finally:
        for source in sources:
            source.close()
