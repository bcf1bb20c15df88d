"""ek.deploy.serve: a real server on 127.0.0.1 spoken to over HTTP with httpx."""

import inspect
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pytest

import ensemblekit as ek
from ensemblekit.deploy import running, serve
from ensemblekit.deploy.serve import ServedModel
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


class _GatedModel(ServedModel):
    """A served model whose warm-up and predict calls wait for events the test sets."""

    def __init__(self, model, name, warm=True, predict_delay_s=0.0):
        super().__init__(model, name=name)
        self.warmed = threading.Event()
        if warm:
            self.warmed.set()
        self.predict_delay_s = predict_delay_s

    def warm_up(self, batch_sizes):
        self.warmed.wait(60)
        super().warm_up(batch_sizes)

    def predict(self, rows):
        time.sleep(self.predict_delay_s)
        return super().predict(rows)


def _post_concurrently(url, bodies, timeout=60):
    """POST each body from its own thread at once; the replies in order."""
    barrier = threading.Barrier(len(bodies))

    def one(body):
        with httpx.Client(timeout=timeout) as client:
            barrier.wait(timeout=timeout)
            return client.post(url, json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def test_status_is_loading_until_warm_up_then_available(model):
    gated = _GatedModel(model, "gated", warm=False)
    with running(gated, wait_ready=False, allowed_batch_sizes=[1, 4, 16], max_batch=16) as service:
        assert service.states == {"gated": "LOADING"}
        status = httpx.get(service.model_url, timeout=30).json()["model_version_status"][0]
        assert status["state"] == "LOADING"
        assert httpx.get(service.url + "/healthz", timeout=30).status_code == 200
        early = httpx.post(service.model_url + ":predict", json={"instances": _rows(0, 1).tolist()}, timeout=30)
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        assert "warming up" in early.json()["error"]
        gated.warmed.set()
        service.wait_ready(60)
        status = httpx.get(service.model_url, timeout=30).json()["model_version_status"][0]
        assert status == {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        reply = httpx.post(service.model_url + ":predict", json={"instances": _rows(0, 2).tolist()}, timeout=30)
        assert reply.status_code == 200
        metrics = httpx.get(service.url + "/metrics", timeout=30).text
    assert _metric(metrics, 'ensemblekit_warmup_seconds{model="gated",version="1"}') > 0


def test_a_failed_warm_up_is_reported_and_predict_refused(model):
    class Broken(ServedModel):
        def warm_up(self, batch_sizes):
            raise RuntimeError("probe exploded")

    with running(Broken(model, name="broken"), wait_ready=False) as service:
        with pytest.raises(RuntimeError, match="broken: warm-up failed: RuntimeError: probe exploded"):
            service.wait_ready(60)
        status = httpx.get(service.model_url, timeout=30).json()["model_version_status"][0]
        assert status["state"] == "END" and status["status"]["error_code"] == "UNKNOWN"
        reply = httpx.post(service.model_url + ":predict", json={"instances": _rows(0, 1).tolist()}, timeout=30)
        assert reply.status_code == 503 and "probe exploded" in reply.json()["error"]


def test_a_full_queue_answers_503_with_retry_after_at_once(model):
    slow = _GatedModel(model, "slow", predict_delay_s=0.5)
    with running(slow, max_batch=1, max_enqueued=2, max_wait_ms=0) as service:
        started = time.monotonic()
        replies = _post_concurrently(service.model_url + ":predict",
                                     [{"instances": _rows(i, 1).tolist()} for i in range(8)])
        codes = sorted(r.status_code for r in replies)
        refused = [r for r in replies if r.status_code == 503]
        assert codes.count(200) >= 3 and len(refused) >= 1, codes
        assert set(codes) <= {200, 503}
        assert all(r.headers["retry-after"] == "1" and "max_enqueued" in r.json()["error"] for r in refused)
        assert all(r.elapsed.total_seconds() < 0.45 for r in refused)  # refused at once, not after a wait
        assert time.monotonic() - started < 30
        metrics = httpx.get(service.url + "/metrics", timeout=30).text
    assert _metric(metrics, 'ensemblekit_requests_total{route="/v1/models/{name}:predict",status="503"}') == len(refused)


def test_a_request_over_timeout_ms_gets_504_and_the_server_keeps_serving(model):
    slow = _GatedModel(model, "late")
    with running(slow, timeout_ms=200) as service:
        slow.predict_delay_s = 1.0
        reply = httpx.post(service.model_url + ":predict", json={"instances": _rows(0, 1).tolist()}, timeout=30)
        assert reply.status_code == 504 and "no answer within 200 ms" in reply.json()["error"]
        slow.predict_delay_s = 0.0
        time.sleep(1.0)  # let the late call finish
        x = _rows(1, 2)
        reply = httpx.post(service.model_url + ":predict", json={"instances": x.tolist()}, timeout=30)
        assert reply.status_code == 200
        np.testing.assert_allclose(reply.json()["predictions"], model.predict(x, verbose=0), atol=1e-5)


def test_padding_to_allowed_sizes_gives_the_same_rows(model):
    shapes = []

    class Recording(ServedModel):
        def predict(self, rows):
            shapes.append(rows.shape[0])
            return super().predict(rows)

    recording = Recording(model, name="padded")
    with running(recording, max_batch=16, allowed_batch_sizes=[1, 8, 16]) as service:
        assert sorted(set(shapes)) == [1, 8, 16]  # warm-up compiled each allowed size
        shapes.clear()
        x = _rows(7, 5)
        reply = httpx.post(service.model_url + ":predict", json={"instances": x.tolist()}, timeout=30)
        big = _rows(8, 20)
        big_reply = httpx.post(service.model_url + ":predict", json={"instances": big.tolist()}, timeout=30)
        metrics = httpx.get(service.url + "/metrics", timeout=30).text
    np.testing.assert_allclose(reply.json()["predictions"], model.predict(x, verbose=0), atol=1e-5)
    np.testing.assert_allclose(big_reply.json()["predictions"], model.predict(big, verbose=0), atol=1e-5)
    assert shapes == [8, 16, 8]  # 5 -> 8; 20 -> 16 + (4 -> 8)
    assert _metric(metrics, 'ensemblekit_padding_rows_total{model="padded",version="1"}') == 3 + 4


def _metric(text, sample):
    """The value of one sample line of a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_move_as_requests_are_made(client, service):
    predict_ok = 'ensemblekit_requests_total{route="/v1/models/{name}:predict",status="200"}'
    predict_bad = 'ensemblekit_requests_total{route="/v1/models/{name}:predict",status="400"}'
    before = client.get("/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    for i in range(3):
        assert client.post("/v1/models/ens:predict", json={"instances": _rows(i, 2).tolist()}).status_code == 200
    assert client.post("/v1/models/ens:predict", json={"instances": [[0.0] * 5]}).status_code == 400
    after = client.get("/metrics").text
    assert _metric(after, predict_ok) - _metric(before.text, predict_ok) == 3
    assert _metric(after, predict_bad) - _metric(before.text, predict_bad) == 1
    rows_sum = 'ensemblekit_batch_rows_sum{model="ens",version="1"}'
    assert _metric(after, rows_sum) - _metric(before.text, rows_sum) == 6
    count = 'ensemblekit_request_duration_seconds_count{route="/v1/models/{name}:predict"}'
    assert _metric(after, count) - _metric(before.text, count) == 4
    for name in ('ensemblekit_queue_depth{model="ens",version="1"}',
                 'ensemblekit_model_load_seconds{model="ens",version="1"}',
                 'ensemblekit_warmup_seconds{model="ens",version="1"}',
                 'ensemblekit_batch_rows_bucket{le="64.0",model="ens",version="1"}',
                 'ensemblekit_compilations_total{model="ens",version="1"}'):
        assert any(line.startswith(name + " ") for line in after.splitlines()), name


def test_two_servers_in_one_process_keep_their_own_metrics(service, model):
    with running(model, name="other") as other:
        httpx.post(other.model_url + ":predict", json={"instances": _rows(0, 1).tolist()}, timeout=30)
        other_metrics = httpx.get(other.url + "/metrics", timeout=30).text
    assert 'model="other"' in other_metrics and 'model="ens"' not in other_metrics


def test_stop_drains_accepted_requests_then_refuses_connections(model):
    slow = _GatedModel(model, "drain")
    service = serve(slow, port=0, block=False, max_batch=1)
    try:
        slow.predict_delay_s = 0.3
        with ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(httpx.post, service.model_url + ":predict",
                                   json={"instances": _rows(i, 1).tolist()}, timeout=60) for i in range(4)]
            deadline = time.monotonic() + 30
            while service.app.state.batcher.queue_depth < 3 and time.monotonic() < deadline:
                time.sleep(0.01)  # until all four are accepted: one in the model call, three queued
            started = time.monotonic()
            service._server.handle_exit(signal.SIGTERM, None)  # what SIGTERM does
            replies = [future.result() for future in pending]
        assert [r.status_code for r in replies] == [200] * 4
        with pytest.raises(httpx.ConnectError):
            httpx.get(service.model_url, timeout=5)
    finally:
        service.stop()
    assert time.monotonic() - started < 10


# --- versions ------------------------------------------------------------------------------


def test_versions_routes_status_metadata_and_predict(model):
    old, new = make_mlp(11), make_mlp(12, softmax=True)
    x = _rows(3, 3)
    with running({"m": {2: new, 1: old}}, max_batch=8) as service, \
            httpx.Client(base_url=service.url, timeout=30) as client:
        statuses = client.get("/v1/models/m").json()["model_version_status"]
        assert [(s["version"], s["state"]) for s in statuses] == [("1", "AVAILABLE"), ("2", "AVAILABLE")]
        assert client.get("/v1/models/m/versions/1").json() == {"model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
        assert client.get("/v1/models/m/versions/2/metadata").json()["model_spec"] == {"name": "m", "version": "2"}
        assert client.get("/v1/models/m/metadata").json()["model_spec"]["version"] == "2"
        answers = {path: client.post(path, json={"instances": x.tolist()})
                   for path in ("/v1/models/m/versions/1:predict", "/v1/models/m/versions/2:predict",
                                "/v1/models/m:predict")}
        for path, expected in zip(answers, (old, new, new)):
            assert answers[path].status_code == 200, answers[path].text
            np.testing.assert_allclose(answers[path].json()["predictions"], expected.predict(x, verbose=0),
                                       atol=1e-5, err_msg=path)
        assert service.version_states == {"m": {1: "AVAILABLE", 2: "AVAILABLE"}}
        for bad in ("/v1/models/m/versions/3", "/v1/models/m/versions/x:predict"):
            reply = client.request("GET" if bad.endswith("3") else "POST", bad, json={"instances": x.tolist()})
            assert reply.status_code == 404 and "its versions are 1, 2" in reply.json()["error"], bad
        metrics = client.get("/metrics").text
    assert _metric(metrics, 'ensemblekit_batch_rows_sum{model="m",version="1"}') == 3
    assert _metric(metrics, 'ensemblekit_batch_rows_sum{model="m",version="2"}') == 6


def test_models_config_file_serves_each_model_and_version(tmp_path):
    v1, v2, other = make_mlp(21), make_mlp(22), make_mlp(23, softmax=True)
    for model_file, m in (("v1.keras", v1), ("v2.keras", v2), ("other.keras", other)):
        m.save(tmp_path / model_file)
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - name: ens\n    versions: {1: v1.keras, 2: v2.keras}\n"
                      "  - name: other\n    path: other.keras\n")
    x = _rows(4, 2)
    with running(None, models_config=config) as service:
        assert service.version_states == {"ens": {1: "AVAILABLE", 2: "AVAILABLE"}, "other": {1: "AVAILABLE"}}
        for path, expected in (("ens/versions/1", v1), ("ens", v2), ("other/versions/1", other)):
            reply = httpx.post(f"{service.url}/v1/models/{path}:predict", json={"instances": x.tolist()},
                               timeout=30)
            np.testing.assert_allclose(reply.json()["predictions"], expected.predict(x, verbose=0), atol=1e-5)


def test_model_and_models_config_are_exclusive(model, tmp_path):
    with pytest.raises(ValueError, match="give either model or models_config"):
        serve(model, models_config=tmp_path / "m.json", port=0, block=False)
    with pytest.raises(ValueError, match="has version 0; versions are integers >= 1"):
        serve({"m": {0: model}}, port=0, block=False)


# --- named inputs and outputs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def named_model():
    """Inputs "a" (3,) and "b" (2,); outputs {"label": softmax (4,), "value": (1,)}."""
    keras.utils.set_random_seed(3)
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    hidden = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b]))
    return keras.Model({"a": a, "b": b}, {"label": keras.layers.Dense(4, activation="softmax")(hidden),
                                         "value": keras.layers.Dense(1)(hidden)}, name="named")


@pytest.fixture(scope="module")
def named_service(named_model):
    with running(named_model, max_batch=16, max_wait_ms=20) as service:
        yield service


def _named_rows(seed, n):
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(n, 3)).astype("float32"), "b": rng.normal(size=(n, 2)).astype("float32")}


def _instances(rows):
    return [{"a": a.tolist(), "b": b.tolist()} for a, b in zip(rows["a"], rows["b"])]


def test_named_inputs_row_format_answers_every_output_by_name(named_service, named_model):
    rows = _named_rows(0, 3)
    reply = httpx.post(named_service.model_url + ":predict", json={"instances": _instances(rows)}, timeout=30)
    assert reply.status_code == 200, reply.text
    expected = named_model.predict(rows, verbose=0)
    predictions = reply.json()["predictions"]
    assert len(predictions) == 3 and all(set(p) == {"label", "value"} for p in predictions)
    np.testing.assert_allclose([p["label"] for p in predictions], expected["label"], atol=1e-5)
    np.testing.assert_allclose([p["value"] for p in predictions], expected["value"], atol=1e-5)


def test_named_inputs_columnar_format(named_service, named_model):
    rows = _named_rows(1, 2)
    reply = httpx.post(named_service.model_url + ":predict",
                       json={"inputs": {n: v.tolist() for n, v in rows.items()}}, timeout=30)
    assert reply.status_code == 200, reply.text
    outputs, expected = reply.json()["outputs"], named_model.predict(rows, verbose=0)
    assert set(outputs) == {"label", "value"}
    for name in outputs:
        np.testing.assert_allclose(outputs[name], expected[name], atol=1e-5)


def test_named_input_requests_share_calls_and_keep_their_rows(named_service, named_model):
    requests = [_named_rows(10 + i, 1 + i % 3) for i in range(12)]
    calls_before = len(named_service.batch_sizes)
    replies = _post_concurrently(named_service.model_url + ":predict",
                                 [{"instances": _instances(r)} for r in requests])
    for rows, reply in zip(requests, replies):
        assert reply.status_code == 200, reply.text
        expected = named_model.predict(rows, verbose=0)
        np.testing.assert_allclose([p["value"] for p in reply.json()["predictions"]], expected["value"], atol=1e-5)
        np.testing.assert_allclose([p["label"] for p in reply.json()["predictions"]], expected["label"], atol=1e-5)
    new_calls = named_service.batch_sizes[calls_before:]
    assert sum(new_calls) == sum(len(r["a"]) for r in requests)
    assert len(new_calls) < len(requests)  # some requests shared a model call


NAMED_BAD_REQUESTS = [
    ("missing input", {"instances": [{"a": [0.0] * 3}]}, "model 'named': instance 0 of \"instances\" lacks input 'b'"),
    ("unknown input", {"instances": [{"a": [0.0] * 3, "b": [0.0] * 2, "c": [1.0]}]}, "has unknown input 'c'"),
    ("wrong shape", {"instances": [{"a": [0.0] * 4, "b": [0.0] * 2}]},
     "input \"a\" of \"instances\" has shape (1, 4); expected instances of shape (3,)"),
    ("columns differ", {"inputs": {"a": [[0.0] * 3] * 2, "b": [[0.0] * 2]}}, "different numbers of rows: a 2, b 1"),
    ("columnar wrong shape", {"inputs": {"a": [[0.0] * 3], "b": [[0.0] * 5]}},
     "input \"b\" of \"inputs\" has shape (1, 5); expected instances of shape (2,)"),
    ("plain rows", {"instances": [[0.0] * 5]}, "it has inputs 'a', 'b'; send"),
    ("mixed rows", {"instances": [{"a": [0.0] * 3, "b": [0.0] * 2}, [0.0] * 5]}, "instance 1 of \"instances\" is not"),
]


@pytest.mark.parametrize(("body", "message"), [r[1:] for r in NAMED_BAD_REQUESTS],
                         ids=[r[0] for r in NAMED_BAD_REQUESTS])
def test_bad_named_inputs_get_400_naming_the_input_and_shape(named_service, named_model, body, message):
    reply = httpx.post(named_service.model_url + ":predict", json=body, timeout=30)
    assert reply.status_code == 400
    assert message in reply.json()["error"], reply.json()["error"]
    test_named_inputs_columnar_format(named_service, named_model)  # still serving


def test_named_metadata_lists_every_input_and_output(named_service):
    metadata = httpx.get(named_service.model_url + "/metadata", timeout=30).json()["metadata"]
    shapes = {side: {n: t["tensor_shape"] for n, t in metadata["signature_def"][side].items()}
              for side in ("inputs", "outputs")}
    assert shapes == {"inputs": {"a": [-1, 3], "b": [-1, 2]}, "outputs": {"label": [-1, 4], "value": [-1, 1]}}
    assert metadata["inputs"]["a"]["name"] == "a" and metadata["outputs"]["value"]["dtype"] == "float32"


def test_single_input_list_outputs_and_single_input_by_name(tmp_path):
    keras.utils.set_random_seed(4)
    x_in = keras.Input((8,), name="x")
    hidden = keras.layers.Dense(4)(x_in)
    two_heads = keras.Model(x_in, [keras.layers.Dense(2, name="first")(hidden),
                                   keras.layers.Dense(3, name="second")(hidden)], name="heads")
    x = _rows(5, 2)
    with running(two_heads) as service:
        rows = httpx.post(service.model_url + ":predict", json={"instances": x.tolist()}, timeout=30).json()
        by_name = httpx.post(service.model_url + ":predict", json={"inputs": {"x": x.tolist()}}, timeout=30).json()
    expected = two_heads.predict(x, verbose=0)
    np.testing.assert_allclose([p["first"] for p in rows["predictions"]], expected[0], atol=1e-5)
    np.testing.assert_allclose(by_name["outputs"]["second"], expected[1], atol=1e-5)


def test_compilations_counter_stops_after_warm_up_with_allowed_sizes(model):
    with running(model, name="shapes", max_batch=8, allowed_batch_sizes=[1, 4, 8]) as service:
        sample = 'ensemblekit_compilations_total{model="shapes",version="1"}'
        after_warm_up = _metric(httpx.get(service.url + "/metrics", timeout=30).text, sample)
        for n in (1, 2, 3, 5, 7, 8, 11):
            reply = httpx.post(service.model_url + ":predict", json={"instances": _rows(n, n).tolist()}, timeout=30)
            assert reply.status_code == 200
        after_requests = _metric(httpx.get(service.url + "/metrics", timeout=30).text, sample)
    assert after_warm_up == 3  # one trace per allowed batch size
    assert after_requests == 3  # every request was padded to a compiled size


def test_a_client_that_leaves_mid_body_is_counted_499_and_the_server_keeps_serving(client, service, model):
    import socket

    sample = 'ensemblekit_requests_total{route="/v1/models/{name}:predict",status="499"}'
    before = _metric(client.get("/metrics").text, sample)
    host, port = service.url.split("//", 1)[1].rsplit(":", 1)
    body = json.dumps({"instances": _rows(0, 2).tolist()}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/models/ens:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
        time.sleep(0.2)  # the server is reading the body
    deadline = time.monotonic() + 10
    while _metric(client.get("/metrics").text, sample) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(client.get("/metrics").text, sample) == before + 1
    _assert_serves(client, model)


def test_predict_reports_its_server_time(client):
    reply = client.post("/v1/models/ens:predict", json={"instances": _rows(0, 1).tolist()})
    timing = reply.headers["server-timing"]
    assert timing.startswith("app;dur=") and 0 < float(timing.split("=", 1)[1]) < reply.elapsed.total_seconds() * 1000
