"""Streaming, fail-soft parsing of a chat model's raw output into reasoning, content and tool calls.

Feed text deltas as they are decoded; each `feed` returns what can be said for sure so far, holding back
only a possible half-written tag. One scanner handles both kinds of markup, so a tool call inside or
after a `<think>` block is found either way:

- `<think>` ... `</think>`: reasoning (the prompt may already have opened the block: `start_in_reasoning`).
- `<tool_call>` ... `</tool_call>` holding Qwen3.5's XML form
  (`<function=NAME><parameter=KEY>VALUE</parameter></function>`, several functions allowed) or the older
  JSON form (`{"name": ..., "arguments": {...}}`). A bare `<function=...>` without the wrapper counts too.

XML calls stream: the name as soon as `<function=NAME>` is complete, then one JSON fragment per parameter,
so the concatenated `arguments` is valid JSON once the call closes. Values are coerced to the types of the
tool's JSON schema. Nothing here raises on model output: a block that is not a call comes back as text, a
truncated call is closed with the parameters it completed, and each repair leaves a line in `warnings`.

Newlines are trimmed where the chat template adds them (after `<think>`, around `</think>`, before a call),
the same way whether the text comes in one piece or one character at a time.
"""
from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter=", "</parameter>"
# the tags an XML call body may contain; text that could be the start of one is held back
_CALL_TAGS = (CALL_OPEN, CALL_CLOSE, FUNCTION_OPEN, FUNCTION_CLOSE, PARAMETER_OPEN, PARAMETER_CLOSE)


