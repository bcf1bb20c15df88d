"""HTTP serving: throughput, overload, faults, SIGTERM, cold start: ``python -m benchmarks.serving``.

``--scenarios`` picks the runs (default all); ``--quick`` shortens each. Results
of the scenarios run replace those sections of benchmarks/results/serving.json
(and .md), so one scenario can be rerun alone; a ``--quick`` run that includes
``throughput`` writes serving_quick.* instead, keeping the full throughput table.

throughput (the original run):

Starts ``ensemblekit serve`` on 127.0.0.1 (a fresh process per configuration),
then runs N concurrent clients x M requests of one instance each over loopback
and reports requests/s and p50/p99 latency for: the K=8 Conv1D ensemble and a
single member, micro-batching on (``--max-batch 64``) and off (``--max-batch 1``,
one model call per request), with 1, 8 and 32 concurrent clients, for the
``cnn1d`` and ``mlp`` members of ``ensemblekit.bench.throughput``. Every run is
bounded by its request count. Writes benchmarks/results/serving.{json,md,png}.

The production runs (on the K=8 ensemble of ``--production-workload``, cnn2d by
default, whose model calls rather than HTTP handling bound its capacity; each bounded in time):
``capacity`` (closed loop, 16 clients),
``overload`` (open-loop arrivals at 4x capacity with ``--max-enqueued``),
``faults`` (disconnects, slow bodies, a 10 MB body, malformed JSON, among good
clients whose answers are checked against ``model.predict``), ``sigterm``
(SIGTERM under load), ``coldstart`` (process start to AVAILABLE, first request
vs steady p50) and ``jax`` (KERAS_BACKEND=jax with allowed batch sizes: new
compilations after warm-up, from the server's ``/metrics``).
"""

import argparse
import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

CLIENTS = (1, 8, 32)
WORKLOADS = ("cnn1d", "mlp")


def build_models(folder, workload, members):
    """Save a ``workload`` K-member ensemble and its first member as ``.keras`` files.

    The members are ``ensemblekit.bench.throughput``'s workloads (untrained: serving
    cost does not depend on the weights' values).
    """
    import ensemblekit as ek
    from ensemblekit.bench.throughput import build_member

    models = [build_member(workload, seed) for seed in range(members)]
    paths = {"ensemble": Path(folder) / f"{workload}_ensemble_k{members}.keras",
             "member": Path(folder) / f"{workload}_member.keras"}
    ek.ensemble(models, output_kind="logits").save(paths["ensemble"])
    models[0].save(paths["member"])
    return paths, tuple(models[0].inputs[0].shape[1:])


def start_server(model_path, max_batch, max_wait_ms, extra_args=(), env=None, port=0):
    """``ensemblekit serve`` in its own process group; returns (process, predict URL)."""
    process = _popen_server(model_path, max_batch, max_wait_ms, extra_args, env, port)
    ready, _, _ = select.select([process.stdout], [], [], 180)
    line = process.stdout.readline() if ready else ""
    if "POST " not in line:
        stop_server(process)
        raise RuntimeError(f"the server did not start: {line!r}")
    return process, line.split("POST ", 1)[1].split(" ", 1)[0]


