"""Start and stop one real vLLM (CPU build) pod with a tiny random-weight model and KV events.

Shared by `scripts/capture_vllm.py` (records fixtures) and `tests/vllm/conftest.py` (the `real_vllm`
fixture). Standard library only, synchronous: it runs before and after event loops, never inside one.

The pod serves a model directory written by `scripts/make_tiny_model.py` (or the recorded copy in
tests/fixtures/vllm/model) with dummy weights, float32, prefix caching and a block size that is a
multiple of 32 as CPU attention needs. Every port is picked by the OS, the KV-event publisher *binds*
(`tcp://*:PORT`, so subscribers connect to `tcp://127.0.0.1:PORT`), and `VLLM_SERVER_DEV_MODE=1` so
that `POST /reset_prefix_cache` exists.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = "/opt/vllm-venv"
MAKE_TINY_MODEL = ROOT / "scripts" / "make_tiny_model.py"


def vllm_venv() -> Path:
    """The vLLM venv: $KVGATE_VLLM_VENV, else /opt/vllm-venv (what scripts/install-vllm.sh installs)."""
    return Path(os.environ.get("KVGATE_VLLM_VENV") or DEFAULT_VENV)


def vllm_available(venv: Path | None = None) -> bool:
    """True when `venv` holds a Python with vLLM installed (checked by file presence: fast)."""
    venv = venv or vllm_venv()
    python = venv / "bin" / "python"
    if not python.exists():
        return False
    return any((venv / "lib").glob("python3*/site-packages/vllm/__init__.py"))


def free_port() -> int:
    """A TCP port the OS just handed out on 127.0.0.1 (closed again: the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_model(out_dir: Path, venv: Path | None = None) -> Path:
    """Write the tiny model directory (config + tokenizer, no weights) into `out_dir` with
    scripts/make_tiny_model.py, run by the vLLM venv's python (it has `tokenizers`); ~2 s."""
    venv = venv or vllm_venv()
    subprocess.run(
        [str(venv / "bin" / "python"), str(MAKE_TINY_MODEL), str(out_dir)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=120,
    )
    return out_dir


@dataclass(frozen=True, slots=True)
class RealVllm:
    """A running real vLLM pod: where to reach it and how it is configured."""

    url: str  # base URL, http://127.0.0.1:PORT
    model: str  # served model name
    model_dir: Path  # the model directory (tokenizer.json, tokenizer_config.json, config.json)
    kv_events: str  # ZMQ endpoint to connect a SUB socket to (the pod's PUB binds it)
    kv_events_replay: str  # ZMQ endpoint of the pod's ROUTER replay socket (connect a DEALER)
    topic: str
    block_size: int
    max_model_len: int
    kv_cache_bytes: int
    log_path: Path
    pid: int


class VllmProcess:
    """One real vLLM server process in its own process group. Use as a context manager or start/stop."""

    def __init__(
        self,
        model_dir: Path,
        *,
        log_path: Path,
        name: str = "tiny",
        topic: str = "kv-events",
        block_size: int = 32,
        max_model_len: int = 2048,
        max_num_seqs: int = 8,
        kv_cache_bytes: int = 16 << 20,
        core: int | None = None,
        extra_args: list[str] | None = None,
        venv: Path | None = None,
    ) -> None:
        self.venv = venv or vllm_venv()
        self.model_dir = model_dir
        self.log_path = log_path
        self.name = name
        self.topic = topic
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.kv_cache_bytes = kv_cache_bytes
        self.core = core
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.pod: RealVllm | None = None

    def start(self, timeout: float = 240.0) -> RealVllm:
        """Start the server and block until GET /health answers 200; raise with the log tail on failure."""
        port, kv_port, replay_port = free_port(), free_port(), free_port()
        kv_config = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{kv_port}",
            "replay_endpoint": f"tcp://127.0.0.1:{replay_port}",
            "topic": self.topic,
        }
        cmd = [
            str(self.venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", self.name,
            "--host", "127.0.0.1", "--port", str(port),
            "--load-format", "dummy", "--dtype", "float32",
            "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs),
            "--enable-prefix-caching", "--block-size", str(self.block_size),
            "--kv-cache-memory-bytes", str(self.kv_cache_bytes),
            "--enable-prompt-tokens-details",
            "--kv-events-config", json.dumps(kv_config),
            *self.extra_args,
        ]  # fmt: skip
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_SERVER_DEV_MODE": "1",
            "OMP_NUM_THREADS": "1",
        }
        if self.core is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(self.core)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip
        atexit.register(self.stop)  # a crashed caller must not leave an engine running
        self.pod = RealVllm(
            url=f"http://127.0.0.1:{port}",
            model=self.name,
            model_dir=self.model_dir,
            kv_events=f"tcp://127.0.0.1:{kv_port}",
            kv_events_replay=f"tcp://127.0.0.1:{replay_port}",
            topic=self.topic,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            kv_cache_bytes=self.kv_cache_bytes,
            log_path=self.log_path,
            pid=self.proc.pid,
        )
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self.pod

    def _wait_healthy(self, timeout: float) -> None:
        assert self.proc is not None and self.pod is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.pod.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vLLM not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        # Engine-core children share the group; make sure none outlives the server.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> RealVllm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    """Run one pod in the foreground until Ctrl-C (handy for manual checks)."""
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/kvgate-vllm-tiny")
    shutil.rmtree(out, ignore_errors=True)
    build_tiny_model(out)
    with VllmProcess(out, log_path=out / "vllm.log") as pod:
        print(json.dumps({k: str(v) for k, v in asdict(pod).items()}), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
