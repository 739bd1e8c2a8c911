from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis_support import RedisServer


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = await RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        await server.stop()
