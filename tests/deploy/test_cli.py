"""``ensemblekit serve``: a real process, stopped by SIGTERM/SIGINT, leaving nothing behind."""

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ensemblekit.cli import main
from ensemblekit.deploy.cli import model_arguments
from tests.conftest import make_mlp

httpx = pytest.importorskip("httpx", reason='needs pip install "ensemblekit[serve]"')
pytest.importorskip("uvicorn", reason='needs pip install "ensemblekit[serve]"')


def _start(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "ensemblekit.cli", "serve", *map(str, args), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def _wait_for_announcement(process):
    ready, _, _ = select.select([process.stdout], [], [], 120)
    line = process.stdout.readline() if ready else ""  # printed once warm-up has ended
    assert "POST http://127.0.0.1:" in line, (line, process.stderr.read() if process.poll() else "")
    return line


@contextlib.contextmanager
def _serving(*args):
    """A started ``ensemblekit serve`` process and its base URL; killed if the test leaves it running."""
    process = _start(*args)
    try:
        line = _wait_for_announcement(process)
        yield process, line.split("POST ", 1)[1].split("/v1/models/", 1)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    "stop_signal",
    [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=["SIGTERM", "SIGINT"],
)
def test_serve_command_answers_then_stops_cleanly(tmp_path, stop_signal):
    model = make_mlp(3)
    model.save(tmp_path / "mlp.keras")
    process = _start(tmp_path / "mlp.keras", "--name", "mlp", "--max-batch", "8")
    try:
        line = _wait_for_announcement(process)
        url = line.split("POST ", 1)[1].split(":predict", 1)[0]
        x = np.random.default_rng(0).normal(size=(2, 8)).astype("float32")
        reply = httpx.post(url + ":predict", json={"instances": x.tolist()}, timeout=30)
        np.testing.assert_allclose(reply.json()["predictions"], model.predict(x, verbose=0), atol=1e-5)
        process.send_signal(stop_signal)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "stopped" in process.stderr.read()
    deadline = time.monotonic() + 10
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(process.pid)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)


@pytest.mark.slow
def test_serve_command_reports_a_bad_model_file(tmp_path):
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    result = subprocess.run(
        [sys.executable, "-m", "ensemblekit.cli", "serve", str(tmp_path / "broken.keras"), "--port", "0"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 2
    assert "ensemblekit serve: error:" in result.stderr and "not a valid .keras archive" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_command_serves_several_models_with_batching_options(tmp_path):
    models = {"a": make_mlp(1), "b": make_mlp(2, softmax=True)}
    for name, model in models.items():
        model.save(tmp_path / f"{name}.keras")
    with _serving(f"a={tmp_path / 'a.keras'}", f"b={tmp_path / 'b.keras'}", "--max-batch", "8",
                  "--allowed-batch-sizes", "1,4,8", "--max-enqueued", "4", "--timeout-ms", "20000") as (process, base):
        x = np.random.default_rng(0).normal(size=(3, 8)).astype("float32")
        for name, model in models.items():
            assert httpx.get(f"{base}/v1/models/{name}", timeout=30).json()[
                "model_version_status"][0]["state"] == "AVAILABLE"
            reply = httpx.post(f"{base}/v1/models/{name}:predict", json={"instances": x.tolist()}, timeout=30)
            np.testing.assert_allclose(reply.json()["predictions"], model.predict(x, verbose=0), atol=1e-5)
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert 'ensemblekit_padding_rows_total{model="a",version="1"} 1.0' in metrics  # 3 rows -> allowed size 4
        assert 'ensemblekit_batch_rows_bucket{le="4.0",model="b",version="1"} 1.0' in metrics
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def test_model_arguments_one_path_or_named_paths():
    assert model_arguments(["m.keras"]) == "m.keras"
    assert model_arguments(["/tmp/x=y.keras"]) == "/tmp/x=y.keras"  # not a NAME=PATH pair
    assert model_arguments(["a=ens.keras", "b=packed.keras"]) == {"a": "ens.keras", "b": "packed.keras"}
    with pytest.raises(ValueError, match="needs NAME=PATH for each; got a=ens.keras packed.keras"):
        model_arguments(["a=ens.keras", "packed.keras"])
    with pytest.raises(ValueError, match="model names repeat: a a"):
        model_arguments(["a=x.keras", "a=y.keras"])
    with pytest.raises(ValueError, match="--name cannot be used"):
        model_arguments(["a=x.keras"], name="z")


def test_bad_allowed_batch_sizes_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "m.keras", "--allowed-batch-sizes", "1,eight"])
    assert exit_info.value.code == 2
    assert "'1,eight' is not a comma-separated list of integers" in capsys.readouterr().err


def test_allowed_batch_sizes_not_ending_with_max_batch_is_reported(tmp_path, capsys):
    make_mlp(0).save(tmp_path / "m.keras")
    code = main(["serve", str(tmp_path / "m.keras"), "--port", "0", "--allowed-batch-sizes", "1,8"])
    assert code == 2
    assert "allowed_batch_sizes ends with 8 but max_batch is 64" in capsys.readouterr().err


def test_serve_command_with_a_models_config_serves_versions(tmp_path):
    old, new = make_mlp(1), make_mlp(2)
    old.save(tmp_path / "old.keras")
    new.save(tmp_path / "new.keras")
    (tmp_path / "models.json").write_text(
        '{"models": [{"name": "m", "versions": {"1": "old.keras", "2": "new.keras"}}]}')
    with _serving("--models-config", tmp_path / "models.json", "--max-batch", "4") as (process, base):
        statuses = httpx.get(f"{base}/v1/models/m", timeout=30).json()["model_version_status"]
        assert [(s["version"], s["state"]) for s in statuses] == [("1", "AVAILABLE"), ("2", "AVAILABLE")]
        x = np.random.default_rng(0).normal(size=(2, 8)).astype("float32")
        for path, model in (("/v1/models/m/versions/1", old), ("/v1/models/m", new)):
            reply = httpx.post(f"{base}{path}:predict", json={"instances": x.tolist()}, timeout=30)
            np.testing.assert_allclose(reply.json()["predictions"], model.predict(x, verbose=0), atol=1e-5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
