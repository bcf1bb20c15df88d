"""``ensemblekit evaluate`` on an image folder and a saved tf.data dataset, streamed."""

import json

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit.cli import main

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="image folders need tf.data")


@pytest.fixture(scope="module")
def folder_and_arrays(tmp_path_factory):
    """Digits rendered to 16x16 PNGs in class subfolders (what image_dataset_from_directory reads)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("images")
    images, labels = [], []
    for label in range(3):
        (root / str(label)).mkdir()
        rows = np.flatnonzero(digits.target == label)[:12]
        for index, row in enumerate(rows):
            image = np.kron(digits.images[row] * 15, np.ones((2, 2)))  # 8x8 in [0, 16] -> 16x16
            image = np.repeat(image[..., None], 3, axis=-1).astype("uint8")
            keras.utils.save_img(root / str(label) / f"img_{index:03d}.png", image, scale=False)
            images.append(image)
            labels.append(label)
    return root, np.asarray(images, "float32"), np.asarray(labels)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return path


def test_evaluate_command_on_an_image_folder_equals_the_arrays(folder_and_arrays, model_path, capsys):
    root, images, labels = folder_and_arrays
    assert main(["evaluate", str(model_path), "--data", str(root), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = ek.evaluate(keras.saving.load_model(model_path), images, labels)
    assert printed.keys() == expected.keys()
    for key in expected:
        assert printed[key] == pytest.approx(expected[key], abs=1e-5)


def test_evaluate_command_on_a_saved_tf_data_folder(folder_and_arrays, model_path, tmp_path, capsys):
    import tensorflow as tf

    _, images, labels = folder_and_arrays
    saved = tmp_path / "saved_dataset"
    tf.data.Dataset.from_tensor_slices((images, labels)).batch(8).save(str(saved))
    assert main(["evaluate", str(model_path), "--data", str(saved)]) == 0
    out = capsys.readouterr().out
    expected = ek.evaluate(keras.saving.load_model(model_path), images, labels)
    assert f"{expected['accuracy']:.4f}" in out.split("accuracy", 1)[1].splitlines()[0]


def test_folders_are_refused_where_a_command_needs_arrays(tmp_path):
    from ensemblekit.datasets import load_data_spec

    with pytest.raises(ValueError, match="is a folder; this command reads arrays"):
        load_data_spec(str(tmp_path))


def test_advise_command_on_an_image_folder_equals_the_arrays(folder_and_arrays, model_path, tmp_path, capsys):
    root, images, labels = folder_and_arrays
    keras.utils.set_random_seed(1)
    other = keras.models.clone_model(keras.saving.load_model(model_path))
    other_path = tmp_path / "other.keras"
    other.save(other_path)
    out = tmp_path / "advice.json"
    assert main(["advise", str(model_path), str(other_path), "--data", str(root), "-q", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    members = [keras.saving.load_model(p) for p in (model_path, other_path)]
    expected = ek.advise(members, images, labels, verbose=0).to_dict()
    assert (written["fit_size"], written["score_size"]) == (expected["fit_size"], expected["score_size"])
    for got, want in zip(written["rows"], expected["rows"]):
        assert got["name"] == want["name"]
        assert (got["nll"] is None) == (want["nll"] is None), got["name"]
        if want["nll"] is not None:
            assert got["nll"] == pytest.approx(want["nll"], abs=1e-4), got["name"]
