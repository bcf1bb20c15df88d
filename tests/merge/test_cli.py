import json

import keras

from ensemblekit.cli import main
from tests.conftest import make_mlp


def test_merge_command_writes_model_and_reports_errors(tmp_path, capsys):
    make_mlp(0).save(tmp_path / "a.keras")
    make_mlp(1).save(tmp_path / "b.keras")
    (tmp_path / "c.json").write_text(json.dumps({"models": ["a.keras", "b.keras"], "method": "slerp"}))
    assert main(["merge", str(tmp_path / "c.json"), "-o", str(tmp_path / "m.keras"), "-q"]) == 0
    assert keras.saving.load_model(tmp_path / "m.keras").count_params() == make_mlp(0).count_params()
    (tmp_path / "bad.json").write_text(json.dumps({"models": ["a.keras"], "weight": [1]}))
    assert main(["merge", str(tmp_path / "bad.json"), "-o", str(tmp_path / "n.keras")]) == 2
    assert "config key 'weight' is unknown" in capsys.readouterr().err
