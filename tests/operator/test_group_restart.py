"""A failed node restarts the whole group (issue #26, behaviour 8), with the real torchrun.

Two torchrun agents on this machine stand in for two pods of the indexed Job, started with the
rendezvous flags the planner gives the pods (only the endpoint host is this machine instead of
pod 0's DNS name). The worker on the second node fails in its first attempt; with the planner's
elastic c10d rendezvous both agents restart their workers together, and both attempts finish.
(With the old static rendezvous a restarted node could not rejoin: its peers hung.) The test
process itself never imports torch: the agents are subprocesses."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.operator.api import parse_object
from kubetune.operator.planner import child_names, rendezvous_args
from ophelpers import manifest
from processes import kill_run

pytest.importorskip("torch")

WORKER = """
import os, pathlib, sys
import torch.distributed as dist
out = pathlib.Path(sys.argv[1])
node, attempt = os.environ["GROUP_RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
with open(out / f"node-{os.environ['KUBETUNE_TEST_NODE']}", "a") as runs:  # one line per worker start
    runs.write(f"{attempt}\\n")
if os.environ["KUBETUNE_TEST_NODE"] == "b" and attempt == "0":
    sys.exit(1)  # a real failure on one node, first attempt only
dist.init_process_group("gloo")
dist.barrier()
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two torchrun agents and a restart: about a minute on a busy 2-core box
@pytest.mark.timeout(240)
def test_a_failed_node_restarts_the_group_and_both_finish(tmp_path: Path):
    doc = manifest("llama3.1-8b-full-2node.yaml")  # 2 nodes, runPolicy.backoffLimit 1
    doc["metadata"]["uid"] = "uid-restart-test"
    job = parse_object(doc)
    args = rendezvous_args(job, child_names(job.metadata.name))
    port = free_port()
    args = [f"--rdzv-endpoint=127.0.0.1:{port}" if a.startswith("--rdzv-endpoint=") else a for a in args]
    args = [("--nproc-per-node=1" if a.startswith("--nproc-per-node=") else a) for a in args]  # one CPU process per node
    assert "--rdzv-backend=c10d" in args and "--max-restarts=1" in args and "--nnodes=2" in args
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    agents = []
    for node, is_host in (("a", "true"), ("b", "false")):
        # two agents on one machine: say which hosts the store (in a pod, pod 0's name decides)
        cmd = [sys.executable, "-m", "torch.distributed.run", *args, f"--rdzv-conf=is_host={is_host},join_timeout=180", "--monitor-interval=0.2",
               str(script), str(tmp_path)]
        agents.append(subprocess.Popen(cmd, env={**env, "KUBETUNE_TEST_NODE": node}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        outputs = [agent.communicate(timeout=200)[0].decode(errors="replace") for agent in agents]
    finally:  # a timeout must not leave the agents and their workers running (rendezvous waits 180 s more)
        for agent in agents:
            if agent.poll() is None:
                kill_run(agent)
    codes = [agent.returncode for agent in agents]
    assert codes == [0, 0], "\n---\n".join(o[-3000:] for o in outputs)
    starts = {node: (tmp_path / f"node-{node}").read_text().split() for node in ("a", "b")}
    # node b failed once and was restarted (its restart count went up); node a never failed, yet
    # its worker started a second time: the whole group restarted together, and both finished
    assert starts["b"] == ["0", "1"], starts
    assert len(starts["a"]) == 2, starts
