"""Record a real vLLM's behaviour into tests/fixtures/vllm/: the reference the simulator must match.

Starts one real vLLM (CPU build, tiny random-weight model, KV events on, see capture_vllm_pod.py), sends
a fixed script of requests and saves, byte-exact where it matters:

- `http/<name>.json`: request (method, path, headers, body) and response (status, headers in order,
  raw body text; parsed JSON or parsed SSE events beside it for convenience);
- `metrics.txt`: the raw /metrics exposition after the script ran;
- `kv_events/<scenario>.msgpack`: every multipart message a SUB socket received during the scenario,
  as a msgpack array of messages, each an array of its frames (bytes, untouched);
  `kv_events/<scenario>.json`: the same decoded for people (hashes as integers, bytes as hex);
- `model/`: the tokenizer and config of the model the fixtures were recorded with (token ids in the
  fixtures are only meaningful with this tokenizer);
- `meta.json`: vLLM version, server arguments, ports layout, block size, cache size.

Every exchange has an `order`: sending the requests again in that order to an empty pod with the same
cache reproduces the recorded cache hits and KV events (tests/vllm/test_sim_fidelity_recorded.py).

Run: `.venv/bin/python scripts/capture_vllm.py [--out tests/fixtures/vllm]` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture_vllm_pod import ROOT, RealVllm, VllmProcess, build_tiny_model, vllm_venv

MODEL = "tiny"
TOPIC = "kv-events"
BLOCK_SIZE = 32
KV_BYTES = 8 << 20  # 128 blocks of 32 tokens: small enough to evict with a few prompts
JSON_HEADERS = {"Content-Type": "application/json"}


def words(n: int, tag: str) -> str:
    """Deterministic text of `n` words, distinct per `tag` from its first word on."""
    vocab = ["alpha", "beta", "gamma", "delta", "import", "return", "value", "system", "cache", "block"]
    return " ".join([tag] + [f"{vocab[(i * 7 + len(tag)) % len(vocab)]}{i % 13}" for i in range(n - 1)])


class Recorder:
    """A SUB socket on the pod's publisher, collecting every multipart message in a thread."""

    def __init__(self, endpoint: str) -> None:
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(endpoint)
        self._lock = threading.Lock()
        self._messages: list[list[bytes]] = []
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(100):
                frames = self._sub.recv_multipart()
                with self._lock:
                    self._messages.append(frames)
                    self._last = time.monotonic()

    def drain(self, quiet: float = 1.5, limit: float = 15.0) -> list[list[bytes]]:
        """Messages received since the last drain, once none arrived for `quiet` seconds."""
        start = time.monotonic()
        time.sleep(quiet)
        while time.monotonic() - start < limit:
            with self._lock:
                if time.monotonic() - self._last >= quiet:
                    out, self._messages = self._messages, []
                    return out
            time.sleep(0.1)
        with self._lock:
            out, self._messages = self._messages, []
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sub.close(linger=0)
        self._ctx.term()


