"""Chat requests rendered as vLLM 0.32 renders them for `/v1/chat/completions`, and where templates live.

A chat request's prefix keys are only right if the gateway builds the very prompt text the pod builds.
vLLM's path (renderers/online_renderer.py, renderers/hf.py, renderers/chat_utils.py, then transformers'
`apply_chat_template`) is reproduced step by step:

- messages become vLLM's "conversation": content as one string (text parts joined by newlines) or, when
  the template loops over a message's content, as a list of `{"type": "text", "text": ...}` parts (the
  "content format", detected once per template from its syntax tree); assistant `tool_calls` keep their
  `arguments` parsed from a JSON string into an object (`{}` when empty, invalid or not an object);
  `reasoning`, `tool_call_id`, `name` and a developer message's `tools` carried over; `developer`
  messages become `system` ones (merged at the front) when the template does not name that role.
- `tools` are normalised as vLLM's pydantic model dumps them (`{"type", "function": {"name",
  "description", "parameters"}}`, `description`/`parameters` null when absent).
- template variables merge as vLLM merges them: the request's `chat_template_kwargs`, then its
  `add_generation_prompt` (default true), `continue_final_message`, `documents`, `reasoning_effort` (and
  `enable_thinking = reasoning_effort != "none"` unless given), values null or "auto" dropped; the
  tokenizer's special tokens (`bos_token`, ...) are defaults the kwargs may override.
- `continue_final_message` cuts the prompt after the final message's content, as transformers does
  (and, like it, refuses `add_generation_prompt` at the same time: vLLM answers that with a 400).
- the template runs in jinja2's immutable sandbox with `trim_blocks`/`lstrip_blocks`, the loop-controls
  extension, `{% generation %}` blocks, `raise_exception`, `strftime_now` (local time) and a `tojson`
  that is `json.dumps(ensure_ascii=False, indent, separators, sort_keys=False)`.

What cannot be rendered as the pod would render it raises `ChatRenderError`: a template that raises,
malformed tools or messages, non-text content (images, audio: the pod expands them into tokens the
gateway cannot know), or a request carrying its own `chat_template` (vLLM refuses those unless started
with `--trust-request-chat-template`; the gateway does not trust them either). The gateway then routes
the request without prefix keys and lets the pod give its own answer.

Not modelled (server flags the gateway cannot see): `--chat-template`, `--default-chat-template-kwargs`,
`--chat-template-content-format`, `--exclude-tools-when-tool-choice-none`, processor (multimodal)
templates that differ from the tokenizer's, and Mistral/Harmony tokenizers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import orjson

ContentFormat = Literal["string", "openai"]

# Named special tokens transformers exposes to every template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
# Parameters of `apply_chat_template` itself: given as template kwargs they are consumed, not rendered.
_APPLY_PARAMS = frozenset({
    "self", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})
# Content-part types vLLM reads as text, and the field each keeps its text in.
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
               "thinking": "thinking"}
_SKIP_WHEN_EMPTY = frozenset({"text", "refusal"})
# Fields vLLM knows on a content part; any other key is kept on an "openai"-format text part.
_KNOWN_PART_FIELDS = frozenset({
    "audio_embeds", "audio_url", "closed", "data", "file", "image_embeds", "image_pil", "image_url",
    "input_audio", "name", "prompt_cache_breakpoint", "refusal", "text", "thinking", "type", "uuid",
    "video_embeds", "video_url",
})
_BILLING_HEADER = "x-anthropic-billing-header"
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_UNSET = (None, "auto")


class ChatRenderError(ValueError):
    """This chat request cannot be rendered as vLLM would render it (the pod decides what to answer)."""


# ---- where a tokenizer's chat template lives ------------------------------------------------------


def find_chat_template(
    directory: str | os.PathLike[str], config: Mapping[str, Any]
) -> str | dict[str, str] | None:
    """The chat template(s) of the tokenizer in `directory`, found as transformers finds them.

    `chat_template.jinja` (the default) and `additional_chat_templates/*.jinja` (named) take priority
    over `chat_template` in tokenizer_config.json (a string, or a list of `{name, template}`); a
    processor's `chat_template.json` is the last resort. One template is returned as a string, several
    as a dict by name.
    """
    root = Path(directory)
    files: dict[str, str] = {}
    default = root / "chat_template.jinja"
    if default.is_file():
        files["default"] = default.read_text(encoding="utf-8")
    extra = root / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            files[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if files:
        return files["default"] if list(files) == ["default"] else files
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {t["name"]: t["template"] for t in template if isinstance(t, Mapping)}
    if template:
        return template
    processor = root / "chat_template.json"
    if processor.is_file():
        value = orjson.loads(processor.read_bytes()).get("chat_template")
        return value or None
    return None


def special_tokens(directory: str | os.PathLike[str], config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens a template sees (tokenizer_config.json, then special_tokens_map.json)."""
    found: dict[str, str] = {}
    sources: list[Mapping[str, Any]] = [config]
    path = Path(directory) / "special_tokens_map.json"
    if path.is_file():
        sources.append(orjson.loads(path.read_bytes()))
    for source in sources:
        for name in SPECIAL_TOKEN_NAMES:
            value = source.get(name)
            if isinstance(value, Mapping):
                value = value.get("content")
            if isinstance(value, str) and name not in found:
                found[name] = value
    return found