@dataclass
class ToolCallDelta:
    """One piece of a streamed tool call: the first carries id and name, later ones argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __iadd__(self, other: ParsedDelta) -> ParsedDelta:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls
        return self

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------------------------ coercion
def _schema_types(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return [t for sub in schema[key] for t in _schema_types(sub)]
    if "enum" in schema and isinstance(schema["enum"], list):
        return sorted({_json_type(v) for v in schema["enum"]})
    return []


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string"


_INTEGER = re.compile(r"[+-]?\d+")


def _convert(text: str, kind: str) -> tuple[bool, Any]:
    value = text.strip()
    if kind == "string":
        return True, text
    if kind == "null":
        return value.lower() in ("null", "none"), None
    if kind == "boolean":
        if value.lower() in ("true", "false"):
            return True, value.lower() == "true"
        return False, None
    if kind in ("integer", "number"):
        if _INTEGER.fullmatch(value):
            return True, int(value)
        try:
            number = float(value)
        except ValueError:
            return False, None
        if kind == "integer":
            return number.is_integer(), int(number) if number.is_integer() else None
        return True, number
    if kind in ("object", "array"):
        wanted = dict if kind == "object" else list
        for parse in (json.loads, ast.literal_eval):  # literal_eval: Python-style {'a': True} from models
            try:
                parsed = parse(value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(parsed, wanted):
                return True, parsed
        return False, None
    return False, None


def coerce_value(text: str, schema: Any) -> tuple[Any, str | None]:
    """A parameter's text as the schema's type: (value, warning or None). Without a schema, or when no
    declared type fits, the text stays a string."""
    kinds = _schema_types(schema)
    if not kinds:
        return text, None
    # null first (the literal text "null"), string last (it always fits), the declared order otherwise
    ordered = sorted(kinds, key=lambda k: {"null": 0, "string": 2}.get(k, 1))
    for kind in ordered:
        ok, value = _convert(text, kind)
        if ok:
            return value, None
    return text, f"value {text[:60]!r} does not fit the schema type {'/'.join(kinds)}; kept as a string"


def coerce_arguments(arguments: dict[str, Any], schema: Any) -> tuple[dict[str, Any], list[str]]:
    """JSON-form arguments: string values coerced where the schema declares another type."""
    properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
    result, warnings = {}, []
    for key, value in arguments.items():
        prop = properties.get(key) if isinstance(properties, dict) else None
        if isinstance(value, str) and "string" not in _schema_types(prop):
            value, warning = coerce_value(value, prop)
            if warning:
                warnings.append(f"parameter {key!r}: {warning}")
        result[key] = value
    return result, warnings


def tool_schemas(tools: list[dict] | None) -> dict[str, dict]:
    """{function name: parameters schema} from an OpenAI `tools` list."""
    schemas = {}
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            parameters = function.get("parameters")
            schemas[function["name"]] = parameters if isinstance(parameters, dict) else {}
    return schemas


# ------------------------------------------------------------------------------------------------ helpers
def _held_tag_start(text: str, tags: tuple[str, ...]) -> int:
    """Index from which `text` may be the beginning of one of `tags` (len(text) when it cannot)."""
    start = text.rfind("<")
    if start >= 0 and any(tag.startswith(text[start:]) for tag in tags if len(text) - start < len(tag)):
        return start
    return len(text)


def _first_tag(text: str, tags: tuple[str, ...]) -> tuple[int, str | None]:
    best, found = len(text), None
    for tag in tags:
        i = text.find(tag)
        if 0 <= i < best:
            best, found = i, tag
    return best, found


def _trim_value(value: str) -> str:
    # Qwen's template writes "<parameter=k>\nVALUE\n</parameter>": one newline each side is markup
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


# ------------------------------------------------------------------------------------------------ the call
@dataclass
class _Call:
    """A `<tool_call>` block being read. `body` is the text after the opening tag not yet consumed."""

    raw: str  # everything since the opening tag, for the fail-soft fallback to text
    body: str = ""
    form: str | None = None  # "xml", "json" or "text" (not a call)
    wrapped: bool = True  # opened by <tool_call> (False: a bare <function=...>)
    index: int | None = None  # output index of the XML function being read
    skipping: bool = False  # inside a function dropped because parallel_tool_calls is false
    num_params: int = 0
    param: str | None = None  # name of the parameter whose value is being read
    emitted: bool = False  # some function of this block reached the client

    @property
    def in_function(self) -> bool:
        return self.index is not None or self.skipping


class OutputParser:
    """Raw model text in, ParsedDelta out. `calls` holds every completed call, `warnings` each repair."""

    def __init__(
        self,
        tools: list[dict] | None = None,
        parse_tools: bool = True,
        start_in_reasoning: bool = False,
        max_calls: int | None = None,
    ) -> None:
        self.schemas = tool_schemas(tools)
        self.parse_tools = parse_tools
        self.max_calls = max_calls
        self.in_reasoning = start_in_reasoning
        self.calls: list[ToolCall] = []
        self.warnings: list[str] = []
        self._buffer = ""
        self._call: _Call | None = None
        self._out = ParsedDelta()
        # per channel: pending trailing newlines, and whether any text was written since the last boundary
        self._pending = {"content": "", "reasoning": ""}
        self._started = {"content": False, "reasoning": False}
        markers = [THINK_OPEN, THINK_CLOSE]
        if parse_tools:
            markers += [CALL_OPEN, CALL_CLOSE, FUNCTION_OPEN, FUNCTION_CLOSE, PARAMETER_CLOSE]
        self._markers = tuple(markers)

    # ---- public ----------------------------------------------------------------------------------------
    def feed(self, text: str) -> ParsedDelta:
        self._buffer += text
        self._scan(final=False)
        return self._take()

    def finish(self) -> ParsedDelta:
        """End of output: release held text and close (or give back as text) an unfinished call."""
        self._scan(final=True)
        if self._call is not None:
            self._end_truncated_call()
        if self._buffer:
            self._emit(self._buffer)
            self._buffer = ""
        return self._take()

    @property
    def channel(self) -> str:
        return "reasoning" if self.in_reasoning else "content"

    # ---- text channels ---------------------------------------------------------------------------------
    def _take(self) -> ParsedDelta:
        out, self._out = self._out, ParsedDelta()
        return out

    def _emit(self, text: str) -> None:
        channel = self.channel
        text = self._pending[channel] + text
        if not self._started[channel]:
            text = text.lstrip("\n")
        body = text.rstrip("\n")
        self._pending[channel] = text[len(body):]
        if body:
            self._started[channel] = True
            if channel == "content":
                self._out.content += body
            else:
                self._out.reasoning += body

    # ---- scanning --------------------------------------------------------------------------------------
    def _scan(self, final: bool) -> None:
        while True:
            if self._call is not None:
                if not self._advance_call(final):
                    return
                continue
            i, marker = _first_tag(self._buffer, self._markers)
            if marker is None:
                keep = len(self._buffer) if final else _held_tag_start(self._buffer, self._markers)
                self._emit(self._buffer[:keep])
                self._buffer = self._buffer[keep:]
                return
            self._emit(self._buffer[:i])
            self._buffer = self._buffer[i + len(marker):]
            if marker == THINK_OPEN:
                self.in_reasoning = True
                self._pending["reasoning"], self._started["reasoning"] = "", False
            elif marker == THINK_CLOSE:
                if not self.in_reasoning:
                    self.warnings.append("dropped a </think> outside a think block")
                self.in_reasoning = False
                self._pending["reasoning"] = ""
            elif marker == CALL_OPEN:
                self._call = _Call(raw=CALL_OPEN)
            elif marker == FUNCTION_OPEN:  # a call without its <tool_call> wrapper
                self._call = _Call(raw="", form="xml", wrapped=False)
                self._buffer = FUNCTION_OPEN + self._buffer
            else:  # a closing tag with no call open: markup debris, not content
                self.warnings.append(f"dropped a stray {marker}")

    def _advance_call(self, final: bool) -> bool:
        """Move the buffer into the open call; False when more text is needed."""
        call = self._call
        if self._buffer:
            call.body += self._buffer
            call.raw += self._buffer
            self._buffer = ""
        if call.form is None:
            head = call.body.lstrip()
            if head.startswith("{"):
                call.form = "json"
            elif head.startswith(FUNCTION_OPEN):
                call.form = "xml"
                call.body = head
            elif not final and (not head or FUNCTION_OPEN.startswith(head)):
                return False
            else:
                call.form = "text"
        if call.form == "xml":
            return self._advance_xml(final)
        return self._advance_block(final)

    def _close_call(self, rest: str) -> bool:
        """The call block ended; `rest` (text after it) goes back to the scanner."""
        self._call = None
        self._buffer = rest + self._buffer
        # the newlines a template writes around a call are markup, not content
        self._pending[self.channel] = ""
        return True

    # ---- JSON form, and blocks that are no call at all -------------------------------------------------
    def _advance_block(self, final: bool) -> bool:
        call = self._call
        end, tag = _first_tag(call.body, (CALL_CLOSE, CALL_OPEN))
        if tag is None and not final:
            return False
        body, rest = call.body[:end], call.body[end + len(CALL_CLOSE):] if tag == CALL_CLOSE else call.body[end:]
        if tag is None:
            self.warnings.append("tool call cut off before </tool_call>")
        elif tag == CALL_OPEN:
            self.warnings.append("tool call not closed before the next <tool_call>")
        if call.form == "json" and self._json_calls(body):  # a complete object before eos counts too
            return self._close_call(rest)
        self.warnings.append(f"not a valid tool call, returned as text: {call.raw[:80]!r}")
        raw = call.raw[: len(call.raw) - len(rest)] if rest else call.raw
        self._call = None
        self._emit(raw)
        self._buffer = rest + self._buffer
        return True

    def _json_calls(self, body: str) -> bool:
        """Parse one or more JSON objects; emit each as a call. False (nothing emitted) if any is bad."""
        decoder, parsed, text = json.JSONDecoder(), [], body.strip()
        while text:
            try:
                obj, end = decoder.raw_decode(text)
            except json.JSONDecodeError:
                try:  # models sometimes write Python literals (single quotes, True)
                    obj, end = ast.literal_eval(text), len(text)
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    return False
            name = obj.get("name") if isinstance(obj, dict) else None
            arguments = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError:
                    return False
            if not isinstance(name, str) or not name or not isinstance(arguments, dict):
                return False
            parsed.append((name, arguments))
            text = text[end:].lstrip().lstrip(",;").lstrip()
            if text.startswith("}"):  # a stray closing brace after a complete object
                self.warnings.append("ignored a stray '}' after a JSON tool call")
                text = text[1:].lstrip()
        if not parsed:
            return False
        for name, arguments in parsed:
            arguments, warnings = coerce_arguments(arguments, self.schemas.get(name))
            self.warnings += [f"{name}: {w}" for w in warnings]
            index = self._new_call(name)
            if index is not None:
                self._add_arguments(index, json.dumps(arguments, ensure_ascii=False))
        return True

    # ---- XML form ----------------------------------------------------------------------------------------
    def _advance_xml(self, final: bool) -> bool:
        call = self._call
        while True:
            if call.param is not None:  # a value ends at </parameter> (or, leniently, at the next tag)
                end, tag = _first_tag(call.body, (PARAMETER_CLOSE, PARAMETER_OPEN, FUNCTION_CLOSE, CALL_CLOSE, CALL_OPEN))
                if tag is None:
                    return False
                if tag != PARAMETER_CLOSE:
                    self.warnings.append(f"parameter {call.param!r} not closed before {tag}")
                self._add_parameter(call, call.param, _trim_value(call.body[:end]))
                call.param = None
                call.body = call.body[end + len(PARAMETER_CLOSE):] if tag == PARAMETER_CLOSE else call.body[end:]
                continue
            body = call.body.lstrip()
            if not body:
                call.body = ""
                return False
            tag = next((t for t in _CALL_TAGS if body.startswith(t)), None)
            if tag is None:
                if not final and _held_tag_start(body, _CALL_TAGS) == 0:
                    return False  # a tag still being written
                if not call.in_function:  # text after </function>: the model left out </tool_call>
                    if call.wrapped:
                        self.warnings.append("tool call not closed with </tool_call>")
                    return self._close_call(call.body)
                cut = body.find("<", 1) if body.startswith("<") else body.find("<")
                cut = len(body) if cut < 0 else cut
                self.warnings.append(f"ignored text inside a tool call: {body[:cut][:60]!r}")
                call.body = body[cut:]
                continue
            if tag in (FUNCTION_OPEN, PARAMETER_OPEN):
                close = body.find(">")
                if close < 0:
                    return False
                name, call.body = body[len(tag):close].strip(), body[close + 1:]
                if tag == PARAMETER_OPEN:
                    if not call.in_function:
                        self.warnings.append(f"parameter {name!r} outside a function; ignored")
                    call.param = name
                    continue
                if call.in_function:
                    self.warnings.append("function not closed before the next <function=")
                    self._end_function(call)
                if not name or "<" in name or "\n" in name:
                    if call.emitted:
                        self.warnings.append(f"ignored a function with the bad name {name!r}")
                        call.skipping = True
                        continue
                    call.form = "text"  # nothing sent yet: the whole block goes back as text
                    return self._advance_block(final)
                self._start_function(call, name)
                continue
            call.body = body[len(tag):]
            if tag == FUNCTION_CLOSE:
                if call.in_function:
                    self._end_function(call)
                else:
                    self.warnings.append("dropped a stray </function>")
                if not call.wrapped:
                    return self._close_call(call.body)
            elif tag == PARAMETER_CLOSE:
                self.warnings.append("dropped a stray </parameter>")
            elif tag == CALL_CLOSE:
                if call.in_function:
                    self.warnings.append("function not closed before </tool_call>")
                    self._end_function(call)
                return self._close_call(call.body)
            else:  # CALL_OPEN: this block was never closed
                self.warnings.append("tool call not closed before the next <tool_call>")
                if call.in_function:
                    self._end_function(call)
                return self._close_call(CALL_OPEN + call.body)

    def _end_truncated_call(self) -> None:
        call = self._call
        if call.form == "xml" and call.emitted:
            if call.param is not None:
                self.warnings.append(f"parameter {call.param!r} cut off; dropped")
            if call.in_function:
                self.warnings.append("tool call cut off; closed with the parameters it completed")
                self._end_function(call)
            self._call = None
            return
        self.warnings.append(f"unfinished tool call returned as text: {call.raw[:80]!r}")
        self._call = None
        self._emit(call.raw)

    # ---- emitting calls ----------------------------------------------------------------------------------
    def _new_call(self, name: str) -> int | None:
        """Announce a call (id and name); None when parallel_tool_calls=false already allowed one."""
        if self.max_calls is not None and len(self.calls) >= self.max_calls:
            self.warnings.append(f"dropped a call to {name!r}: parallel_tool_calls is false")
            return None
        if self.schemas and name not in self.schemas:
            self.warnings.append(f"model called {name!r}, which is not among the request's tools")
        self.calls.append(ToolCall(id=new_call_id(), name=name, arguments=""))
        index = len(self.calls) - 1
        self._out.tool_calls.append(ToolCallDelta(index=index, id=self.calls[index].id, name=name))
        return index

    def _add_arguments(self, index: int, text: str) -> None:
        self.calls[index].arguments += text
        last = self._out.tool_calls[-1] if self._out.tool_calls else None
        if last is not None and last.index == index:
            last.arguments += text
        else:
            self._out.tool_calls.append(ToolCallDelta(index=index, arguments=text))

    def _start_function(self, call: _Call, name: str) -> None:
        call.index = self._new_call(name)
        call.skipping = call.index is None
        call.emitted = True  # a dropped call counts: the block was a call, not text
        call.num_params = 0

    def _add_parameter(self, call: _Call, key: str, text: str) -> None:
        if call.index is None:
            return
        name = self.calls[call.index].name
        properties = self.schemas.get(name, {}).get("properties")
        value, warning = coerce_value(text, properties.get(key) if isinstance(properties, dict) else None)
        if warning:
            self.warnings.append(f"{name}.{key}: {warning}")
        separator = "{" if call.num_params == 0 else ", "
        self._add_arguments(call.index, f"{separator}{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
        call.num_params += 1

    def _end_function(self, call: _Call) -> None:
        if call.index is not None:
            self._add_arguments(call.index, "}" if call.num_params else "{}")
        call.index, call.skipping, call.num_params = None, False, 0
