"""Fixtures for tests against a REAL vLLM (CPU build): one pod for the whole session.

`real_vllm` (session scope, tests marked `@pytest.mark.vllm`) starts one vLLM OpenAI server with the
tiny random-weight model recorded in tests/fixtures/vllm/model (so token ids match the recorded
fixtures on any machine), prefix caching on, block size 32, a 16 MiB KV cache (256 blocks), and KV
events: the PUB socket binds an OS-chosen port (connect a SUB to `kv_events`), the replay ROUTER binds
another (`kv_events_replay`), topic `kv-events`. `POST /reset_prefix_cache` is enabled. It yields a
`RealVllm` (scripts/capture_vllm_pod.py): url, model, model_dir, kv_events, kv_events_replay, topic,
block_size, max_model_len, kv_cache_bytes, log_path, pid. The pod is shared by every test of the
session: do not rely on blocks cached by another test, and send prompts of your own. A test may reset
the prefix cache (`POST /reset_prefix_cache`); vLLM then publishes AllBlocksCleared with the next
engine step's batch, not at once.

Without vLLM (no $KVGATE_VLLM_VENV or /opt/vllm-venv; `scripts/install-vllm.sh` installs it) the tests
are skipped, unless $CI is set: in CI a missing vLLM is an error. $KVGATE_VLLM_CORE pins the engine to
one core. Tests marked `vllm` get a timeout of VLLM_TEST_TIMEOUT_S instead of pyproject's global one:
the first of them also waits for the pod to start.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.real_vllm import load_pod_module

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "vllm"
KV_CACHE_BYTES = 16 << 20  # 256 blocks of 32 tokens: room for the tests, small enough to evict on purpose
POD_START_TIMEOUT_S = 240.0
VLLM_TEST_TIMEOUT_S = POD_START_TIMEOUT_S + 300  # pod start plus the slowest test, with room for a busy CPU


pod_module = load_pod_module()
RealVllm = pod_module.RealVllm


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every `vllm`-marked test without its own timeout mark the longer real-vLLM timeout."""
    for item in items:
        if item.get_closest_marker("vllm") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(VLLM_TEST_TIMEOUT_S))


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def vllm_fixtures() -> Path:
    """The folder of recordings made from a real vLLM by scripts/capture_vllm.py."""
    return FIXTURES


@pytest.fixture(scope="session")
def real_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealVllm]:
    """One running real vLLM pod with KV events (see the module docstring); stopped at session end."""
    venv = pod_module.vllm_venv()
    if not pod_module.vllm_available(venv):
        reason = f"real vLLM not installed at {venv} (run scripts/install-vllm.sh or set KVGATE_VLLM_VENV)"
        if _in_ci():
            pytest.fail(reason + "; CI requires it", pytrace=False)
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("real-vllm")
    model_dir = work / "tiny"
    if (FIXTURES / "model" / "config.json").exists():
        shutil.copytree(FIXTURES / "model", model_dir)
    else:
        pod_module.build_tiny_model(model_dir, venv)
    core = os.environ.get("KVGATE_VLLM_CORE")
    proc = pod_module.VllmProcess(
        model_dir,
        log_path=work / "vllm.log",
        kv_cache_bytes=KV_CACHE_BYTES,
        core=int(core) if core else None,
        extra_args=["--enforce-eager"],  # no graph compilation: a faster, cache-independent start
        venv=venv,
    )
    try:
        pod = proc.start(timeout=POD_START_TIMEOUT_S)
    except (RuntimeError, TimeoutError) as exc:
        pytest.fail(f"real vLLM did not start: {exc}", pytrace=False)
    try:
        yield pod
    finally:
        proc.stop()
