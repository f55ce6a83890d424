"""Fixtures of the reliability suite (issue #25). The operator's faults reuse the operator tests'
emulator, helpers and fixtures (tests/operator: kube_emulator.py, ophelpers.py, conftest.py)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from ophelpers import api, emulator, operator  # noqa: E402,F401  (fixtures, shared with tests/operator)
