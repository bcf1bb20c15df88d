import json

import keras
import numpy as np
import pytest

from ensemblekit.merge.config import load_config, merge_from_config
from tests.conftest import make_mlp


@pytest.fixture
def members(tmp_path):
    for i in range(3):
        make_mlp(i).save(tmp_path / f"m{i}.keras")
    return tmp_path


def test_yaml_config_maps_onto_merge_and_saves(members):
    (members / "merge.yaml").write_text(
        "method: task_arithmetic\nmodels: [m1.keras, m2.keras]\nbase: m0.keras\n"
        "weights: [1.0, 0.5]\nparameters:\n  lambda_: {'hidden/*': 0.5, default: 1.0}\n"
    )
    kwargs = load_config(members / "merge.yaml")
    assert kwargs["method"] == "task_arithmetic" and kwargs["lambda_"] == {"hidden/*": 0.5, "default": 1.0}
    assert kwargs["models"][0] == str(members / "m1.keras")
    out = merge_from_config(members / "merge.yaml", output=members / "out.keras")
    merged = keras.saving.load_model(out)
    base, m1, m2 = (keras.saving.load_model(members / f"m{i}.keras") for i in range(3))
    expected = base.get_layer("out").kernel.numpy() + (
        m1.get_layer("out").kernel.numpy() - base.get_layer("out").kernel.numpy()
        + 0.5 * (m2.get_layer("out").kernel.numpy() - base.get_layer("out").kernel.numpy()))
    np.testing.assert_allclose(merged.get_layer("out").kernel.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config,message", [
    ({"models": ["m0.keras"], "methd": "linear"}, "config key 'methd' is unknown"),
    ({"models": []}, "config key 'models' must be a non-empty list"),
    ({"models": ["m0.keras"], "method": "soup"}, "config key 'method' is 'soup'"),
    ({"models": ["m0.keras", 3]}, r"config key 'models\[1\]' must be a file path"),
    ({"models": ["m0.keras"], "method": "ties", "parameters": {"dens": 0.2}},
     "config key 'parameters.dens' is not a parameter of 'ties'"),
    ({"models": ["m0.keras"], "parameters": {"validation_data": 1}}, "'parameters.validation_data' cannot be given"),
])
def test_invalid_configs_name_the_key(members, config, message):
    (members / "bad.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_config(members / "bad.json")


def test_output_is_required_and_must_be_keras(members):
    (members / "c.json").write_text(json.dumps({"models": ["m0.keras", "m1.keras"]}))
    with pytest.raises(ValueError, match="no output path"):
        merge_from_config(members / "c.json")
    with pytest.raises(ValueError, match="must end in .keras"):
        merge_from_config(members / "c.json", output=members / "x.txt")
