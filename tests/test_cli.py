"""The ``ensemblekit`` command: real options in every --help, one-line errors, no tracebacks."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ensemblekit import cli
from ensemblekit.prune import cli as prune_cli
from tests.conftest import make_mlp

REPO = Path(__file__).resolve().parents[1]

# Each sub-command and options its --help must list (and the parser must accept).
HELP_OPTIONS = {
    (): ["demo", "serve", "merge", "bench", "prune", "advise", "distill"],
    ("distill",): ["--student", "--data", "--output", "--temperature", "--alpha", "--epochs", "--width"],
    ("advise",): ["--data", "--budget", "--cost", "--metric", "--base", "--json"],
    ("demo",): ["--members", "--epochs", "--seed", "--json", "--quiet"],
    ("serve",): ["--name", "--host", "--port", "--max-batch", "--max-wait-ms", "--max-body-bytes"],
    ("merge",): ["--output", "--quiet"],
    ("bench",): ["throughput"],
    ("bench", "throughput"): ["--quick", "--out", "--workloads", "--members", "--batches", "--repeats"],
    ("prune",): ["magnitude", "channels", "report"],
    ("prune", "magnitude"): ["--sparsity", "--scope", "--n-m"],
    ("prune", "channels"): ["--ratio", "--importance", "--round-to", "--global-ranking"],
    ("prune", "report"): ["--repeats"],
}

# Arguments that parse, for each runnable sub-command: a bad option is appended to them.
VALID_ARGS = {
    "demo": ["demo"],
    "serve": ["serve", "m.keras"],
    "merge": ["merge", "c.yaml"],
    "bench throughput": ["bench", "throughput"],
    "prune magnitude": ["prune", "magnitude", "m.keras", "o.keras"],
    "prune channels": ["prune", "channels", "m.keras", "o.keras"],
    "prune report": ["prune", "report", "a.keras", "b.keras"],
    "advise": ["advise", "a.keras", "b.keras", "--data", "digits"],
    "distill": ["distill", "t.keras", "--student", "s.keras", "--data", "digits", "-o", "o.keras"],
}


def _one_error_line(capsys):
    """stderr of the last call: exactly one line, ``ensemblekit ...: error: ...``; return it."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert re.match(r"ensemblekit[\w ]*: error: ", lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize("command", list(HELP_OPTIONS), ids=lambda c: " ".join(c) or "top")
def test_help_lists_real_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in HELP_OPTIONS[command]:
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), (command, option)


def test_listed_options_are_accepted_by_the_parser():
    parser = cli.build_parser()
    args = parser.parse_args(["prune", "channels", "m.keras", "o.keras", "--ratio", "0.3",
                              "--importance", "l2", "--round-to", "8", "--global-ranking"])
    assert (args.ratio, args.importance, args.round_to, args.global_ranking) == (0.3, "l2", 8, True)
    args = parser.parse_args(["serve", "m.keras", "--port", "0", "--max-batch", "1",
                              "--max-wait-ms", "2.5", "--name", "n", "--host", "0.0.0.0"])
    assert (args.port, args.max_batch, args.max_wait_ms, args.name) == (0, 1, 2.5, "n")


@pytest.mark.parametrize("command", list(VALID_ARGS))
def test_bad_option_is_one_line_and_status_2(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*VALID_ARGS[command], "--no-such-option"])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys)
    assert "unrecognized arguments: --no-such-option" in line


def test_bad_choice_and_missing_argument_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prune", "channels", "m.keras", "o.keras", "--importance", "bogus"])
    assert exit_info.value.code == 2
    assert "ensemblekit prune channels: error: argument --importance" in _one_error_line(capsys)
    with pytest.raises(SystemExit):
        cli.main(["merge"])
    assert "the following arguments are required: config" in _one_error_line(capsys)
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])
    assert "invalid choice: 'nonsense'" in _one_error_line(capsys)


