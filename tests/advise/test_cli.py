"""ensemblekit.advise.cli: ``ensemblekit advise`` writes the table and JSON; one-line errors."""

import json

import numpy as np

from ensemblekit.advise import CANDIDATES
from ensemblekit.cli import main
from tests.conftest import save_all


def test_cli_writes_table_and_json(tmp_path, capsys, members, data):
    models = members
    _, (xv, yv) = data
    paths = save_all(models[:2], tmp_path)
    np.savez(tmp_path / "val.npz", x_val=xv[:200], y_val=yv[:200])
    args = ["advise", *map(str, paths), "--data", str(tmp_path / "val.npz"), "--budget", "1", "-q",
            "--json", str(tmp_path / "advice.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "advice.json").read_text())
    assert f"recommendation: {written['recommendation']}" in out
    assert written["budget"] == 1.0 and written["score_size"] == 100 and len(written["rows"]) == len(CANDIDATES)
    # Sequential members loaded from .keras files still get aligned (align sees fresh clones).
    assert next(r for r in written["rows"] if r["name"] == "aligned_soup")["nll"] is not None
    assert main(["advise", *map(str, paths), "--data", "nope.csv"]) == 2
    assert "--data must be mnist1d, digits, an .npz file or a folder" in capsys.readouterr().err
    assert main(["advise", str(paths[0]), "--data", str(tmp_path / "val.npz")]) == 2
    assert "advise needs at least 2 members" in capsys.readouterr().err