def _popen_server(model_path, max_batch, max_wait_ms, extra_args=(), env=None, port=0):
    return subprocess.Popen(
        [sys.executable, "-m", "ensemblekit.cli", "serve", str(model_path), "--name", "m",
         "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
         *map(str, extra_args)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def stop_server(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def _client(host, port, path, bodies, latencies):
    """One keep-alive HTTP/1.1 connection sending ``bodies`` one after another."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for body in bodies:
            request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
            start = time.perf_counter()
            writer.write(request.encode() + body)
            await writer.drain()
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            length = next(int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:"))
            reply = await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if " 200 " not in head[0]:
                raise RuntimeError(f"{head[0]}: {reply[:200]!r}")
    finally:
        writer.close()


async def load(url, n_clients, requests_per_client, input_shape, seed=0):
    """``n_clients`` concurrent clients each send ``requests_per_client`` one-row requests.

    Returns ``seconds``, ``requests_per_s`` and the ``latencies_ms`` array.

    The client is a minimal asyncio HTTP/1.1 loop rather than ``httpx.AsyncClient``:
    at 32 concurrent requests httpx's connection pool, not the server, was the
    bottleneck here (about 10x fewer requests/s than this client on the same server).
    """
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    rng = np.random.default_rng(seed)
    bodies = [[json.dumps({"instances": rng.normal(size=(1, *input_shape)).round(4).tolist()}).encode()
               for _ in range(requests_per_client)] for _ in range(n_clients)]
    warmup = [b[:2] for b in bodies]
    await asyncio.gather(*(_client(host, int(port), path, b, []) for b in warmup))
    latencies = []
    start = time.perf_counter()
    await asyncio.gather(*(_client(host, int(port), path, b, latencies) for b in bodies))
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "requests_per_s": len(latencies) / elapsed,
            "latencies_ms": np.array(latencies) * 1000}


def run(workloads=WORKLOADS, members=8, clients=CLIENTS, total_requests=640, max_batch=64,
        max_wait_ms=5.0, rounds=4):
    """Every (workload, model, batching, clients) configuration; returns the result dict.

    The batching-on and batching-off servers of one model run side by side and
    the load alternates between them in ``rounds`` rounds, so a change in the
    machine's background load hits both alike; requests/s is the median round.
    """
    from ensemblekit.bench.throughput import device_info

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for workload in workloads:
            paths, input_shape = build_models(folder, workload, members)
            for model_name, path in paths.items():
                labels = {"workload": workload, "model": model_name,
                          "members": members if model_name == "ensemble" else 1}
                rows += _run_pair(path, max_batch, max_wait_ms, clients, total_requests, rounds,
                                  input_shape, labels)
    info = device_info()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    info["note"] = (f"1-minute load average at the end of the run {load:.1f} on {os.cpu_count()} cores; "
                    "clients and server share the machine over loopback.")
    speedups = {w: speedup(rows, w, max(clients)) for w in workloads}
    return {"info": info, "max_batch": max_batch, "max_wait_ms": max_wait_ms, "rounds": rounds,
            "rows": rows, "clients": list(clients), "speedup_at_max_clients": speedups}


def _run_pair(path, max_batch, max_wait_ms, clients, total_requests, rounds, input_shape, labels):
    servers = {}
    try:
        for batching, batch in (("on", max_batch), ("off", 1)):
            # A queue longer than the most clients: this run compares batching, not load shedding
            # (the default 8 x max-batch would refuse requests of the one-call-per-request server).
            servers[batching] = start_server(path, batch, max_wait_ms, ["--max-enqueued", 4 * max(clients)])
        rows = []
        for n_clients in clients:
            per_client = max(total_requests // (n_clients * rounds), 5)
            measured = {"on": [], "off": []}
            for _ in range(rounds):
                for batching, (_, url) in servers.items():
                    measured[batching].append(asyncio.run(load(url, n_clients, per_client, input_shape)))
            for batching, results in measured.items():
                latencies = np.concatenate([r.pop("latencies_ms") for r in results])
                row = {**labels, "batching": batching, "clients": n_clients,
                       "requests": len(latencies), "seconds": sum(r["seconds"] for r in results),
                       "requests_per_s": float(np.median([r["requests_per_s"] for r in results])),
                       "p50_ms": float(np.percentile(latencies, 50)),
                       "p99_ms": float(np.percentile(latencies, 99))}
                rows.append(row)
                print(f"{labels['workload']:6s} {labels['model']:8s} batching {batching:3s} "
                      f"clients {n_clients:2d}: {row['requests_per_s']:7.1f} req/s, "
                      f"p50 {row['p50_ms']:6.1f} ms, p99 {row['p99_ms']:6.1f} ms", flush=True)
        return rows
    finally:
        for process, _ in servers.values():
            stop_server(process)


def speedup(rows, workload, n_clients, model="ensemble"):
    """Requests/s with micro-batching over one-call-per-request, for ``model`` at ``n_clients``."""
    rate = {r["batching"]: r["requests_per_s"] for r in rows
            if r["workload"] == workload and r["model"] == model and r["clients"] == n_clients}
    return rate["on"] / rate["off"]


# --- production scenarios: capacity, overload, faults, SIGTERM, cold start, JAX -------------------

SCENARIOS = ("throughput", "capacity", "overload", "faults", "sigterm", "coldstart", "jax")
CLIENT_TIMEOUT_S = 30.0
OVERLOAD_FACTOR = 4


def _run_client(coroutine):
    """Run a client coroutine on uvloop when installed: the client shares the CPUs with the server."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def _split_url(url):
    """``http://h:p/path`` -> ``(host, port, /path)``."""
    rest = url.split("//", 1)[1]
    hostport, path = rest.split("/", 1)
    host, port = hostport.rsplit(":", 1)
    return host, int(port), "/" + path


def _outcome(error):
    """How a request without an HTTP answer ended: ``lost`` (client timeout), ``refused`` or ``reset``."""
    if isinstance(error, TimeoutError):
        return "lost"
    return "refused" if isinstance(error, ConnectionRefusedError) else "reset"


async def _read_reply(reader, info=None):
    """``(status, body)`` of one HTTP/1.1 response.

    ``info`` (a dict) gets ``keep_alive`` and ``server_ms`` (the ``Server-Timing`` the server sent).
    """
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {h.split(":", 1)[0].lower(): h.split(":", 1)[1].strip() for h in head[1:] if ":" in h}
    if info is not None:
        info["keep_alive"] = headers.get("connection", "").lower() != "close"
        timing = headers.get("server-timing", "")
        info["server_ms"] = float(timing.split("dur=", 1)[1]) if "dur=" in timing else None
    return int(head[0].split(" ", 2)[1]), await reader.readexactly(int(headers.get("content-length", 0)))


class _KeepAlivePool:
    """Keep-alive connections for an open-loop client: an arrival takes an idle one or opens one.

    The number of connections follows the server's answer time, as with
    independent clients, but without a TCP handshake per request (which, on a
    2-core machine, would load the kernel and the server more than the requests
    do); at ``max_connections`` busy ones an arrival is counted ``not_sent``
    (the client, not the server, could not offer it).
    """

    def __init__(self, url, max_connections=256):
        self.host, self.port, self.path = _split_url(url)
        self.idle = []
        self.opened = 0
        self.max_connections = max_connections
        self.busy = 0

    async def request(self, body, timeout=CLIENT_TIMEOUT_S):
        """``(status or outcome, seconds, server ms or None)``; ``not_sent`` when every connection is busy."""
        if not self.idle and self.busy >= self.max_connections:
            return "not_sent", 0.0, None
        self.busy += 1
        try:
            return await self._request(body, timeout)
        finally:
            self.busy -= 1

    async def _request(self, body, timeout):
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        started = time.perf_counter()
        connection = self.idle.pop() if self.idle else None
        info = {}
        try:
            if connection is None:
                connection = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout)
                self.opened += 1
            connection[1].write(head + body)
            status, _ = await asyncio.wait_for(_read_reply(connection[0], info), timeout)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
            if connection is not None:
                connection[1].close()
            return _outcome(error), time.perf_counter() - started, None
        if info["keep_alive"]:
            self.idle.append(connection)
        else:
            connection[1].close()
        return status, time.perf_counter() - started, info["server_ms"]

    def close(self):
        for _, writer in self.idle:
            writer.close()


async def http_request(url, body=b"", method="POST", timeout=CLIENT_TIMEOUT_S, slow_chunks=0,
                       chunk_pause_s=0.0, cut_after=None):
    """One request on its own connection: ``(status or outcome, reply bytes, seconds)``.

    ``slow_chunks``: send the body in that many pieces, ``chunk_pause_s`` apart.
    ``cut_after``: send only that many body bytes, then close (a client that goes away).
    """
    host, port, path = _split_url(url)
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    started = time.perf_counter()

    async def exchange():
        reader, writer = await asyncio.open_connection(host, port)
        try:
            if cut_after is not None:
                writer.write(head + body[:cut_after])
                await writer.drain()
                return "cut", b""
            if slow_chunks:
                writer.write(head)
                step = -(-len(body) // slow_chunks)
                for start in range(0, len(body), step):
                    await asyncio.sleep(chunk_pause_s)
                    writer.write(body[start:start + step])
                    await writer.drain()
            else:
                writer.write(head + body)  # no drain: a server may answer before reading it all
            return await _read_reply(reader)
        finally:
            writer.close()

    try:
        status, reply = await asyncio.wait_for(exchange(), timeout)
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
        return _outcome(error), b"", time.perf_counter() - started
    return status, reply, time.perf_counter() - started


def _percentile(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _bodies(rng, input_shape, n, rows=1):
    return [json.dumps({"instances": rng.normal(size=(rows, *input_shape)).round(4).tolist()}).encode()
            for _ in range(n)]


async def _closed_loop(url, clients, per_client, bodies):
    """``clients`` keep-alive clients sending back to back: ``([(status, s, server ms)], seconds)``."""
    async def client(connection, count, results):
        for index in range(count):
            results.append(await connection.request(bodies[index % len(bodies)]))

    connections = [_KeepAlivePool(url, max_connections=1) for _ in range(clients)]
    await asyncio.gather(*(client(c, 2, []) for c in connections))  # connect and warm up
    results, started = [], time.perf_counter()
    await asyncio.gather(*(client(c, per_client, results) for c in connections))
    elapsed = time.perf_counter() - started
    for connection in connections:
        connection.close()
    return results, elapsed


def run_capacity(url, input_shape, quick, clients=16):
    """Closed loop: ``clients`` keep-alive clients, back to back; requests/s and p99 (client and server)."""
    per_client = 20 if quick else 60
    bodies = _bodies(np.random.default_rng(1), input_shape, 64)
    results, elapsed = _run_client(_closed_loop(url, clients, per_client, bodies))
    latencies = [t * 1000 for status, t, _ in results if status == 200]
    server = [ms for status, _, ms in results if status == 200 and ms is not None]
    return {"clients": clients, "requests": len(results), "ok": len(latencies),
            "requests_per_s": len(latencies) / elapsed, "p50_ms": _percentile(latencies, 50),
            "p99_ms": _percentile(latencies, 99), "p99_server_ms": _percentile(server, 99)}


async def _open_loop(url, rate, seconds, bodies):
    """Poisson arrivals at ``rate``/s for ``seconds``: ``([(status, seconds)], sending seconds, connections)``."""
    rng = np.random.default_rng(7)
    pool = _KeepAlivePool(url)
    tasks, started = [], time.perf_counter()
    next_at = 0.0
    while next_at < seconds:
        delay = started + next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(pool.request(bodies[len(tasks) % len(bodies)])))
        next_at += rng.exponential(1 / rate)
    sent_seconds = time.perf_counter() - started
    results = await asyncio.gather(*tasks)
    pool.close()
    return results, sent_seconds, pool.opened


def run_overload(url, input_shape, capacity, quick):
    """Open-loop arrivals at 4x capacity: every request answered, p99 of the 200s bounded."""
    seconds = 10 if quick else 20
    rate = OVERLOAD_FACTOR * capacity["requests_per_s"]
    bodies = _bodies(np.random.default_rng(3), input_shape, 256)
    results, sent_seconds, connections = _run_client(_open_loop(url, rate, seconds, bodies))
    counts = {}
    for status, _, _ in results:
        counts[str(status)] = counts.get(str(status), 0) + 1
    ok = [t * 1000 for status, t, _ in results if status == 200]
    ok_server = [ms for status, _, ms in results if status == 200 and ms is not None]
    after = _run_client(http_request(url, bodies[0]))
    p99 = _percentile(ok, 99)
    not_sent = counts.pop("not_sent", 0)
    return {"seconds": seconds, "target_rate": rate, "offered_rate": (len(results) - not_sent) / sent_seconds,
            "requests": len(results) - not_sent, "connections": connections, "status_counts": counts,
            "not_sent_client_busy": not_sent,
            "answered": sum(v for k, v in counts.items() if k.isdigit()),
            "lost_or_reset": sum(v for k, v in counts.items() if not k.isdigit()),
            "p50_ok_ms": _percentile(ok, 50), "p99_ok_ms": p99,
            "p99_ok_server_ms": _percentile(ok_server, 99),
            "p99_server_ratio_vs_capacity": _percentile(ok_server, 99) / capacity["p99_server_ms"],
            "p99_ratio_vs_capacity": p99 / capacity["p99_ms"], "goal_p99_ratio": 3.0,
            "request_after_status": after[0]}


async def _good_client(url, rng, input_shape, n_requests, checks):
    """Requests of 1-3 rows whose answers are compared with the local ``model.predict``."""
    for _ in range(n_requests):
        rows = rng.normal(size=(int(rng.integers(1, 4)), *input_shape)).round(4).astype("float32")
        status, reply, _ = await http_request(url, json.dumps({"instances": rows.tolist()}).encode())
        checks.append((rows, status, json.loads(reply)["predictions"] if status == 200 else None))


async def _faults(url, input_shape, quick):
    good = np.random.default_rng(5).normal(size=(2, *input_shape)).round(4)
    body = json.dumps({"instances": good.tolist()}).encode()
    rounds = 3 if quick else 8
    faults = {
        "disconnect_mid_body": [http_request(url, body, cut_after=len(body) // 2) for _ in range(rounds)],
        "slow_body": [http_request(url, body, slow_chunks=10, chunk_pause_s=0.1) for _ in range(rounds)],
        "body_10mb": [http_request(url, b"[" + b"0," * (5 * 1024 * 1024 - 1) + b"0]") for _ in range(2)],
        "malformed_json": [http_request(url, b'{"instances": [[1, 2') for _ in range(rounds)],
    }
    checks = []
    good_clients = [_good_client(url, np.random.default_rng(100 + i), input_shape, 10 if quick else 30, checks)
                    for i in range(8)]
    grouped = await asyncio.gather(*(asyncio.gather(*calls) for calls in faults.values()),
                                   asyncio.gather(*good_clients))
    outcomes = {}
    for name, results in zip(faults, grouped):
        counted = {}
        for status, _, _ in results:
            counted[str(status)] = counted.get(str(status), 0) + 1
        outcomes[name] = counted
    return outcomes, checks


def run_faults(url, model_path, input_shape, quick):
    """Misbehaving clients among good ones; every good answer checked against ``model.predict``."""
    import keras

    import ensemblekit  # noqa: F401 - registers the layers the model file uses

    outcomes, checks = _run_client(_faults(url, input_shape, quick))
    model = keras.saving.load_model(model_path)
    wrong, max_error = 0, 0.0
    for rows, status, predictions in checks:
        if status != 200:
            wrong += 1
            continue
        error = float(np.max(np.abs(np.asarray(predictions) - model.predict(rows, verbose=0))))
        max_error = max(max_error, error)
        wrong += error > 1e-4
    health = _run_client(http_request(url.rsplit("/v1/", 1)[0] + "/healthz", method="GET"))
    return {"faults": outcomes, "good_requests": len(checks), "good_wrong_or_failed": wrong,
            "good_max_abs_error": max_error, "healthz_after": health[0]}


async def _until_refused(url, bodies, stop_at, sent):
    """Back-to-back requests on one keep-alive connection (a new one when it closes) until refused.

    Appends ``(send time, status or outcome)`` per request to ``sent``.
    """
    connection = _KeepAlivePool(url, max_connections=1)
    index = 0
    while time.perf_counter() < stop_at:
        sent_at = time.perf_counter()
        status, _, _ = await connection.request(bodies[index % len(bodies)])
        sent.append((sent_at, status))
        index += 1
        if status == "refused":
            return


def _count(statuses):
    counts = {}
    for status in statuses:
        counts[str(status)] = counts.get(str(status), 0) + 1
    return counts


def run_sigterm(process, url, input_shape, clients=16, load_s=1.0):
    """SIGTERM after ``load_s`` of load: every request sent before it answered 200, exit code 0.

    Each client keeps one connection the server has accepted (its first request
    was answered), so a request sent before the signal was accepted; one sent
    after it may find its connection closed by the draining server (``reset``)
    and then the listener closed (``refused``): those are reported apart.
    """
    bodies = _bodies(np.random.default_rng(9), input_shape, 64)
    sent = []

    async def scenario():
        stop_at = time.perf_counter() + 60
        tasks = [asyncio.create_task(_until_refused(url, bodies, stop_at, sent)) for _ in range(clients)]
        await asyncio.sleep(load_s)
        signalled = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.get_running_loop().run_in_executor(None, process.wait, 60)
        await asyncio.gather(*tasks)
        return signalled, exit_code, time.perf_counter() - signalled

    signalled, exit_code, stop_seconds = _run_client(scenario())
    before = _count(status for at, status in sent if at < signalled)
    after = _count(status for at, status in sent if at >= signalled)
    return {"clients": clients, "sent_before_signal": before, "sent_after_signal": after,
            "before_signal_not_200": sum(v for k, v in before.items() if k != "200"),
            "exit_code": exit_code, "seconds_to_exit": stop_seconds}


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_coldstart(model_path, input_shape, max_batch, max_wait_ms, steady_requests=50):
    """Process start -> listening -> AVAILABLE; first request latency vs steady p50 (new connections)."""
    port = _free_port()
    started = time.perf_counter()
    process = _popen_server(model_path, max_batch, max_wait_ms, port=port)
    status_url = f"http://127.0.0.1:{port}/v1/models/m"
    listening = None
    try:
        while time.perf_counter() - started < 300:
            status, reply, _ = _run_client(http_request(status_url, method="GET", timeout=5))
            if status == 200 and listening is None:
                listening = time.perf_counter() - started
            if status == 200 and json.loads(reply)["model_version_status"][0]["state"] == "AVAILABLE":
                break
            time.sleep(0.02)
        available = time.perf_counter() - started
        bodies = _bodies(np.random.default_rng(11), input_shape, steady_requests + 1)
        first = _run_client(http_request(status_url + ":predict", bodies[0]))
        steady = [_run_client(http_request(status_url + ":predict", b))[2] * 1000 for b in bodies[1:]]
    finally:
        stop_server(process)
    p50 = _percentile(steady, 50)
    return {"seconds_to_listening": listening, "seconds_to_available": available,
            "first_request_status": first[0], "first_request_ms": first[2] * 1000,
            "steady_p50_ms": p50, "first_over_p50": first[2] * 1000 / p50, "goal_ratio": 2.0}


def _metric_value(text, name):
    """Sum of the samples of ``name`` (any labels) in a Prometheus text exposition."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def _varied_sizes(url, input_shape, quick):
    rng = np.random.default_rng(13)
    sizes = [1, 2, 3, 5, 7, 9, 15, 17, 31, 33, 63, 64, 65, 100]
    statuses = [(await http_request(url, _bodies(rng, input_shape, 1, rows=n)[0]))[0] for n in sizes]

    async def client():
        for _ in range(5 if quick else 20):
            n = int(rng.integers(1, 40))
            statuses.append((await http_request(url, _bodies(rng, input_shape, 1, rows=n)[0]))[0])

    await asyncio.gather(*(client() for _ in range(16)))
    return statuses


def run_jax(model_path, input_shape, quick, allowed=(1, 4, 16, 64)):
    """KERAS_BACKEND=jax with allowed batch sizes: compilations after warm-up (goal 0)."""
    process, url = start_server(model_path, allowed[-1], 5.0,
                                ["--allowed-batch-sizes", ",".join(map(str, allowed))],
                                env={"KERAS_BACKEND": "jax"})
    metrics_url = url.split("/v1/", 1)[0] + "/metrics"
    try:
        before = _run_client(http_request(metrics_url, method="GET"))[1].decode()
        statuses = _run_client(_varied_sizes(url, input_shape, quick))
        after = _run_client(http_request(metrics_url, method="GET"))[1].decode()
    finally:
        stop_server(process)
    counts = {}
    for status in statuses:
        counts[str(status)] = counts.get(str(status), 0) + 1
    names = {"signatures": "ensemblekit_compilations_total", "xla": "ensemblekit_jax_backend_compiles"}
    return {"allowed_batch_sizes": list(allowed), "requests": len(statuses), "status_counts": counts,
            "after_warm_up": {k: _metric_value(before, n) for k, n in names.items()},
            "new_after_warm_up": {k: _metric_value(after, n) - _metric_value(before, n) for k, n in names.items()},
            "mechanism": "ensemblekit_compilations_total counts new input shape signatures reaching the "
                         "model's predict function (one trace+compile each); ensemblekit_jax_backend_compiles "
                         "counts jax.monitoring '/jax/core/compile/backend_compile_duration' events "
                         "(every XLA compilation in the server process)", "goal_new": 0}


def run_production(scenarios, members, quick, workload="cnn2d", max_batch=64, max_wait_ms=5.0,
                   max_enqueued=32, timeout_ms=5000):
    """The production scenarios on the K-member ``workload`` ensemble; returns ``{scenario: result}``.

    ``cnn2d`` by default: its model calls, not HTTP handling, bound the capacity
    (the cnn1d and mlp ensembles answer as fast as the HTTP layer does on 2 cores),
    which is the case overload protection is for. ``max_enqueued`` is twice the
    16 clients of the capacity run.
    """
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        paths, input_shape = build_models(folder, workload, members)
        model_path = paths["ensemble"]
        server_runs = [s for s in ("capacity", "overload", "faults", "sigterm") if s in scenarios]
        if server_runs:
            process, url = start_server(model_path, max_batch, max_wait_ms,
                                        ["--max-enqueued", max_enqueued, "--timeout-ms", timeout_ms])
            try:
                results.update(_server_runs(server_runs, process, url, model_path, input_shape, quick))
                for name in server_runs:
                    results[name]["server_flags"] = (f"--max-batch {max_batch} --max-wait-ms {max_wait_ms} "
                                                     f"--max-enqueued {max_enqueued} --timeout-ms {timeout_ms}")
            finally:
                if process.poll() is None:
                    stop_server(process)
        if "coldstart" in scenarios:
            results["coldstart"] = run_coldstart(model_path, input_shape, max_batch, max_wait_ms)
            print(f"coldstart: {results['coldstart']}", flush=True)
        if "jax" in scenarios:
            results["jax"] = run_jax(model_path, input_shape, quick)
            print(f"jax: {results['jax']}", flush=True)
    for result in results.values():
        result.update(quick=quick, workload=workload, members=members)
    return results


def _server_runs(server_runs, process, url, model_path, input_shape, quick):
    results = {}
    capacity = run_capacity(url, input_shape, quick)
    if "capacity" in server_runs:
        results["capacity"] = capacity
    print(f"capacity: {capacity}", flush=True)
    if "overload" in server_runs:
        results["overload"] = run_overload(url, input_shape, capacity, quick)
        print(f"overload: {results['overload']}", flush=True)
    if "faults" in server_runs:
        results["faults"] = run_faults(url, model_path, input_shape, quick)
        print(f"faults: {results['faults']}", flush=True)
    if "sigterm" in server_runs:
        results["sigterm"] = run_sigterm(process, url, input_shape)
        print(f"sigterm: {results['sigterm']}", flush=True)
    return results


def to_markdown(result):
    info = result.get("scenarios_info", result.get("info", {}))
    lines = _throughput_markdown(result) if "rows" in result else [
        f"# HTTP serving ({info.get('device')}, {info.get('cpu_count')} cores, {info.get('backend')})", ""]
    lines += _scenarios_markdown(result.get("scenarios", {}), info)
    return "\n".join(lines) + "\n"


def _fmt(value, digits=1):
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _scenarios_markdown(scenarios, info):
    if not scenarios:
        return []
    first = next(iter(scenarios.values()))
    lines = ["", f"## Production scenarios (K={first.get('members', 8)} {first.get('workload', 'cnn1d')} "
                 "ensemble, clients and server on one machine over loopback)", "",
             f"{info.get('device')}, {info.get('cpu_count')} cores, 1-minute load average "
             f"{info.get('load_average_at_start', float('nan')):.1f} when the runs started (other jobs "
             "share the machine). Latencies are measured at the client, so they include the client's "
             "own waiting for CPU.", ""]
    if "capacity" in scenarios:
        c = scenarios["capacity"]
        lines.append(f"- **capacity** (closed loop, {c['clients']} clients, {c['requests']} requests): "
                     f"{c['requests_per_s']:.1f} req/s, p50 {c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms "
                     f"(server-side p99 {c['p99_server_ms']:.1f} ms) "
                     f"(server {c.get('server_flags', '')}).")
    if "overload" in scenarios:
        o = scenarios["overload"]
        lines.append(f"- **overload** ({o['seconds']} s of open-loop Poisson arrivals, target "
                     f"{o['target_rate']:.0f} req/s = {OVERLOAD_FACTOR}x capacity, offered "
                     f"{o['offered_rate']:.0f} req/s, {o['requests']} requests sent, {o['not_sent_client_busy']} not sent "
                     f"with all {256} client connections busy): status counts "
                     f"{o['status_counts']}; answered {o['answered']}, lost or reset {o['lost_or_reset']}; "
                     f"p99 of the 200s {o['p99_ok_ms']:.1f} ms = {o['p99_ratio_vs_capacity']:.2f}x the p99 at "
                     f"capacity (goal <= {o['goal_p99_ratio']:g}x); server-side (Server-Timing: routing to answer) "
                     f"p99 of the 200s {o['p99_ok_server_ms']:.1f} ms = {o['p99_server_ratio_vs_capacity']:.2f}x "
                     f"the server-side p99 at capacity; a request right after: "
                     f"{o['request_after_status']}.")
    if "faults" in scenarios:
        f = scenarios["faults"]
        lines.append(f"- **faults** (outcome counts per kind: {f['faults']}); good clients: "
                     f"{f['good_requests']} requests, {f['good_wrong_or_failed']} wrong or failed, max abs "
                     f"error vs local model.predict {f['good_max_abs_error']:.2g}; /healthz after: "
                     f"{f['healthz_after']}.")
    if "sigterm" in scenarios:
        t = scenarios["sigterm"]
        lines.append(f"- **SIGTERM under load** ({t['clients']} clients, one keep-alive connection each): "
                     f"requests sent before the signal {t['sent_before_signal']} "
                     f"({t['before_signal_not_200']} not answered 200, goal 0); sent after it "
                     f"{t['sent_after_signal']} (reset: connection closed by the draining server; refused: "
                     f"listener closed); exit code {t['exit_code']} after {t['seconds_to_exit']:.2f} s.")
    if "coldstart" in scenarios:
        c = scenarios["coldstart"]
        lines.append(f"- **cold start**: listening after {_fmt(c['seconds_to_listening'], 2)} s, AVAILABLE "
                     f"after {c['seconds_to_available']:.2f} s (process start, warm-up of every allowed "
                     f"batch size included); first request {c['first_request_ms']:.1f} ms vs steady p50 "
                     f"{c['steady_p50_ms']:.1f} ms = {c['first_over_p50']:.2f}x (goal <= {c['goal_ratio']:g}x).")
    if "jax" in scenarios:
        j = scenarios["jax"]
        lines.append(f"- **JAX backend**, allowed batch sizes {j['allowed_batch_sizes']}: {j['requests']} "
                     f"requests of 1-100 rows (status counts {j['status_counts']}); compilations at warm-up "
                     f"{j['after_warm_up']}, new after warm-up {j['new_after_warm_up']} (goal "
                     f"{j['goal_new']}). Counted by: {j['mechanism']}.")
    quick = sorted(name for name, r in scenarios.items() if r.get("quick"))
    if quick:
        lines.append(f"- Run with --quick: {', '.join(quick)}.")
    return lines


def _throughput_markdown(result):
    info = result["info"]
    lines = [
        f"# HTTP serving: micro-batching on vs off ({info['device']}, {info['cpu_count']} cores, "
        f"{info['backend']})",
        "",
        f"{info['note']} Batching on: --max-batch {result['max_batch']} --max-wait-ms "
        f"{result['max_wait_ms']}; off: --max-batch 1 (one model call per request). "
        "One instance per request, JSON over HTTP/1.1 keep-alive. The on and off servers ran "
        f"side by side with the load alternating in {result['rounds']} rounds; req/s is the "
        "median round, latencies pool all rounds.",
        "",
        "| workload | model | batching | clients | requests | req/s | p50 ms | p99 ms |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        name = f"ensemble K={r['members']}" if r["model"] == "ensemble" else "one member"
        lines.append(f"| {r['workload']} | {name} | {r['batching']} | {r['clients']} | {r['requests']} | "
                     f"{r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    lines.append("")
    for workload, ratio in result["speedup_at_max_clients"].items():
        lines.append(f"- {workload}: micro-batching gives the K-member ensemble **{ratio:.2f}x** the "
                     f"requests/s of one call per request at {max(result['clients'])} clients "
                     "(target >= 3x).")
    return lines


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(result["speedup_at_max_clients"])
    figure, axes = plt.subplots(len(workloads), 2, figsize=(10, 3.6 * len(workloads)), squeeze=False)
    for row_axes, workload in zip(axes, workloads, strict=True):
        for model in ("ensemble", "member"):
            for batching, style in (("on", "-o"), ("off", "--s")):
                rows = [r for r in result["rows"] if r["workload"] == workload
                        and r["model"] == model and r["batching"] == batching]
                label = f"{'K=8 ensemble' if model == 'ensemble' else 'one member'}, batching {batching}"
                clients = [r["clients"] for r in rows]
                row_axes[0].plot(clients, [r["requests_per_s"] for r in rows], style, label=label)
                row_axes[1].plot(clients, [r["p99_ms"] for r in rows], style, label=label)
        for axis, ylabel in zip(row_axes, ("requests/s", "p99 latency (ms)"), strict=True):
            axis.set_xscale("log", base=2)
            axis.set_xticks(result["clients"], [str(c) for c in result["clients"]])
            axis.set_xlabel("concurrent clients")
            axis.set_ylabel(ylabel)
            axis.set_title(workload, fontsize=9)
            axis.grid(alpha=0.3)
        row_axes[0].legend(fontsize=7)
    figure.suptitle(f"ensemblekit serve over loopback: {result['info']['device']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_reports(result, out_dir, stem="serving"):
    """Merge ``result`` into ``<stem>.json`` (its sections replace the old ones) and rewrite the .md/.png."""
    from ensemblekit.bench.throughput import write_json_and_markdown

    previous_path = Path(out_dir) / f"{stem}.json"
    merged = json.loads(previous_path.read_text()) if previous_path.is_file() else {}
    scenarios = {**merged.get("scenarios", {}), **result.pop("scenarios", {})}
    merged.update(result)
    if scenarios:
        merged["scenarios"] = scenarios
    write_json_and_markdown(merged, to_markdown(merged), out_dir, stem)
    if "rows" in result:
        plot(merged, Path(out_dir) / f"{stem}.png")
    return merged


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="cnn1d only, 160 requests per throughput run; 10 s overload, fewer faults")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS),
                        help="which runs (default: all)")
    parser.add_argument("--production-workload", default="cnn2d",
                        help="member workload of the capacity/overload/faults/sigterm/coldstart/jax runs")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--requests", type=int, default=640, help="requests per configuration")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    from ensemblekit.bench.throughput import device_info

    info = device_info()
    result = {}
    if "throughput" in args.scenarios:
        result = run(workloads=["cnn1d"] if args.quick else args.workloads, members=args.members,
                     total_requests=160 if args.quick else args.requests)
    # the load when the production runs start (after the throughput run, when there is one)
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    production = [s for s in args.scenarios if s != "throughput"]
    result["scenarios_info"] = {**info, "load_average_at_start": load_average}
    if production:
        result["scenarios"] = run_production(production, args.members, args.quick,
                                             workload=args.production_workload)
    stem = "serving_quick" if args.quick and "throughput" in args.scenarios else "serving"
    print(to_markdown(write_reports(result, args.out, stem=stem)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
