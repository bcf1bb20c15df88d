"""``ensemblekit serve``: a real process, stopped by SIGTERM/SIGINT, leaving nothing behind."""

import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import make_mlp

httpx = pytest.importorskip("httpx", reason='needs pip install "ensemblekit[serve]"')
pytest.importorskip("uvicorn", reason='needs pip install "ensemblekit[serve]"')


def _start(model_path, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "ensemblekit.cli", "serve", str(model_path), "--port", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


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
        ready, _, _ = select.select([process.stdout], [], [], 120)
        line = process.stdout.readline() if ready else ""  # printed once requests are accepted
        assert "POST http://127.0.0.1:" in line, (line, process.stderr.read() if process.poll() else "")
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
