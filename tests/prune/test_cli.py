"""ensemblekit.prune.cli: ``ensemblekit prune magnitude|channels|report``."""

import json

import keras
import numpy as np

from ensemblekit.cli import main
from ensemblekit.prune.magnitude import sparsity_of
from tests.conftest import make_mlp


def test_magnitude_channels_and_report_commands(tmp_path, capsys):
    source = tmp_path / "mlp.keras"
    make_mlp(0, hidden=16).save(source)
    assert main(["prune", "magnitude", str(source), str(tmp_path / "sparse.keras"), "--sparsity", "0.5"]) == 0
    assert sparsity_of(keras.saving.load_model(tmp_path / "sparse.keras")) == 0.5
    assert main(["prune", "magnitude", str(source), str(tmp_path / "nm.keras"), "--n-m", "2:4"]) == 0
    assert main(["prune", "channels", str(source), str(tmp_path / "small.keras"), "--ratio", "0.5"]) == 0
    small = keras.saving.load_model(tmp_path / "small.keras")
    assert small.get_layer("hidden").units == 8
    capsys.readouterr()
    assert main(["prune", "report", str(source), str(tmp_path / "small.keras"), "--repeats", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ratios"]["macs"] == (8 * 16 + 16 * 3) / (8 * 8 + 8 * 3)
    assert np.isfinite(result["after"]["latency_b256_s"])


def test_bad_arguments_exit_with_one_line_errors(tmp_path, capsys):
    source = tmp_path / "mlp.keras"
    make_mlp(0).save(source)
    assert main(["prune", "magnitude", str(source), str(tmp_path / "x.keras"), "--sparsity", "1.2"]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
    assert main(["prune", "magnitude", str(source), str(tmp_path / "x.keras"), "--n-m", "2-4"]) == 2
    assert "--n-m must look like 2:4" in capsys.readouterr().err
    assert main(["prune", "channels", str(tmp_path / "missing.keras"), str(tmp_path / "x.keras")]) == 2
    assert "does not exist" in capsys.readouterr().err
