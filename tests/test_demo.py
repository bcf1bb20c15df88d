"""The mnist1d flow of the demo: the qualitative claims the README reports."""

import pytest

from ensemblekit import cli, demo


def test_cli_lists_demo_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--members" in capsys.readouterr().out


@pytest.mark.slow
def test_mnist1d_compositions_beat_members_and_calibration_helps(tmp_path):
    rows, _ = demo.run_demo(members=5, epochs=15, seed=0, verbose=0, json_path=tmp_path / "d.json")
    scores = dict(rows)
    members = [s for label, s in rows if label.startswith("member ")]
    mean = scores["ensemble mean"]
    assert len(members) == 5
    assert mean["accuracy"] >= max(m["accuracy"] for m in members)
    # The tolerance: learned compositions within half a point of the plain mean.
    assert scores["stack logistic"]["accuracy"] >= mean["accuracy"] - 0.005
    assert scores["optimize_weights (weighted)"]["accuracy"] >= mean["accuracy"] - 0.005
    assert scores["calibrate(ensemble mean)"]["ece"] < mean["ece"]
    assert scores["calibrate(ensemble mean)"]["accuracy"] == mean["accuracy"]
    assert (tmp_path / "d.json").is_file()
