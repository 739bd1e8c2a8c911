"""Chat requests tokenize exactly as a real vLLM renders them: tools, system prompts, template kwargs.

A pod of its own serves a copy of the tiny model whose chat templates are realistic ones (tests/fixtures/
chat_templates): `chat_template.jinja` iterates over content parts (vLLM's "openai" content format,
Llama-3.1 style: BOS, `strftime_now`, documents, tools as `tojson(indent=4)`, a custom `persona`
kwarg) and `additional_chat_templates/tool_use.jinja` is a Qwen2.5-style tools template ("string"
format, `tojson` tools and tool calls, tool responses, `enable_thinking`), which vLLM picks when a
request has tools. For every chat the gateway's token ids (HFTokenizer.encode_chat_request) must equal
both vLLM's `POST /tokenize` and the `prompt_token_ids` of a real `/v1/chat/completions` answer.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.real_vllm import load_pod_module
from prefixindex.chat_template import ChatRenderError
from prefixindex.tokenizer import HFTokenizer

pytestmark = pytest.mark.vllm

pod_module = load_pod_module()
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TEMPLATES = FIXTURES / "chat_templates"
POD_START_TIMEOUT_S = 240.0

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather <now> & later, in °C",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
BARE_TOOL = {"type": "function", "function": {"name": "ping"}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "unit": "c"}'}}
BAD_CALL = {"id": "call_2", "type": "function", "function": {"name": "ping", "arguments": "not json"}}

CHATS: list[tuple[str, dict[str, Any]]] = [
    ("one user turn", {"messages": [{"role": "user", "content": "Hello there"}]}),
    ("system and turns", {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again?"},
    ]}),
    ("text parts", {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Sys part."}]},
        {"role": "user", "content": [{"type": "text", "text": "  first  "},
                                     {"type": "text", "text": "second"}]},
    ]}),
    ("no generation prompt", {"messages": [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
    ], "add_generation_prompt": False}),
    ("custom kwarg", {"messages": [{"role": "user", "content": "Who are you?"}],
                      "chat_template_kwargs": {"persona": "a pirate", "unused": 1}}),
    ("developer role", {"messages": [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Go"},
    ]}),
    ("special tokens added", {"messages": [{"role": "user", "content": "bos twice"}],
                              "add_special_tokens": True}),
    ("tools with system", {"messages": [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Zürich?"},
    ], "tools": [WEATHER, BARE_TOOL]}),
    ("tools without system", {"messages": [{"role": "user", "content": "ping it"}], "tools": [BARE_TOOL]}),
    ("tool calls and responses", {"messages": [
        {"role": "user", "content": "Weather in Zürich, and ping"},
        {"role": "assistant", "content": None, "tool_calls": [CALL, BAD_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 °C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "pong"}]},
        {"role": "user", "content": "Thanks"},
    ], "tools": [WEATHER, BARE_TOOL]}),
    ("continue final message", {"messages": [
        {"role": "user", "content": "Say a colour"},
        {"role": "assistant", "content": "The colour is "},
    ], "tools": [WEATHER], "add_generation_prompt": False, "continue_final_message": True}),
    ("thinking off", {"messages": [{"role": "user", "content": "2+2?"}], "tools": [WEATHER],
                      "chat_template_kwargs": {"enable_thinking": False}}),
    ("continue with parts", {"messages": [
        {"role": "user", "content": "Finish:"},
        {"role": "assistant", "content": [{"type": "text", "text": "Once upon a"}]},
    ], "add_generation_prompt": False, "continue_final_message": True}),
]
# Only /v1/chat/completions reads these (the /tokenize API has no such fields).
COMPLETION_ONLY: list[tuple[str, dict[str, Any]]] = [
    ("documents", {"messages": [{"role": "user", "content": "Summarise"}],
                   "documents": [{"title": "A", "text": "alpha"}, {"title": "B", "text": "beta"}]}),
    ("reasoning effort none", {"messages": [{"role": "user", "content": "Quick"}], "tools": [WEATHER],
                               "reasoning_effort": "none"}),
]
TOKENIZE_FIELDS = ("messages", "tools", "add_generation_prompt", "continue_final_message",
                   "chat_template_kwargs", "add_special_tokens")


@pytest.fixture(scope="module")
def chat_pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    venv = pod_module.vllm_venv()
    if not pod_module.vllm_available(venv):
        pytest.skip(f"real vLLM not installed at {venv} (run scripts/install-vllm.sh)")
    work = tmp_path_factory.mktemp("chat-render")
    model_dir = work / "tiny-chat"
    if (FIXTURES / "vllm" / "model" / "config.json").exists():
        shutil.copytree(FIXTURES / "vllm" / "model", model_dir)
    else:
        pod_module.build_tiny_model(model_dir, venv)
    shutil.copy(TEMPLATES / "parts_default.jinja", model_dir / "chat_template.jinja")
    (model_dir / "additional_chat_templates").mkdir()
    shutil.copy(TEMPLATES / "qwen25_tools.jinja", model_dir / "additional_chat_templates" / "tool_use.jinja")
    core = os.environ.get("KVGATE_VLLM_CORE")
    proc = pod_module.VllmProcess(
        model_dir, log_path=work / "vllm.log", core=int(core) if core else None,
        extra_args=["--enforce-eager"], venv=venv,
    )  # fmt: skip
    try:
        pod = proc.start(timeout=POD_START_TIMEOUT_S)
    except (RuntimeError, TimeoutError) as exc:
        pytest.fail(f"real vLLM did not start: {exc}", pytrace=False)
    try:
        yield pod
    finally:
        proc.stop()


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def _served_prompt(session: aiohttp.ClientSession, pod: Any, body: dict[str, Any]) -> list[int]:
    """The prompt token ids vLLM really ran for this chat-completions body."""
    request = {**body, "model": pod.model, "max_tokens": 1, "return_token_ids": True}
    if "tools" in body:
        request["tool_choice"] = "none"  # the pod has no tool parser: "auto" would be refused
    status, data = await _post(session, pod.url + "/v1/chat/completions", request)
    assert status == 200, data
    return data["prompt_token_ids"]


async def test_chats_tokenize_as_vllm_renders_them(chat_pod: Any) -> None:
    tok = HFTokenizer(str(chat_pod.model_dir))
    assert tok.chat_template is not None
    async with aiohttp.ClientSession() as session:
        for name, body in CHATS:
            mine = tok.encode_chat_request(body)
            text = tok.chat_template.render_request(body)  # the template each chat exercises
            assert ("<tools>" in text) == ("tools" in body) and ("Today Date: " in text) != ("tools" in body)
            request = {k: body[k] for k in TOKENIZE_FIELDS if k in body}
            request["model"] = chat_pod.model
            status, data = await _post(session, chat_pod.url + "/tokenize", request)
            assert status == 200, (name, data)
            assert mine == data["tokens"], (name, tok.decode(mine), tok.decode(data["tokens"]))
            assert mine == await _served_prompt(session, chat_pod, body), name
        for name, body in COMPLETION_ONLY:
            mine = tok.encode_chat_request(body)
            assert mine == await _served_prompt(session, chat_pod, body), (name, tok.decode(mine))


async def test_what_vllm_refuses_the_gateway_does_not_key(chat_pod: Any) -> None:
    """vLLM answers 400 to these; the gateway refuses to render them (it routes them without keys)."""
    tok = HFTokenizer(str(chat_pod.model_dir))
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    refused = [
        {"messages": messages, "continue_final_message": True},  # add_generation_prompt defaults to true
        {"messages": messages, "chat_template": "{{ messages[0].content }}"},
        {"messages": messages, "chat_template_kwargs": {"chat_template": "{{ 'x' }}"}},
    ]
    async with aiohttp.ClientSession() as session:
        for body in refused:
            request = {**body, "model": chat_pod.model, "max_tokens": 1}
            status, data = await _post(session, chat_pod.url + "/v1/chat/completions", request)
            assert status == 400, (body, data)
            with pytest.raises(ChatRenderError):
                tok.encode_chat_request(body)
