"""ek.deploy.serve: a real server on 127.0.0.1 spoken to over HTTP with httpx."""

import inspect
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit.deploy import running, serve
from tests.conftest import make_mlp

httpx = pytest.importorskip("httpx", reason='needs pip install "ensemblekit[serve]"')
pytest.importorskip("fastapi", reason='needs pip install "ensemblekit[serve]"')
pytest.importorskip("uvicorn", reason='needs pip install "ensemblekit[serve]"')

MAX_BODY = 4096


@pytest.fixture(scope="module")
def model():
    return ek.ensemble([make_mlp(seed, softmax=seed % 2 == 1) for seed in range(3)], method="mean")


@pytest.fixture(scope="module")
def service(model):
    with running(model, name="ens", max_batch=64, max_wait_ms=20, max_body_bytes=MAX_BODY) as service:
        yield service


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service.url, timeout=30) as client:
        yield client


def _rows(seed, n):
    return np.random.default_rng(seed).normal(size=(n, 8)).astype("float32")


def _assert_serves(client, model, seed=0):
    x = _rows(seed, 3)
    reply = client.post("/v1/models/ens:predict", json={"instances": x.tolist()})
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(reply.json()["predictions"], model.predict(x, verbose=0), atol=1e-5)


def test_predictions_equal_model_predict(client, model):
    _assert_serves(client, model)


def test_columnar_inputs_format(client, model):
    x = _rows(1, 2)
    reply = client.post("/v1/models/ens:predict", json={"inputs": x.tolist()})
    np.testing.assert_allclose(reply.json()["outputs"], model.predict(x, verbose=0), atol=1e-5)


def test_status_metadata_and_docs(client, service):
    assert service.url.startswith("http://127.0.0.1:")
    assert client.get("/v1/models/ens").json() == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    metadata = client.get("/v1/models/ens/metadata").json()["metadata"]
    assert metadata["inputs"]["tensor_shape"] == [-1, 8] and metadata["outputs"]["tensor_shape"] == [-1, 3]
    assert client.get("/docs").status_code == 200
    assert "/v1/models/{name}:predict" in client.get("/openapi.json").json()["paths"]


def test_32_concurrent_clients_each_get_their_own_answers(service, model):
    barrier = threading.Barrier(32)
    calls_before = len(service.batch_sizes)

    def one_client(i):
        x = _rows(100 + i, 1 + i % 4)
        with httpx.Client(base_url=service.url, timeout=60) as client:
            barrier.wait(timeout=60)
            reply = client.post("/v1/models/ens:predict", json={"instances": x.tolist()})
        return x, reply

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one_client, range(32)))
    expected = model.predict(np.concatenate([x for x, _ in results]), verbose=0)
    start = 0
    for x, reply in results:
        assert reply.status_code == 200, reply.text
        np.testing.assert_allclose(reply.json()["predictions"], expected[start:start + len(x)], atol=1e-5)
        start += len(x)
    new_calls = service.batch_sizes[calls_before:]
    assert sum(new_calls) == sum(len(x) for x, _ in results)
    assert len(new_calls) < 32  # some requests shared a model call


BAD_REQUESTS = [
    ("invalid json", "/v1/models/ens:predict", b'{"instances": [1, 2', 400, "not valid JSON"),
    ("no instances", "/v1/models/ens:predict", b'{"rows": [[1]]}', 400, '{"instances"'),
    ("empty", "/v1/models/ens:predict", b'{"instances": []}', 400, "non-empty list"),
    ("wrong shape", "/v1/models/ens:predict", json.dumps({"instances": [[0.0] * 5]}).encode(), 400,
     r"shape (1, 5); expected instances of shape (8,)"),
    ("flat instance", "/v1/models/ens:predict", json.dumps({"instances": [0.0] * 8}).encode(), 400,
     "shape (8,); expected"),
    ("ragged", "/v1/models/ens:predict", json.dumps({"instances": [[0.0] * 8, [0.0] * 7]}).encode(),
     400, "ragged"),
    ("non numeric", "/v1/models/ens:predict", json.dumps({"instances": [["a"] * 8]}).encode(), 400,
     "non-numeric"),
    ("null", "/v1/models/ens:predict", json.dumps({"instances": [[None] * 8]}).encode(), 400,
     "non-numeric"),
    ("nan", "/v1/models/ens:predict", b'{"instances": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}', 400, "NaN"),
    ("unknown model", "/v1/models/nope:predict", json.dumps({"instances": [[0.0] * 8]}).encode(), 404,
     "model 'nope' is not served here; the served model is 'ens'"),
    ("too large", "/v1/models/ens:predict", json.dumps({"instances": [[0.0] * 8] * 200}).encode(), 413,
     f"limit of {MAX_BODY} bytes"),
    ("unknown route", "/v2/whatever", b"{}", 404, "expected GET /v1/models/ens"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), [r[1:] for r in BAD_REQUESTS],
                         ids=[r[0] for r in BAD_REQUESTS])