# ---- the template --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Compiled:
    template: Any  # jinja2.Template
    source: str
    content_format: ContentFormat
    knows_developer: bool


class ChatTemplate:
    """A tokenizer's chat template(s), compiled once; `render_request` turns a request body into text."""

    def __init__(self, source: str | Mapping[str, str], special: Mapping[str, str] | None = None) -> None:
        env = _environment()
        sources = {"default": source} if isinstance(source, str) else dict(source)
        self._named = {name: _compile(env, text) for name, text in sources.items()}
        self._special = dict(special or {})

    def content_format(self, tools: bool = False) -> ContentFormat:
        return self._select(tools).content_format

    def _select(self, tools: bool) -> _Compiled:
        named = self._named
        if tools and "tool_use" in named:
            return named["tool_use"]
        if "default" in named:
            return named["default"]
        raise ChatRenderError(
            f"the tokenizer has several chat templates and no default one: {sorted(named)}"
        )

    def render_request(self, body: Mapping[str, Any]) -> str:
        """The prompt text vLLM builds for the chat-completions request `body`. Raises ChatRenderError."""
        if body.get("chat_template") is not None:
            raise ChatRenderError("a request's own chat_template is refused by vLLM by default")
        user_kwargs = body.get("chat_template_kwargs")
        if user_kwargs is None:
            user_kwargs = {}
        elif not isinstance(user_kwargs, Mapping):
            raise ChatRenderError("'chat_template_kwargs' must be an object")
        if user_kwargs.get("chat_template") is not None:
            raise ChatRenderError("a chat_template in chat_template_kwargs is refused by vLLM by default")
        if body.get("continue_final_message") and body.get("add_generation_prompt"):
            raise ChatRenderError("cannot set both continue_final_message and add_generation_prompt")
        kwargs = template_kwargs(body, user_kwargs)
        return self.render(body.get("messages"), **kwargs)

    def render(
        self,
        messages: Any,
        *,
        tools: Any = None,
        documents: Any = None,
        add_generation_prompt: Any = False,
        continue_final_message: Any = False,
        **kwargs: Any,
    ) -> str:
        """`apply_chat_template(conversation(messages), tools, documents, ..., tokenize=False, **kwargs)`."""
        if tools is not None and not isinstance(tools, list):
            raise ChatRenderError("'tools' must be a list")
        compiled = self._select(tools is not None)
        conversation = build_conversation(messages, compiled.content_format)
        if not compiled.knows_developer and any(m["role"] == "developer" for m in conversation):
            conversation = _merge_system(_developer_to_system(conversation))
        if kwargs.get("return_assistant_tokens_mask"):
            raise ChatRenderError("return_assistant_tokens_mask needs tokenize=True and return_dict=True")
        if documents is not None and not (
            isinstance(documents, list) and all(isinstance(d, Mapping) for d in documents)
        ):
            raise ChatRenderError("'documents' must be a list of objects")
        if continue_final_message and add_generation_prompt:
            raise ChatRenderError("continue_final_message and add_generation_prompt are not compatible")
        variables = {**self._special}
        for key, value in kwargs.items():
            if key not in _APPLY_PARAMS:
                variables[key] = value
        if "messages" in variables:
            raise ChatRenderError("'messages' cannot be a chat template kwarg")
        field = None
        if continue_final_message:
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            conversation, final = _tag_final_message(conversation, field, compiled.source)
        try:
            text = compiled.template.render(
                messages=conversation, tools=tools, documents=documents,
                add_generation_prompt=add_generation_prompt, **variables,
            )  # fmt: skip
        except ChatRenderError:
            raise
        except Exception as exc:  # the template's own raise_exception, or any error inside it
            raise ChatRenderError(f"the chat template failed: {exc}") from exc
        if field is not None:
            text = _cut_at_tag(text, final)
        return text


