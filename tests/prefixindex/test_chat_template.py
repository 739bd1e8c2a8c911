"""Chat rendering as vLLM 0.32 does it (prefixindex/chat_template.py) and `--tokenizer` resolution.

The templates are realistic ones (tests/fixtures/chat_templates: a Qwen2.5-style tools template and a
Llama-3.1-style one that iterates over content parts); tests/vllm/test_chat_render_real_vllm.py checks
the same renderings against a real vLLM's token ids.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from prefixindex.chat_template import ChatRenderError, ChatTemplate, find_chat_template, special_tokens
from prefixindex.hf_cache import resolve_tokenizer
from prefixindex.prompt import PromptError, prompt_tokens
from prefixindex.tokenizer import HFTokenizer, WordTokenizer, load_tokenizer

pytestmark = pytest.mark.timeout(30)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODEL = FIXTURES / "vllm" / "model"
QWEN = (FIXTURES / "chat_templates" / "qwen25_tools.jinja").read_text()
PARTS = (FIXTURES / "chat_templates" / "parts_default.jinja").read_text()
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & later, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}  # fmt: skip
BARE = {"type": "function", "function": {"name": "ping"}}
SYSTEM_PREAMBLE = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def qwen() -> ChatTemplate:
    return ChatTemplate(QWEN, SPECIAL)


def parts() -> ChatTemplate:
    return ChatTemplate(PARTS, SPECIAL)


def user(text: Any) -> dict[str, Any]:
    return {"role": "user", "content": text}


# ---- messages, system prompts, generation prompt ------------------------------------------------


def test_system_prompt_and_turns_render_with_the_generation_prompt_by_default() -> None:
    body = {"messages": [{"role": "system", "content": "Be terse."}, user("Hi"),
                         {"role": "assistant", "content": "Hello."}, user("Again?")]}  # fmt: skip
    assert qwen().render_request(body) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nAgain?<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = qwen().render_request({**body, "add_generation_prompt": False})
    assert no_prompt.endswith("Again?<|im_end|>\n")


def test_text_parts_join_with_newlines_for_a_string_template_and_stay_parts_for_an_openai_one() -> None:
    content = [{"type": "text", "text": " one "}, {"type": "text", "text": "two"}]
    assert qwen().content_format() == "string" and parts().content_format() == "openai"
    assert qwen().render_request({"messages": [user(content)]}) == (
        SYSTEM_PREAMBLE + "<|im_start|>user\n one \ntwo<|im_end|>\n<|im_start|>assistant\n"
    )
    # the parts template trims each part and concatenates them; a plain string is one part
    rendered = parts().render_request({"messages": [user(content)], "add_generation_prompt": False})
    assert rendered.endswith("<|start_header_id|>user<|end_header_id|>\n\nonetwo<|eot_id|>")
    assert rendered.startswith("<s><|start_header_id|>system")  # bos_token from the tokenizer


def test_content_format_follows_assignments_slices_and_macros() -> None:
    aliased = ("{% set ms = messages[1:] %}{% for m in ms %}{% for p in m['content'] %}{{ p.text }}"
               "{% endfor %}{% endfor %}")
    macro = ("{% macro show(c) %}{% for p in c %}{{ p.text }}{% endfor %}{% endmacro %}"
             "{% for m in messages %}{{ show(m.content) }}{% endfor %}")
    plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert ChatTemplate(aliased).content_format() == "openai"
    assert ChatTemplate(macro).content_format() == "openai"
    assert ChatTemplate(plain).content_format() == "string"


def test_developer_messages_become_one_leading_system_message_when_the_template_lacks_the_role() -> None:
    body = {"messages": [{"role": "system", "content": "A"}, {"role": "developer", "content": "B"},
                         user("go")]}  # fmt: skip
    rendered = qwen().render_request(body)
    assert rendered.startswith("<|im_start|>system\nA\n\nB<|im_end|>\n<|im_start|>user\ngo")
    knows = ChatTemplate("{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}{# 'developer' #}")
    assert knows.render_request({"messages": [{"role": "developer", "content": "B"}]}) == "developer:B;"


def test_add_special_tokens_in_the_body_adds_bos_as_vllm_does() -> None:
    tok = HFTokenizer(str(MODEL))
    body = {"messages": [user("hello")]}
    plain = tok.encode_chat_request(body)
    assert plain == tok.encode_chat(body["messages"])  # the default: no special tokens added
    bos = tok.encode("<s>", add_special_tokens=False)
    assert tok.encode_chat_request({**body, "add_special_tokens": True}) == bos + plain


# ---- tools --------------------------------------------------------------------------------------


def test_tools_render_as_vllms_model_dump_in_tojson() -> None:
    rendered = qwen().render_request({"messages": [user("Weather?")], "tools": [WEATHER, BARE]})
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    dumped = [
        '{"type": "function", "function": {"name": "get_weather", '
        '"description": "Weather <now> & later, in °C", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}',
        '{"type": "function", "function": {"name": "ping", "description": null, "parameters": null}}',
    ]
    assert "<tools>\n" + "\n".join(dumped) + "\n</tools>" in rendered


def test_tool_calls_arguments_are_parsed_to_objects_and_tool_messages_render() -> None:
    calls = [
        {"id": "1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
        {"id": "2", "type": "function", "function": {"name": "ping", "arguments": "not json"}},
        {"id": "3", "type": "function", "function": {"name": "ping", "arguments": "[1, 2]"}},
    ]
    body = {"messages": [
        user("go"), {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "1", "content": "21"},
        {"role": "tool", "tool_call_id": "2", "content": [{"type": "text", "text": "pong"}]},
    ], "tools": [WEATHER, BARE], "add_generation_prompt": False}  # fmt: skip
    rendered = qwen().render_request(body)
    assert '{"name": "get_weather", "arguments": {"city": "Zürich"}}' in rendered
    assert rendered.count('{"name": "ping", "arguments": {}}') == 2  # invalid JSON, and not an object
    assert rendered.endswith(
        "<|im_start|>user\n<tool_response>\n21\n</tool_response>\n<tool_response>\npong\n</tool_response><|im_end|>\n"
    )


def test_tojson_keeps_non_ascii_and_html_and_takes_indent() -> None:
    rendered = parts().render_request({"messages": [user("x")], "tools": [BARE]})
    assert json.dumps(BARE | {"function": {"name": "ping", "description": None, "parameters": None}},
                      indent=4) in rendered  # fmt: skip
    t = ChatTemplate("{{ messages[0].content | tojson }}|{{ {'b': 1, 'a': '<é>'} | tojson(indent=2) }}")
    assert t.render_request({"messages": [user("<&é>")]}) == '"<&é>"|{\n  "b": 1,\n  "a": "<é>"\n}'


@pytest.mark.parametrize("tools", [[], [{"type": "function"}], [{"function": {"name": 3}}],
                                   [{"type": "retrieval", "function": {"name": "x"}}], "nope"])
def test_a_bad_tool_schema_cannot_be_rendered(tools: Any) -> None:
    with pytest.raises(ChatRenderError):
        qwen().render_request({"messages": [user("x")], "tools": tools})


def test_named_templates_pick_tool_use_for_tools() -> None:
    both = ChatTemplate({"default": "plain:{{ messages[0].content }}",
                         "tool_use": "tools:{{ tools | length }}"})  # fmt: skip
    assert both.render_request({"messages": [user("a")]}) == "plain:a"
    assert both.render_request({"messages": [user("a")], "tools": [BARE]}) == "tools:1"
    with pytest.raises(ChatRenderError, match="no default"):
        ChatTemplate({"tool_use": "x"}).render_request({"messages": [user("a")]})


# ---- continue_final_message and add_generation_prompt -------------------------------------------


def test_continue_final_message_leaves_the_final_message_open() -> None:
    body = {"messages": [user("Say a colour"), {"role": "assistant", "content": "The colour is "}],
            "add_generation_prompt": False, "continue_final_message": True}  # fmt: skip
    assert qwen().render_request(body).endswith("<|im_start|>assistant\nThe colour is ")
    final = {"role": "assistant", "content": [{"type": "text", "text": "Once"}]}
    in_parts = {**body, "messages": [user("a"), final]}
    assert parts().render_request(in_parts).endswith("<|start_header_id|>assistant<|end_header_id|>\n\nOnce")


@pytest.mark.parametrize("generation_prompt", [None, True])
def test_continue_final_message_with_a_generation_prompt_is_refused(generation_prompt: bool | None) -> None:
    """vLLM answers 400: explicitly both, or add_generation_prompt left at its default (true)."""
    body: dict[str, Any] = {"messages": [user("a"), {"role": "assistant", "content": "b"}],
                            "continue_final_message": True}  # fmt: skip
    if generation_prompt is not None:
        body["add_generation_prompt"] = generation_prompt
    with pytest.raises(ChatRenderError):
        qwen().render_request(body)


# ---- chat_template_kwargs, documents, reasoning_effort ------------------------------------------


def test_chat_template_kwargs_reach_the_template_and_the_request_fields_win() -> None:
    off = qwen().render_request({"messages": [user("q")], "chat_template_kwargs": {"enable_thinking": False}})
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    on = qwen().render_request({"messages": [user("q")], "chat_template_kwargs": {"enable_thinking": True}})
    assert on.endswith("<|im_start|>assistant\n")
    # the body's add_generation_prompt (default true) overrides the one in chat_template_kwargs
    kwargs = {"add_generation_prompt": False}
    kw = qwen().render_request({"messages": [user("q")], "chat_template_kwargs": kwargs})
    assert kw.endswith("<|im_start|>assistant\n")
    persona = parts().render_request({"messages": [user("q")], "chat_template_kwargs": {"persona": "pirate"}})
    assert "\nPersona: pirate<|eot_id|>" in persona
    # kwargs override the special tokens; "auto" and null values are dropped
    t = ChatTemplate("{{ bos_token }}|{{ x is defined }}", SPECIAL)
    kwargs = {"bos_token": "B", "x": "auto"}
    assert t.render_request({"messages": [user("q")], "chat_template_kwargs": kwargs}) == "B|False"


def test_reasoning_effort_sets_enable_thinking_unless_given() -> None:
    body = {"messages": [user("q")], "reasoning_effort": "none"}
    assert qwen().render_request(body).endswith("<think>\n\n</think>\n\n")
    given = {**body, "chat_template_kwargs": {"enable_thinking": True}}
    assert qwen().render_request(given).endswith("<|im_start|>assistant\n")
    assert qwen().render_request({**body, "reasoning_effort": "high"}).endswith("<|im_start|>assistant\n")


def test_documents_reach_the_template() -> None:
    docs = [{"title": "A", "text": "alpha"}, {"title": "B", "text": "beta"}]
    rendered = parts().render_request({"messages": [user("s")], "documents": docs})
    assert "Documents:\n[1] A: alpha\n[2] B: beta\n" in rendered
    with pytest.raises(ChatRenderError):
        parts().render_request({"messages": [user("s")], "documents": ["not an object"]})


def test_strftime_now_is_the_local_date() -> None:
    t = ChatTemplate("{{ strftime_now('%Y-%m-%d %H') }}")
    before = datetime.now().strftime("%Y-%m-%d %H")
    got = t.render_request({"messages": [user("x")]})
    assert got in (before, datetime.now().strftime("%Y-%m-%d %H"))


# ---- what cannot be keyed -----------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    {"messages": [user("x")], "chat_template": "{{ 'mine' }}"},
    {"messages": [user("x")], "chat_template_kwargs": {"chat_template": "{{ 'mine' }}"}},
    {"messages": [user([{"type": "image_url", "image_url": {"url": "http://x/i.png"}}])]},
    {"messages": [{"role": "assistant", "content": "x"}]},  # the template's raise_exception
    {"messages": [user("x")], "chat_template_kwargs": "not an object"},
    {"messages": []},
])  # fmt: skip
def test_what_the_gateway_cannot_render_as_the_pod_raises(body: dict[str, Any]) -> None:
    t = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}ok")
    with pytest.raises(ChatRenderError):
        t.render_request(body)


def test_an_unrenderable_chat_is_routed_without_keys_and_counted() -> None:
    from router.policy import RouteRequest
    from router.prefix_cache import PrefixCache

    registry = CollectorRegistry()
    tok = HFTokenizer(str(MODEL))
    cache = PrefixCache("m", tokenizer=tok, registry=registry)
    body = {"model": "m", "messages": [user([{"type": "image_url", "image_url": {"url": "http://x/i.png"}}])]}
    with pytest.raises(PromptError) as err:
        prompt_tokens(body, "/v1/chat/completions", tok)
    assert err.value.reason == "chat_template"
    request = RouteRequest("r1", "m", "/v1/chat/completions", body, {})
    cache.prepare(request.state, request)
    assert request.state.prompt is None and not request.state.keys
    labels = {"model": "m", "reason": "chat_template"}
    value = registry.get_sample_value("kvgate_prefix_unkeyed_requests_total", labels)
    assert value == 1.0


def test_the_word_tokenizer_renders_chat_bodies_as_before() -> None:
    tok = WordTokenizer()
    messages = [user("hello there")]
    assert tok.encode_chat_request({"messages": messages, "add_generation_prompt": False}) == \
        tok.encode_chat(messages, add_generation_prompt=False)


# ---- where the template and the tokenizer are found ---------------------------------------------


def _model_copy(tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(MODEL, target)
    return target


def test_template_files_take_priority_over_tokenizer_config(tmp_path: Path) -> None:
    model = _model_copy(tmp_path)
    config = json.loads((model / "tokenizer_config.json").read_text())
    assert find_chat_template(model, config) == config["chat_template"]
    (model / "chat_template.jinja").write_text("J{{ messages[0].content }}")
    assert find_chat_template(model, config) == "J{{ messages[0].content }}"
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / "tool_use.jinja").write_text("T")
    assert find_chat_template(model, config) == {"default": "J{{ messages[0].content }}", "tool_use": "T"}
    tok = HFTokenizer(str(model))
    assert tok.render_chat([user("x")]) == "Jx"
    assert tok.chat_template is not None
    assert tok.chat_template.render_request({"messages": [user("x")], "tools": [BARE]}) == "T"


def test_template_list_in_config_and_processor_file(tmp_path: Path) -> None:
    listed = {"chat_template": [{"name": "default", "template": "D"}, {"name": "rag", "template": "R"}]}
    assert find_chat_template(tmp_path, listed) == {"default": "D", "rag": "R"}
    assert find_chat_template(tmp_path, {}) is None
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "P"}))
    assert find_chat_template(tmp_path, {}) == "P"
    mapped = {"bos_token": {"content": "<b>"}, "eos_token": "e"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(mapped))
    assert special_tokens(tmp_path, {"eos_token": "E"}) == {"bos_token": "<b>", "eos_token": "E"}


def _fake_hf_cache(root: Path, repo: str, commit: str, ref: str | None = "main") -> Path:
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL / name, snapshot / name)
    if ref:
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


def test_a_repo_id_resolves_from_the_hf_cache_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = _fake_hf_cache(tmp_path / "hf" / "hub", "acme/tiny-chat", "0123abcd")
    assert resolve_tokenizer("acme/tiny-chat") == str(snapshot)
    assert resolve_tokenizer("acme/tiny-chat@0123abcd") == str(snapshot)  # a commit, no ref needed
    tok = load_tokenizer("acme/tiny-chat")
    assert isinstance(tok, HFTokenizer)
    assert tok.encode_chat([user("hi")]) == HFTokenizer(str(MODEL)).encode_chat([user("hi")])
    # HF_HUB_CACHE wins over HF_HOME
    other = _fake_hf_cache(tmp_path / "hub2", "acme/tiny-chat", "ffff0000")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub2"))
    assert resolve_tokenizer("acme/tiny-chat") == str(other)


def test_a_missing_repo_id_is_a_one_line_error_naming_what_was_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer("acme/absent")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "models--acme--absent" / "refs" / "main") in message
    _fake_hf_cache(tmp_path, "acme/noref", "abc", ref=None)  # a snapshot but no refs/main
    with pytest.raises(FileNotFoundError, match="models--acme--noref"):
        resolve_tokenizer("acme/noref")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_tokenizer("./not/here")


def test_kvgate_serve_with_a_missing_tokenizer_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    code = main(["serve", "--backend", "http://127.0.0.1:9", "--model", "m", "--policy", "cache_aware",
                 "--tokenizer", "acme/absent", "--port", "0"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "acme/absent" in err and "models--acme--absent" in err


def test_the_template_is_compiled_once_not_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from jinja2 import Environment

    template = qwen()

    def compile_again(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("compiled per request")

    monkeypatch.setattr(Environment, "from_string", compile_again)
    monkeypatch.setattr(Environment, "parse", compile_again)
    body = {"messages": [user("x")], "tools": [BARE]}
    assert template.render_request(body) == template.render_request(body)