def test_bad_request_gets_one_line_4xx_and_server_keeps_serving(client, model, path, body, status, message):
    reply = client.post(path, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status
    error = reply.json()["error"]
    assert message in error
    assert "\n" not in error and "Traceback" not in reply.text
    _assert_serves(client, model, seed=status)


def test_chunked_body_over_the_limit_is_refused(client, model):
    def chunks():
        yield b'{"instances": ['
        for _ in range(MAX_BODY // 20):
            yield b"[0, 0, 0, 0, 0, 0, 0, 0],"
        yield b"[0, 0, 0, 0, 0, 0, 0, 0]]}"

    reply = client.post("/v1/models/ens:predict", content=chunks())
    assert reply.status_code == 413 and "limit" in reply.json()["error"]
    _assert_serves(client, model)


def test_binds_loopback_by_default():
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


def test_stop_frees_the_port_and_threads(model):
    threads_before = set(threading.enumerate())
    with running(model, name="short") as service:
        assert httpx.get(service.model_url, timeout=30).status_code == 200
        url = service.model_url
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)
    assert set(threading.enumerate()) - threads_before == set()


def test_keras_file_is_loaded_in_safe_mode(tmp_path):
    lambda_model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda x: x * 2)])
    lambda_model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="could not load .*lambda.keras"):
        serve(tmp_path / "lambda.keras", port=0, block=False)


def test_model_file_name_is_the_default_name(tmp_path):
    make_mlp(0).save(tmp_path / "mlp.keras")
    with running(tmp_path / "mlp.keras") as service:
        assert service.model_url.endswith("/v1/models/mlp")
        reply = httpx.post(service.model_url + ":predict", json={"instances": _rows(0, 1).tolist()}, timeout=30)
        assert reply.status_code == 200


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"name": "a/b"}, ValueError, "name 'a/b' cannot be used in a URL"),
    ({"max_batch": 0}, ValueError, "max_batch is 0"),
    ({"max_body_bytes": 0}, ValueError, "max_body_bytes is 0"),
])
def test_bad_settings(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        serve(model, port=0, block=False, **kwargs)


def test_port_in_use_is_one_line(service, model):
    port = int(service.url.rsplit(":", 1)[1])
    with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
        serve(model, port=port, block=False)


def test_not_a_model_is_a_type_error():
    with pytest.raises(TypeError, match="model must be a keras.Model or a path"):
        serve("not a model".split(), port=0, block=False)


def test_serves_a_packed_model_file_with_its_custom_layers(tmp_path):
    from ensemblekit.pack import pack

    packed = pack([make_mlp(seed) for seed in range(3)], reduce="mean")
    packed.save(tmp_path / "packed.keras")
    x = _rows(5, 4)
    with running(tmp_path / "packed.keras") as service:
        reply = httpx.post(service.model_url + ":predict", json={"instances": x.tolist()}, timeout=30)
    np.testing.assert_allclose(reply.json()["predictions"], packed.predict(x, verbose=0), atol=1e-5)


def test_missing_serving_stack_names_the_extra(model, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(ImportError, match=r'fastapi.*pip install "ensemblekit\[serve\]"'):
        serve(model, port=0, block=False)
