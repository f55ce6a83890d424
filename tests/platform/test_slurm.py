"""examples/slurm/finetune.sbatch for real: a one-node Slurm cluster (munged, slurmctld, slurmd
from Debian's slurm-wlm and munge, installed by .ci/run) started here, the tiny fine-tune
submitted with `sbatch --wait`, its output model checked, the daemons stopped by pid."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = REPO / "examples" / "slurm" / "finetune.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def missing_tools() -> list[str]:
    return [tool for tool in DAEMONS if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]


pytestmark = [
    pytest.mark.skipif(bool(missing_tools()), reason=f"Slurm/munge not installed ({', '.join(missing_tools())} missing): .ci/run installs slurm-wlm and munge"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a one-node Slurm cluster runs its daemons as root (SlurmUser=root) and munged as the munge user"),
]


def tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def slurm_conf(root: Path, host: str, munge_socket: Path) -> str:
    return "\n".join([
        "ClusterName=kubetuneci",
        f"SlurmctldHost={host}",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "ReturnToService=2",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN",
        f"PartitionName=ci Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """A private munged (own key and socket) and slurmctld + slurmd on free ports; the env that
    points sbatch at them. Everything under one temporary folder (not pytest's: that one is
    private to root, and munged runs as the munge user); daemons stopped by pid."""
    root = Path(tempfile.mkdtemp(prefix="kubetune-slurm-"))
    root.chmod(0o755)
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o755)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    shutil.chown(munge_dir, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    munge_socket = munge_dir / "munge.socket"
    started: list[subprocess.Popen] = []
    munged_pid = None
    try:
        munged = subprocess.run(
            ["runuser", "-u", "munge", "--", tool("munged"), f"--socket={munge_socket}", f"--key-file={key}",
             f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
             f"--seed-file={munge_dir / 'munged.seed'}"],
            capture_output=True, text=True,
        )
        assert munged.returncode == 0, f"munged did not start: {munged.stderr}"
        munged_pid = int((munge_dir / "munged.pid").read_text())
        conf = root / "slurm.conf"
        conf.write_text(slurm_conf(root, socket.gethostname(), munge_socket))
        env = {**os.environ, "SLURM_CONF": str(conf)}
        for daemon in ("slurmctld", "slurmd"):
            started.append(subprocess.Popen(
                [tool(daemon), "-D", "-f", str(conf)], env=env,
                stdout=open(root / f"{daemon}.out", "w"), stderr=subprocess.STDOUT,
            ))
            time.sleep(1)

        def node_idle() -> bool:
            out = subprocess.run([tool("sinfo"), "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            return out.stdout.strip() == "idle"

        try:
            wait_for(node_idle, 60, "the Slurm node to be idle")
        except AssertionError:
            logs = "".join((root / f"{d}.out").read_text() for d in ("slurmctld", "slurmd"))
            raise AssertionError(f"the one-node Slurm cluster did not come up:\n{logs}") from None
        yield env
    finally:
        for proc in reversed(started):
            stop(proc)
        if munged_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(munged_pid, signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("nproc", [1, 2], ids=["one-process", "torchrun-2-processes"])
def test_sbatch_runs_the_tiny_fine_tune_and_writes_the_model(slurm, tmp_path, nproc):
    """One process runs `kubetune run` directly; two run it under torchrun (FSDP2 over gloo)."""
    out = tmp_path / "out"
    venv_bin = str(Path(sys.executable).parent)  # `kubetune` and `torchrun` of this environment
    env = {**slurm, "PATH": f"{venv_bin}:{slurm['PATH']}", "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log"),
           "KUBETUNE_NPROC_PER_NODE": str(nproc), "KUBETUNE_RDZV_PORT": str(free_port())}
    log = tmp_path / "job.out"
    done = subprocess.run(
        [tool("sbatch"), "--wait", f"--chdir={tmp_path}", f"--output={log}", "--time=10", f"--cpus-per-task={nproc}",
         str(SBATCH_SCRIPT), "full_finetune", "tiny_full",
         f"output_dir={out}", "max_steps=4", "batch_size=4", "eval_every_steps=2", "eval_max_batches=1",
         "save_every_steps=4", "log_every_steps=1", "progress_bar=false", "resume=never"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    job_log = log.read_text() if log.exists() else "(no job log)"
    assert done.returncode == 0, f"sbatch: {done.stdout}{done.stderr}\njob log:\n{job_log}"
    assert f"kubetune: full_finetune --config tiny_full on 1 node(s) x {nproc} process(es)" in job_log
    if nproc > 1:
        assert "kubetune: launching 2 processes" in job_log
    model = out / "model"
    assert (model / "config.json").is_file(), job_log
    assert list(model.glob("*.safetensors")), job_log
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["steps"] == 4 and summary["checkpoint"] == str(model)


def test_sbatch_script_refuses_missing_arguments(slurm, tmp_path):
    log = tmp_path / "job.out"
    done = subprocess.run(
        [tool("sbatch"), "--wait", f"--chdir={tmp_path}", f"--output={log}", str(SBATCH_SCRIPT), "full_finetune"],
        env=slurm, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "usage: sbatch" in log.read_text()