def replay(endpoint: str, start_seq: int, timeout: float = 5.0) -> list[list[bytes]]:
    """Ask the replay ROUTER for batches from `start_seq`: frames as the DEALER got them, end marker too."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    out: list[list[bytes]] = []
    try:
        dealer.send_multipart([b"", start_seq.to_bytes(8, "big")])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not dealer.poll(int((deadline - time.monotonic()) * 1000) + 1):
                break
            frames = dealer.recv_multipart()
            out.append(frames)
            if len(frames) >= 3 and int.from_bytes(frames[2], "big", signed=True) == -1:
                break
    finally:
        dealer.close(linger=0)
        ctx.term()
    return out


def sse_data(event: str) -> Any:
    """The data of one SSE event: parsed JSON, or the raw string (`[DONE]`)."""
    data = event.removeprefix("data: ")
    return data if data.startswith("[") else json.loads(data)


def readable(obj: Any) -> Any:
    """msgpack-decoded value made JSON-friendly: bytes become {"hex": ...}."""
    if isinstance(obj, bytes):
        return {"hex": obj.hex()}
    if isinstance(obj, list | tuple):
        return [readable(x) for x in obj]
    if isinstance(obj, dict):
        return {str(readable(k) if isinstance(k, bytes) else k): readable(v) for k, v in obj.items()}
    return obj


def decode_message(frames: list[bytes]) -> dict[str, Any]:
    """A PUB message [topic, seq, payload] (or a replay reply ["", topic, seq, payload]) for people."""
    body = frames[1:] if len(frames) == 4 and frames[0] == b"" else frames
    view: dict[str, Any] = {"n_frames": len(frames), "frame_lengths": [len(f) for f in frames]}
    if len(body) == 3:
        topic, seq, payload = body
        view["topic"] = topic.decode(errors="replace")
        view["seq"] = int.from_bytes(seq, "big", signed=True)
        decoded = msgpack.unpackb(payload, raw=False, strict_map_key=False) if payload else None
        view["payload"] = readable(decoded)
    return view


class Capture:
    """Sends the script's requests to one pod and writes what came back."""

    def __init__(self, pod: RealVllm, out: Path) -> None:
        self.pod = pod
        self.out = out
        self.host, port = pod.url.removeprefix("http://").split(":")
        self.port = int(port)
        self.recorder = Recorder(pod.kv_events)
        self.all_messages: list[list[bytes]] = []
        self.order = 0  # position of each exchange in the script: replaying in order reproduces the cache

    # ---- HTTP -----------------------------------------------------------------------------------
    def http(
        self,
        name: str | None,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """One exchange; saved as http/<name>.json unless `name` is None. Returns the record."""
        hdrs = dict(JSON_HEADERS if (body is not None or raw is not None) else {})
        hdrs.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            payload = resp.read()
            record_headers = [[k.lower(), v] for k, v in resp.getheaders()]
            status, reason = resp.status, resp.reason
        finally:
            conn.close()
        text = payload.decode("utf-8", errors="surrogateescape")
        response: dict[str, Any] = {"status": status, "reason": reason, "headers": record_headers}
        try:
            response["body"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            response["body_hex"] = payload.hex()
        ctype = dict(record_headers).get("content-type", "")
        if ctype.startswith("text/event-stream"):
            response["sse_events"] = [sse_data(ev) for ev in text.split("\n\n") if ev.strip()]
        elif ctype.startswith("application/json") and payload:
            response["json"] = json.loads(payload)
        self.order += 1
        record = {
            "name": name,
            "order": self.order,
            "request": {
                "method": method,
                "path": path,
                "headers": hdrs,
                "body": body if raw is None else raw.decode("utf-8", errors="replace"),
            },
            "response": response,
        }
        if name:
            self._write(f"http/{name}.json", json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        return record

    # ---- KV events --------------------------------------------------------------------------------
    def events(self, scenario: str, action: Callable[[], None]) -> list[list[bytes]]:
        """Run `action` and save the messages the publisher sent meanwhile as kv_events/<scenario>."""
        self.recorder.drain(quiet=0.5)  # anything left over belongs to no scenario
        action()
        messages = self.recorder.drain()
        self.all_messages.extend(messages)
        self._write_events(scenario, messages)
        return messages

    def _write_events(self, scenario: str, messages: list[list[bytes]]) -> None:
        packed = msgpack.packb([list(m) for m in messages], use_bin_type=True)
        (self.out / "kv_events").mkdir(parents=True, exist_ok=True)
        (self.out / "kv_events" / f"{scenario}.msgpack").write_bytes(packed)
        view = [decode_message(m) for m in messages]
        self._write(f"kv_events/{scenario}.json", json.dumps(view, indent=1) + "\n")
        print(f"  kv_events/{scenario}: {len(messages)} messages", flush=True)

    def _write(self, rel: str, text: str) -> None:
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def close(self) -> None:
        self.recorder.close()


def completion(prompt: Any, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}


def chat(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0, **extra}


CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three colours."},
    {"role": "assistant", "content": "Red, green, blue."},
    {"role": "user", "content": "And two more?"},
]


def run_http_script(c: Capture) -> None:
    """API shapes: discovery, tokenize, completions and chat (stream and not), errors."""
    c.http("health", "GET", "/health")
    c.http("models", "GET", "/v1/models")
    c.http("version", "GET", "/version")
    c.http("tokenize_prompt", "POST", "/tokenize", {"model": MODEL, "prompt": "Hello world, the cache."})
    c.http("tokenize_prompt_no_special", "POST", "/tokenize",
           {"model": MODEL, "prompt": "Hello world, the cache.", "add_special_tokens": False})
    c.http("tokenize_messages", "POST", "/tokenize", {"model": MODEL, "messages": CONVERSATION[:2]})
    c.http("tokenize_messages_multiturn", "POST", "/tokenize", {"model": MODEL, "messages": CONVERSATION})
    c.http("tokenize_messages_no_generation_prompt", "POST", "/tokenize",
           {"model": MODEL, "messages": CONVERSATION, "add_generation_prompt": False})
    c.http("detokenize", "POST", "/detokenize", {"model": MODEL, "tokens": [1, 43, 552, 355]})

    c.http("completion", "POST", "/v1/completions", completion("The quick brown fox"))
    c.http("completion_stream", "POST", "/v1/completions", completion("The quick brown fox", stream=True))
    c.http("completion_stream_usage", "POST", "/v1/completions",
           completion("The quick brown fox", stream=True, stream_options={"include_usage": True}))
    c.http("completion_request_id", "POST", "/v1/completions", completion("The quick brown fox"),
           headers={"X-Request-Id": "fixture-req-1"})
    c.http("completion_stream_request_id", "POST", "/v1/completions",
           completion("The quick brown fox", stream=True), headers={"X-Request-Id": "fixture-req-2"})
    c.http("completion_token_ids", "POST", "/v1/completions", completion([1, 43, 552, 355, 312]))
    c.http("completion_prompt_list", "POST", "/v1/completions", completion(["One prompt", "Another prompt"]))
    c.http("completion_ignore_eos", "POST", "/v1/completions",
           completion("Count on", max_tokens=8, ignore_eos=True))
    long_prompt = words(120, "cachedprefix")
    c.http("completion_cached_first", "POST", "/v1/completions", completion(long_prompt))
    c.http("completion_cached_again", "POST", "/v1/completions", completion(long_prompt))
    c.http("completion_cache_salt", "POST", "/v1/completions", completion(long_prompt, cache_salt="tenant-a"))
    c.http("completion_cached_stream_usage", "POST", "/v1/completions",
           completion(long_prompt, stream=True, stream_options={"include_usage": True}))
    c.http("completion_kv_transfer_params", "POST", "/v1/completions", completion(
        "Prefill me", max_tokens=1, kv_transfer_params={
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}))

    # prompt + max_tokens beyond the context is not an error: the output stops at max_model_len
    c.http("completion_max_tokens_capped_by_context", "POST", "/v1/completions",
           completion(words(300, "fits"), max_tokens=1500))

    c.http("chat", "POST", "/v1/chat/completions", chat(CONVERSATION[:2]))
    c.http("chat_stream", "POST", "/v1/chat/completions", chat(CONVERSATION[:2], stream=True))
    c.http("chat_stream_usage", "POST", "/v1/chat/completions",
           chat(CONVERSATION, stream=True, stream_options={"include_usage": True}))
    c.http("chat_request_id", "POST", "/v1/chat/completions", chat(CONVERSATION[:2]),
           headers={"X-Request-Id": "fixture-chat-1"})
    c.http("chat_max_completion_tokens", "POST", "/v1/chat/completions",
           {"model": MODEL, "messages": CONVERSATION[:2], "max_completion_tokens": 3, "temperature": 0})

    too_long = words(2100, "toolong")
    errors: list[tuple[str, str, str, Any, bytes | None]] = [
        ("error_invalid_json", "POST", "/v1/completions", None, b'{"model": "tiny", "prompt": '),
        ("error_empty_body", "POST", "/v1/completions", None, b""),
        ("error_body_not_object", "POST", "/v1/completions", [1, 2], None),
        ("error_missing_prompt", "POST", "/v1/completions", {"model": MODEL, "max_tokens": 4}, None),
        ("error_wrong_type_max_tokens", "POST", "/v1/completions",
         completion("Hello", max_tokens="ten"), None),
        ("error_wrong_type_prompt", "POST", "/v1/completions", completion({"text": "Hello"}), None),
        ("error_wrong_type_stream", "POST", "/v1/completions", completion("Hello", stream="yes"), None),
        ("error_negative_max_tokens", "POST", "/v1/completions", completion("Hello", max_tokens=-1), None),
        ("error_zero_max_tokens", "POST", "/v1/completions", completion("Hello", max_tokens=0), None),
        ("error_max_tokens_too_large", "POST", "/v1/completions",
         completion("Hello", max_tokens=5000), None),
        ("error_context_too_long", "POST", "/v1/completions", completion(too_long), None),

        ("error_token_id_out_of_vocab", "POST", "/v1/completions", completion([1, 5000, 7]), None),
        ("error_context_too_long_stream", "POST", "/v1/completions", completion(too_long, stream=True), None),
        ("error_unknown_model", "POST", "/v1/completions", {**completion("Hello"), "model": "nope"}, None),
        ("error_negative_temperature", "POST", "/v1/completions", completion("Hello", temperature=-1), None),
        ("error_empty_cache_salt", "POST", "/v1/completions", completion("Hello", cache_salt=""), None),
        ("error_stream_options_without_stream", "POST", "/v1/completions",
         completion("Hello", stream_options={"include_usage": True}), None),
        ("error_chat_missing_messages", "POST", "/v1/chat/completions", {"model": MODEL}, None),
        ("error_chat_unknown_model", "POST", "/v1/chat/completions",
         {**chat(CONVERSATION[:2]), "model": "nope"}, None),
        ("error_chat_context_too_long", "POST", "/v1/chat/completions",
         chat([{"role": "user", "content": too_long}]), None),
        ("error_chat_negative_max_tokens", "POST", "/v1/chat/completions",
         chat(CONVERSATION[:2], max_tokens=-1), None),
        ("error_chat_bad_messages_type", "POST", "/v1/chat/completions",
         {"model": MODEL, "messages": "hello"}, None),
        ("error_tokenize_unknown_model", "POST", "/tokenize", {"model": "nope", "prompt": "Hello"}, None),
        ("error_unknown_path", "GET", "/v1/nope", None, None),
        ("error_wrong_method", "GET", "/v1/completions", None, None),
    ]  # fmt: skip
    for name, method, path, body, raw in errors:
        c.http(name, method, path, body, raw=raw)


def run_event_script(c: Capture) -> None:
    """KV events: store, hit, decode-filled blocks, salt, chat, eviction, reset, replay."""
    first = words(200, "firstprompt")  # 695 tokens: 21 full blocks and a partial one
    c.events("first_prompt", lambda: c.http("events_first_prompt", "POST", "/v1/completions",
                                            completion(first, max_tokens=1)))
    c.events("repeated_prompt", lambda: c.http("events_repeated_prompt", "POST", "/v1/completions",
                                               completion(first, max_tokens=1)))
    c.events("decode_filled", lambda: c.http("events_decode_filled", "POST", "/v1/completions",
                                             completion(words(20, "decodefill"), max_tokens=100,
                                                        ignore_eos=True)))
    c.events("cache_salt", lambda: c.http("events_cache_salt", "POST", "/v1/completions",
                                          completion(first, max_tokens=1, cache_salt="tenant-a")))
    chat_body = chat([{"role": "user", "content": words(80, "chatevents")}], max_tokens=1)
    c.events("chat", lambda: c.http("events_chat", "POST", "/v1/chat/completions", chat_body))

    def evict() -> None:
        # 128 blocks in the cache; six prompts of ~32 blocks each must evict the oldest free blocks.
        for i in range(6):
            c.http(f"events_eviction_{i}", "POST", "/v1/completions",
                   completion(words(300, f"evict{i}"), max_tokens=1))

    c.events("eviction", evict)
    c.events("reset_prefix_cache", lambda: c.http("reset_prefix_cache", "POST", "/reset_prefix_cache"))
    c.events("after_reset_prompt", lambda: c.http("events_after_reset", "POST", "/v1/completions",
                                                  completion(first, max_tokens=1)))

    seqs = [int.from_bytes(m[1], "big") for m in c.all_messages]
    mid = seqs[len(seqs) // 2] if seqs else 0
    for name, start in (("replay_from_0", 0), ("replay_from_mid", mid), ("replay_past_end", 10**6)):
        frames = replay(c.pod.kv_events_replay, start)
        c._write_events(name, frames)
    (c.out / "kv_events" / "replay_requests.json").write_text(json.dumps(
        {"replay_from_0": 0, "replay_from_mid": mid, "replay_past_end": 10**6}, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "vllm")
    ap.add_argument("--core", type=int, default=None, help="pin the vLLM worker to this CPU core")
    args = ap.parse_args()
    out: Path = args.out
    work = Path(tempfile.mkdtemp(prefix="kvgate-capture-"))
    model_dir = build_tiny_model(work / "tiny")
    venv = vllm_venv()
    version = subprocess.run([str(venv / "bin" / "python"), "-c", "import vllm; print(vllm.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    proc = VllmProcess(model_dir, log_path=work / "vllm.log", name=MODEL, topic=TOPIC,
                       block_size=BLOCK_SIZE, kv_cache_bytes=KV_BYTES, core=args.core,
                       extra_args=["--enforce-eager"])  # fmt: skip
    print(f"starting vLLM {version} (log {work / 'vllm.log'})", flush=True)
    pod = proc.start()
    try:
        for sub in ("http", "kv_events", "model"):
            shutil.rmtree(out / sub, ignore_errors=True)
        c = Capture(pod, out)
        time.sleep(1.0)  # let the SUB connection settle before the first event (ZMQ slow joiner)
        try:
            run_http_script(c)
            run_event_script(c)
            metrics = c.http("metrics", "GET", "/metrics")
            (out / "metrics.txt").write_text(metrics["response"]["body"])
            c.http("health_after", "GET", "/health")
        finally:
            c.close()
    finally:
        proc.stop()
    (out / "model").mkdir(parents=True, exist_ok=True)
    for f in sorted(model_dir.iterdir()):
        shutil.copy(f, out / "model" / f.name)
    meta = {
        "vllm_version": version,
        "model": MODEL,
        "block_size": BLOCK_SIZE,
        "kv_cache_memory_bytes": KV_BYTES,
        "max_model_len": pod.max_model_len,
        "max_num_seqs": proc.max_num_seqs,
        "topic": TOPIC,
        "kv_events": "publisher binds tcp://*:PORT; replay ROUTER binds tcp://127.0.0.1:PORT",
        "flags": ["--load-format dummy", "--dtype float32", "--enable-prefix-caching", "--enforce-eager",
                  "--enable-prompt-tokens-details", "--kv-cache-memory-bytes", "VLLM_SERVER_DEV_MODE=1"],
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
