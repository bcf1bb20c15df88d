"""HTTP serving throughput, micro-batching on vs off: ``python -m benchmarks.serving [--quick]``.

Starts ``ensemblekit serve`` on 127.0.0.1 (a fresh process per configuration),
then runs N concurrent clients x M requests of one instance each over loopback
and reports requests/s and p50/p99 latency for: the K=8 Conv1D ensemble and a
single member, micro-batching on (``--max-batch 64``) and off (``--max-batch 1``,
one model call per request), with 1, 8 and 32 concurrent clients, for the
``cnn1d`` and ``mlp`` members of ``ensemblekit.bench.throughput``. Every run is
bounded by its request count. Writes benchmarks/results/serving.{json,md,png}.
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


def start_server(model_path, max_batch, max_wait_ms):
    """``ensemblekit serve`` in its own process group; returns (process, predict URL)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ensemblekit.cli", "serve", str(model_path), "--name", "m",
         "--port", "0", "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    ready, _, _ = select.select([process.stdout], [], [], 180)
    line = process.stdout.readline() if ready else ""
    if "POST " not in line:
        stop_server(process)
        raise RuntimeError(f"the server did not start: {line!r}")
    return process, line.split("POST ", 1)[1].split(" ", 1)[0]


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
            servers[batching] = start_server(path, batch, max_wait_ms)
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


def to_markdown(result):
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
    return "\n".join(lines) + "\n"


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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(result, indent=1)), ("md", to_markdown(result))):
        tmp = out_dir / f".{stem}.{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / f"{stem}.{suffix}")
    plot(result, out_dir / f"{stem}.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="cnn1d only, 160 requests per run")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--requests", type=int, default=640, help="requests per configuration")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    result = run(workloads=["cnn1d"] if args.quick else args.workloads, members=args.members,
                 total_requests=160 if args.quick else args.requests)
    write_reports(result, args.out, stem="serving_quick" if args.quick else "serving")
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
