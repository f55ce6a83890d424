"""Operator scale benchmark: N FineTuneJobs created at once against the Kubernetes API emulator.

Three processes, as in a cluster: the emulator (kmock + the semantics in
tests/operator/kube_emulator.py), the operator started with the real CLI (`kubetune operator`,
logging in through a kubeconfig), and this driver, which creates the jobs over HTTP and polls
until every job has its children and a status.

Reports: time until all are reconciled, reconciles per second, the operator's peak RSS (VmHWM).
Targets (issue 9): 500 jobs in under 60 s on 2 cores, RSS under 150 MB.

    .venv/bin/python benchmarks/operator_scale.py --jobs 500
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[1]
NS = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_emulator(port: int) -> None:
    """The emulator process: serve until killed."""
    sys.path.insert(0, str(REPO / "tests" / "operator"))
    import kmock
    from kube_emulator import RESOURCES, Emulator

    async def main() -> None:
        async with Emulator(max_history=1) as emu, kmock.Server(emu, port=port):
            emu.declare(RESOURCES)
            print("ready", flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def manifest(index: int) -> dict:
    doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    doc["metadata"] = {"name": f"job-{index:04d}", "namespace": NS}
    return doc


async def drive(base: str, jobs: int, timeout: float) -> dict:
    async with aiohttp.ClientSession(base) as http:
        started = time.monotonic()
        limit = asyncio.Semaphore(64)

        async def create(i: int) -> None:
            async with limit:
                async with http.post(f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs", json=manifest(i)) as resp:
                    assert resp.status < 400, await resp.text()

        await asyncio.gather(*(create(i) for i in range(jobs)))
        created = time.monotonic() - started
        done = 0
        while time.monotonic() - started < timeout:
            # Poll the custom resources only, once a second: listing 500 Jobs (~1 MB) four
            # times a second loaded the emulator more than the operator did.
            async with http.get(f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs") as resp:
                items = (await resp.json())["items"]
            done = sum(1 for ftj in items if (ftj.get("status") or {}).get("phase") and (ftj.get("status") or {}).get("workload"))
            if os.environ.get("BENCH_VERBOSE"):
                print(f"{time.monotonic() - started:6.1f}s reconciled={done}", file=sys.stderr)
            if done >= jobs:
                break
            await asyncio.sleep(1.0)
        elapsed = time.monotonic() - started
        async with http.get(f"/apis/batch/v1/namespaces/{NS}/jobs") as resp:  # status says so; check the children exist
            workloads = {j["metadata"]["name"] for j in (await resp.json())["items"]}
        done = sum(1 for ftj in items if (ftj.get("status") or {}).get("workload", {}).get("name") in workloads)
        elapsed = time.monotonic() - started
        return {"created_s": created, "all_reconciled_s": elapsed, "reconciled": done, "jobs_in_api": len(workloads)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--serve-emulator", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_emulator:
        serve_emulator(args.serve_emulator)
        return 0

    api_port = free_port()
    emulator = subprocess.Popen([sys.executable, __file__, "--serve-emulator", str(api_port)], stdout=subprocess.PIPE, text=True)
    assert emulator.stdout.readline().strip() == "ready"
    base = f"http://127.0.0.1:{api_port}"
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": base}}],
            "users": [{"name": "emu", "user": {}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
        }))
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        log = open(Path(tmp) / "operator.log", "w")
        operator = subprocess.Popen(
            [sys.executable, *(["-m", "cProfile", "-o", os.environ["PROFILE_OPERATOR"]] if os.environ.get("PROFILE_OPERATOR") else []),
             "-m", "kubetune.cli", "operator", "--metrics-port", str(free_port()),
             "--liveness", f"http://127.0.0.1:{free_port()}/healthz"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            time.sleep(3)  # login, discovery, watches
            idle_rss = peak_rss_mb(operator.pid)
            idle_cpu, emulator_idle_cpu = cpu_seconds(operator.pid), cpu_seconds(emulator.pid)
            result = asyncio.run(drive(base, args.jobs, args.timeout))
            result["operator_peak_rss_mb"] = peak_rss_mb(operator.pid)
            result["operator_idle_rss_mb"] = idle_rss
            result["operator_cpu_s"] = cpu_seconds(operator.pid) - idle_cpu
            result["emulator_cpu_s"] = cpu_seconds(emulator.pid) - emulator_idle_cpu
            result["load_average_1m"] = os.getloadavg()[0]
        finally:
            operator.send_signal(signal.SIGTERM)
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                operator.kill()
            emulator.kill()
            log.close()
            if os.environ.get("KEEP_OPERATOR_LOG"):
                Path(os.environ["KEEP_OPERATOR_LOG"]).write_text((Path(tmp) / "operator.log").read_text())
            if operator.returncode not in (0, -signal.SIGTERM):
                print((Path(tmp) / "operator.log").read_text()[-3000:], file=sys.stderr)
    result["jobs"] = args.jobs
    result["reconciles_per_s"] = round(result["reconciled"] / result["all_reconciled_s"], 1)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}, indent=2))
    return 0 if result["reconciled"] == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