@pytest.mark.parametrize("argv", [
    ["serve", "{missing}", "--port", "0"],
    ["merge", "{missing_config}"],
    ["prune", "magnitude", "{missing}", "{out}"],
    ["prune", "channels", "{missing}", "{out}"],
    ["prune", "report", "{model}", "{missing}"],
    ["advise", "{model}", "{missing}", "--data", "digits"],
], ids=["serve", "merge", "prune magnitude", "prune channels", "prune report", "advise"])
def test_missing_file_is_one_line_and_status_2(argv, tmp_path, capsys):
    model = tmp_path / "m.keras"
    make_mlp(0).save(model)
    paths = {"missing": tmp_path / "absent.keras", "missing_config": tmp_path / "absent.yaml",
             "out": tmp_path / "o.keras", "model": model}
    assert cli.main([a.format(**paths) for a in argv]) == 2
    line = _one_error_line(capsys)
    assert "absent." in line and "does not exist" in line
    assert not (tmp_path / "o.keras").exists()


def test_unwritable_output_is_one_line_for_prune_and_merge(tmp_path, capsys):
    """An output path below a regular file raises FileExistsError deep in saving: caught in main."""
    model = tmp_path / "m.keras"
    make_mlp(0).save(model)
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    assert cli.main(["prune", "magnitude", str(model), str(blocker / "o.keras")]) == 2
    assert _one_error_line(capsys).endswith(f"File exists: {str(blocker)!r}")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"models": [str(model), str(model)], "method": "linear",
                                  "output": str(blocker / "merged.keras")}))
    assert cli.main(["merge", str(config), "-q"]) == 2
    assert "File exists" in _one_error_line(capsys)


@pytest.mark.parametrize("error", [KeyError("member_3"), ImportError("pip install x\nmore"),
                                   PermissionError(13, "Permission denied", "/root/m.keras")])
def test_input_errors_of_any_command_are_caught_in_one_place(error, monkeypatch, capsys):
    def failing_run(args):
        raise error

    monkeypatch.setattr(prune_cli, "_run_report", failing_run)
    assert cli.main(["prune", "report", "a.keras", "b.keras"]) == 2
    line = _one_error_line(capsys)
    expected = {KeyError: "KeyError: member_3", ImportError: "pip install x",
                PermissionError: "Permission denied: '/root/m.keras'"}[type(error)]
    assert line == f"ensemblekit prune: error: {expected}"


def test_programming_errors_still_raise(monkeypatch):
    """Only input errors are turned into messages; a bug keeps its traceback."""
    def failing_run(args):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(prune_cli, "_run_report", failing_run)
    with pytest.raises(ZeroDivisionError):
        cli.main(["prune", "report", "a.keras", "b.keras"])


def test_console_error_has_no_traceback(tmp_path):
    """End to end in a fresh interpreter: status 2 and one ``ensemblekit`` line on stderr."""
    model = tmp_path / "m.keras"
    make_mlp(0).save(model)
    (tmp_path / "file.txt").write_text("")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "ensemblekit.cli", "prune", "magnitude", str(model),
         str(tmp_path / "file.txt" / "o.keras")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # TensorFlow's C++ start-up logging (absl) ignores TF_CPP_MIN_LOG_LEVEL on some builds.
    ours = [line for line in result.stderr.splitlines() if line.startswith("ensemblekit")]
    assert ours == [f"ensemblekit prune: error: File exists: {str(tmp_path / 'file.txt')!r}"], \
        result.stderr


def test_distill_command_writes_a_trained_student(tmp_path, capsys):
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x_train=rng.normal(size=(40, 8)).astype("float32"),
             y_train=rng.integers(0, 3, 40))
    for seed in range(2):
        make_mlp(seed).save(tmp_path / f"t{seed}.keras")
    make_mlp(5).save(tmp_path / "student.keras")
    out = tmp_path / "out.keras"
    status = cli.main(["distill", str(tmp_path / "t0.keras"), str(tmp_path / "t1.keras"),
                       "--student", str(tmp_path / "student.keras"), "--data", str(tmp_path / "data.npz"),
                       "-o", str(out), "--epochs", "2", "--quiet"])
    assert status == 0 and "student written to" in capsys.readouterr().out
    trained = keras.saving.load_model(out)
    assert not np.allclose(trained.get_weights()[0], make_mlp(5).get_weights()[0])
