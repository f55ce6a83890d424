"""Fixtures of the operator tests: `emulator` (the kmock API server), `operator` (starts the
operator against it), `api` (a client for the test). They live in ophelpers.py so that the
reliability suite shares them (conftest modules are not importable)."""
from ophelpers import api, emulator, operator  # noqa: F401  (pytest finds fixtures by name)
