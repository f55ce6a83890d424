"""Fixtures of the reliability suite (issue #25). The operator's faults reuse the operator tests'
emulator and helpers (tests/operator: kube_emulator.py, ophelpers.py), importable from here."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from kube_emulator import Emulator  # noqa: E402
from ophelpers import Api, running_operator, serving_emulator  # noqa: E402


@pytest_asyncio.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with serving_emulator() as emu:
        yield emu


@pytest.fixture
def operator(emulator):
    return lambda webhook=None, namespaces=(), **config: running_operator(emulator, webhook=webhook, namespaces=namespaces, **config)


@pytest.fixture
def api(emulator) -> Api:
    return Api(emulator)
