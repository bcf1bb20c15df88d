"""ensemblekit.deploy.models_config: the models config file of ``ensemblekit serve --models-config``."""

import json

import pytest

from ensemblekit.cli import main
from ensemblekit.deploy.cli import model_arguments
from ensemblekit.deploy.models_config import load_models_config


def test_json_and_yaml_give_name_version_path(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"models": [
        {"name": "ens", "versions": {"2": "v2.keras", "1": "/abs/v1.keras"}},
        {"name": "member", "path": "sub/member.keras"}]}))
    (tmp_path / "m.yaml").write_text("models:\n  - name: ens\n    versions:\n      2: v2.keras\n"
                                     "      1: /abs/v1.keras\n  - name: member\n    path: sub/member.keras\n")
    expected = {"ens": {1: "/abs/v1.keras", 2: str(tmp_path / "v2.keras")},
                "member": {1: str(tmp_path / "sub" / "member.keras")}}
    assert load_models_config(tmp_path / "m.json") == expected
    assert load_models_config(tmp_path / "m.yaml") == expected
    assert list(load_models_config(tmp_path / "m.yaml")["ens"]) == [1, 2]


BAD_CONFIGS = [
    ("no models", {"model": []}, "must hold a non-empty list under 'models'"),
    ("unknown top key", {"models": [{"name": "m", "path": "m.keras"}], "extra": 1}, "unknown top-level key 'extra'"),
    ("bad name", {"models": [{"name": "a b", "path": "m.keras"}]}, "models[0].name is 'a b'"),
    ("both", {"models": [{"name": "m", "path": "m.keras", "versions": {"1": "m.keras"}}]},
     "models[0] ('m') needs exactly one of path or versions"),
    ("bad version", {"models": [{"name": "m", "versions": {"two": "m.keras"}}]},
     "models[0].versions: version 'two' is not an integer >= 1"),
    ("zero version", {"models": [{"name": "m", "versions": {"0": "m.keras"}}]}, "version '0' is not an integer >= 1"),
    ("unknown key", {"models": [{"name": "m", "path": "m.keras", "policy": "latest"}]}, "unknown key 'policy'"),
    ("repeated name", {"models": [{"name": "m", "path": "a.keras"}, {"name": "m", "path": "b.keras"}]},
     "model name 'm' is listed twice"),
    ("bad path", {"models": [{"name": "m", "versions": {"1": 3}}]}, "models[0].versions[1] is 3"),
]


@pytest.mark.parametrize(("config", "match"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_the_key(tmp_path, config, match):
    (tmp_path / "m.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_models_config(tmp_path / "m.json")


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_models_config(tmp_path / "missing.json")
    (tmp_path / "m.txt").write_text("{}")
    with pytest.raises(ValueError, match=r"must end with \.json, \.yaml or \.yml"):
        load_models_config(tmp_path / "m.txt")
    (tmp_path / "m.yaml").write_text("models: [unclosed\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_models_config(tmp_path / "m.yaml")


def test_cli_models_config_is_exclusive_with_model_paths(tmp_path, capsys):
    (tmp_path / "m.json").write_text(json.dumps({"models": [{"name": "m", "path": "m.keras"}]}))
    assert model_arguments([], models_config=tmp_path / "m.json") == {"m": {1: str(tmp_path / "m.keras")}}
    with pytest.raises(ValueError, match="give no MODEL paths and no --name"):
        model_arguments(["x.keras"], models_config=tmp_path / "m.json")
    with pytest.raises(ValueError, match="give a MODEL path, NAME=PATH pairs, or --models-config"):
        model_arguments([])
    assert main(["serve", "--models-config", str(tmp_path / "missing.yaml"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
