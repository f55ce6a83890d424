"""Fixtures of the operator tests (helpers live in ophelpers.py: conftest modules are not importable)."""
from __future__ import annotations

from typing import AsyncIterator

import pytest
import pytest_asyncio

from kube_emulator import Emulator
from ophelpers import Api, running_operator, serving_emulator


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