def template_kwargs(body: Mapping[str, Any], user_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments vLLM passes to `apply_chat_template` for a chat-completions `body`.

    ChatCompletionRequest.build_chat_params merges the request's own fields over its
    `chat_template_kwargs`; OnlineRenderer.preprocess_chat puts the normalised `tools` under both (the
    request's kwargs win); values that are null or "auto" are dropped along the way.
    """
    extra: dict[str, Any] = {
        "add_generation_prompt": body.get("add_generation_prompt", True),
        "continue_final_message": body.get("continue_final_message", False),
        "documents": body.get("documents"),
        "reasoning_effort": body.get("reasoning_effort"),
    }
    effort = body.get("reasoning_effort")
    if effort is not None and "enable_thinking" not in user_kwargs:
        extra["enable_thinking"] = effort != "none"
    merged = {**user_kwargs, **{k: v for k, v in extra.items() if not _unset(v)}}
    defaults: dict[str, Any] = {}
    tools = normalise_tools(body.get("tools"))
    if tools is not None:
        defaults["tools"] = tools
    return defaults | {k: v for k, v in merged.items() if not _unset(v)}


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value == "auto")


def normalise_tools(tools: Any) -> list[dict[str, Any]] | None:
    """`tools` as vLLM's `ChatCompletionToolsParam.model_dump()` gives them to the template."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools:
        raise ChatRenderError("'tools' must be a non-empty list")
    out = []
    for tool in tools:
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise ChatRenderError("each tool must be an object of type 'function'")
        fn = tool.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ChatRenderError("each tool needs a 'function' with a string 'name'")
        description, parameters = fn.get("description"), fn.get("parameters")
        if description is not None and not isinstance(description, str):
            raise ChatRenderError("a tool's 'description' must be a string")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ChatRenderError("a tool's 'parameters' must be an object")
        function: dict[str, Any] = {"name": fn["name"], "description": description, "parameters": parameters}
        defer = tool.get("defer_loading")
        for key, value in (("strict", fn.get("strict")), ("defer_loading", fn.get("defer_loading", defer))):
            if value is not None:
                function[key] = value
        dumped: dict[str, Any] = {"type": "function", "function": function}
        if defer is not None:
            dumped["defer_loading"] = defer
        out.append(dumped)
    return out


# ---- messages -> vLLM's conversation --------------------------------------------------------------


def build_conversation(messages: Any, content_format: ContentFormat) -> list[dict[str, Any]]:
    """The conversation vLLM's `parse_chat_messages` builds from OpenAI `messages` (text only)."""
    if not isinstance(messages, list) or not messages:
        raise ChatRenderError("'messages' must be a non-empty list")
    return [_message(m, content_format) for m in messages]


def _message(message: Any, content_format: ContentFormat) -> dict[str, Any]:
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
        raise ChatRenderError("each message must be an object with a string 'role'")
    role = message["role"]
    texts = _texts(message.get("content"), role)
    out: dict[str, Any] = {"role": role}
    if content_format == "openai":
        out["content"] = texts
    else:
        out["content"] = "\n".join(t["text"] for t in texts)
    if role == "assistant":
        calls = message.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise ChatRenderError("'tool_calls' must be a list")
            if calls:
                out["tool_calls"] = [_tool_call(c) for c in calls]
        reasoning = message.get("reasoning")
        if reasoning is not None:
            out["reasoning"] = out["reasoning_content"] = reasoning
    elif role == "tool":
        if "tool_call_id" in message:
            out["tool_call_id"] = message["tool_call_id"]
        if isinstance(out["content"], list):
            out["content"] = "\n".join(t["text"] for t in out["content"])
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    if isinstance(message.get("task"), str):
        out["task"] = message["task"]
    if role == "developer":
        out["tools"] = message.get("tools")
    return out


def _texts(content: Any, role: str) -> list[dict[str, Any]]:
    """A message's text parts as `{"type": "text", "text": ...}` (extra part fields kept)."""
    if content is None:
        return []
    if isinstance(content, str):
        parts: list[Any] = [content]
    elif isinstance(content, list):
        parts = content
    else:
        raise ChatRenderError("message content must be a string or a list of content parts")
    out = []
    for part in parts:
        if isinstance(part, str):
            text, extra = part, {}
        elif isinstance(part, Mapping):
            kind = part.get("type")
            field = _TEXT_PARTS.get(kind) if isinstance(kind, str) else None
            if field is None or part.get("uuid") is not None:
                raise ChatRenderError(f"content part of type {kind!r} cannot be keyed (not text)")
            text = part.get(field)
            if text is None and kind in _SKIP_WHEN_EMPTY:
                continue
            if not isinstance(text, str):
                raise ChatRenderError(f"a {kind!r} content part must carry a string {field!r}")
            extra = {k: v for k, v in part.items() if k not in _KNOWN_PART_FIELDS}
        else:
            raise ChatRenderError("a content part must be a string or an object")
        if role == "system" and text.startswith(_BILLING_HEADER):
            text = text.partition("\n")[2]
            if not text:
                continue
        out.append({"type": "text", "text": text, **extra})
    return out


def _tool_call(call: Any) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise ChatRenderError("assistant tool_calls entries must be objects")
    fn = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(fn, Mapping):
        raise ChatRenderError("assistant tool_calls must be of type 'function'")
    return {**call, "function": {**fn, "arguments": _arguments(fn.get("arguments"))}}


def _arguments(value: Any) -> Any:
    """Tool-call arguments as templates expect them: an object (vLLM parses the JSON string)."""
    if not value:
        return {}
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}
    return value if isinstance(value, dict) else {}


def _developer_to_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in conversation:
        if m["role"] == "developer":
            m = {k: v for k, v in m.items() if k != "tools"}
            m["role"] = "system"
        out.append(m)
    return out


def _merge_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """System messages merged into one at the front (separated by blank lines) when not already so."""
    texts: list[str] = []
    rest: list[dict[str, Any]] = []
    merge = False
    for i, m in enumerate(conversation):
        if m["role"] != "system":
            rest.append(m)
            continue
        merge = merge or i > 0 or bool(texts)
        content = m.get("content", "")
        if isinstance(content, list):
            content = "\n".join(p["text"] for p in content if isinstance(p, Mapping) and "text" in p)
        if content:
            texts.append(content)
    if not merge:
        return conversation
    return [{"role": "system", "content": "\n\n".join(texts)}, *rest]


def _tag_final_message(
    conversation: list[dict[str, Any]], field: str, source: str
) -> tuple[list[dict[str, Any]], str]:
    """A copy of the conversation with transformers' continuation tag after the final message's text."""
    last = dict(conversation[-1])
    value = last.get(field)
    if value is None:
        raise ChatRenderError(f"continue_final_message is set but the final message has no {field!r}")
    if field not in source:
        raise ChatRenderError(f"continue_final_message names {field!r}, which the chat template never uses")
    if isinstance(value, list):
        parts = [dict(p) if isinstance(p, Mapping) else p for p in value]
        for part in reversed(parts):
            if isinstance(part, dict) and "text" in part:
                final = part["text"]
                part["text"] = final + _CONTINUE_TAG
                break
        else:
            raise ChatRenderError("continue_final_message is set but the final message has no text")
        last[field] = parts
    elif isinstance(value, str):
        final = value
        last[field] = value + _CONTINUE_TAG
    else:
        raise ChatRenderError("continue_final_message needs a text final message")
    return [*conversation[:-1], last], final


def _cut_at_tag(text: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise ChatRenderError("continue_final_message is set but the template dropped the final message")
    at = text.rindex(tag)
    if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()


# ---- jinja2 ----------------------------------------------------------------------------------------


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson`: json.dumps without HTML escaping (jinja2's own filter escapes)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _environment() -> Any:
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers marks assistant spans)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _compile(env: Any, source: str) -> _Compiled:
    if not isinstance(source, str):
        raise ValueError("a chat template must be a string")
    try:
        template = env.from_string(source)
        tree = env.parse(source)
    except Exception as exc:
        raise ValueError(f"the chat template does not compile: {exc}") from exc
    knows_developer = '"developer"' in source or "'developer'" in source
    return _Compiled(template, source, detect_content_format(tree), knows_developer)


def detect_content_format(tree: Any) -> ContentFormat:
    """"openai" when the template iterates over a message's content, else "string" (as vLLM detects).

    A message is a loop variable over `messages` (or a name assigned from it, sliced or filtered);
    content is iterated when a loop runs over `<message>.content` / `<message>['content']`, over a macro
    parameter that a call fills with it, or over a variable named `content` outside macros.
    """
    from jinja2 import nodes

    def base(node: Any) -> Any:
        while True:
            if isinstance(node, nodes.Filter | nodes.Test) and node.node is not None:
                node = node.node
            elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
                node = node.node
            else:
                return node

    def is_name(node: Any, names: set[str]) -> bool:
        node = base(node)
        return isinstance(node, nodes.Name) and node.ctx == "load" and node.name in names

    def is_content_of(node: Any, names: set[str]) -> bool:
        node = base(node)
        if isinstance(node, nodes.Getattr):
            key = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            key = node.arg.value
        else:
            return False
        inner = node.node
        return key == "content" and isinstance(inner, nodes.Name) and inner.ctx == "load" \
            and inner.name in names

    lists = _aliases(tree, "messages", base)
    loops = list(tree.find_all(nodes.For))
    message_vars = {
        loop.target.name
        for loop in loops
        if isinstance(loop.target, nodes.Name) and is_name(loop.iter, lists)
    }
    macro_loops: dict[int, set[str]] = {}
    for macro in tree.find_all(nodes.Macro):
        params = [a.name for a in macro.args]
        bound: set[str] = set()
        for call in tree.find_all(nodes.Call):
            if isinstance(call.node, nodes.Name) and call.node.name == macro.name:
                for i, arg in enumerate(call.args):
                    if i < len(params) and is_content_of(arg, message_vars):
                        bound.add(params[i])
                for kw in call.kwargs:
                    if kw.key in params and is_content_of(kw.value, message_vars):
                        bound.add(kw.key)
        for loop in macro.find_all(nodes.For):
            macro_loops[id(loop)] = bound
    for loop in loops:
        if is_content_of(loop.iter, message_vars):
            return "openai"
        bound = macro_loops.get(id(loop))
        if isinstance(loop.iter, nodes.Name):
            if bound and loop.iter.name in bound:
                return "openai"
            if bound is None and loop.iter.name == "content":
                return "openai"
    return "string"


def _aliases(tree: Any, name: str, base: Any) -> set[str]:
    """`name` and every variable assigned from it (transitively), e.g. `{% set msgs = messages[1:] %}`."""
    from jinja2 import nodes

    names = {name}
    changed = True
    assigns = list(tree.find_all(nodes.Assign))
    while changed:
        changed = False
        for assign in assigns:
            rhs = base(assign.node)
            if (isinstance(assign.target, nodes.Name) and isinstance(rhs, nodes.Name)
                    and rhs.name in names and assign.target.name not in names):
                names.add(assign.target.name)
                changed = True
    return names
