"""Tokenizer: a checkpoint's tokenizer.json, chat template and stop ids, without transformers.

`Tokenizer.from_dir` reads the files a Hugging Face checkpoint ships (tokenizer.json,
tokenizer_config.json, chat_template.jinja, generation_config.json) and renders chat templates the way
`transformers` 5.x does: same Jinja2 sandbox and options, same `tojson`, same message clean-up (keys
whose value is None dropped, reasoning fields aliased), same template variables (every named special
token). `IncrementalDecoder` turns a stream of token ids into text deltas for streaming output.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
GENERATION_CONFIG_FILE = "generation_config.json"

# transformers' SPECIAL_TOKENS_ATTRIBUTES; any other `*_token` key of tokenizer_config.json is a
# "model-specific" named token (image_token, ...) and, like these, becomes a template variable.
STANDARD_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
GENERATION_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# Names a message's reasoning may arrive under; templates read the first.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
REPLACEMENT_CHAR = "\ufffd"


class ChatTemplateError(ValueError):
    """A chat template refused the conversation (raise_exception) or failed to compile or render."""


class Tokenizer:
    """Text <-> token ids, chat-template rendering and stop ids of one checkpoint."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        eos_token_ids: Sequence[int] = (),
        bos_token_id: int | None = None,
        pad_token_id: int | None = None,
        generation_defaults: Mapping[str, float | int] | None = None,
    ) -> None:
        self._backend = backend
        # Named special tokens by attribute name (eos_token -> "<|im_end|>"); templates see all of them.
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_token_ids))
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id
        self.generation_defaults: dict[str, float | int] = dict(generation_defaults or {})

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist or is not a directory")
        tokenizer_file = directory / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{TOKENIZER_FILE} not found in {str(directory)!r}: hybridlm needs the fast-tokenizer file"
            )
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the tokenizers library raises plain Exception on a malformed file
            raise ValueError(f"{tokenizer_file} could not be loaded by the tokenizers library: {error}") from error
        # transformers encodes without truncation or padding unless asked; tokenizer.json may enable either.
        backend.no_truncation()
        backend.no_padding()

        config = _read_json(directory / TOKENIZER_CONFIG_FILE)
        special_tokens = _named_special_tokens(config)
        _add_missing_tokens(backend, config, special_tokens)

        generation = _read_json(directory / GENERATION_CONFIG_FILE)
        eos_ids = _token_id_list(generation.get("eos_token_id"), GENERATION_CONFIG_FILE)
        token_ids = {name: backend.token_to_id(content) for name, content in special_tokens.items()}
        if token_ids.get("eos_token") is not None:
            eos_ids.append(token_ids["eos_token"])

        def config_or_generation_id(name: str) -> int | None:
            if token_ids.get(name) is not None:
                return token_ids[name]
            ids = _token_id_list(generation.get(f"{name}_id"), GENERATION_CONFIG_FILE)
            return ids[0] if ids else None

        return cls(
            backend,
            special_tokens=special_tokens,
            chat_templates=_read_chat_templates(directory, config),
            eos_token_ids=eos_ids,
            bos_token_id=config_or_generation_id("bos_token"),
            pad_token_id=config_or_generation_id("pad_token"),
            generation_defaults={k: generation[k] for k in GENERATION_DEFAULT_FIELDS if generation.get(k) is not None},
        )

    # ---------------------------------------------------------------- text <-> ids
    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> BackendTokenizer:
        return self._backend

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # operator.index accepts numpy/torch integer scalars but rejects floats instead of truncating them.
        id_list = list(map(operator.index, ids))
        if id_list and (min(id_list) < 0 or max(id_list) >= self.vocab_size):
            bad = next(i for i in id_list if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return self._backend.decode(id_list, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_templates)

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **template_kwargs: Any,
    ) -> str:
        template = _compile_template(self._select_template(tools))
        messages = _prepare_messages(messages)
        if tools is not None:
            for index, tool in enumerate(tools):
                if not isinstance(tool, Mapping):
                    raise ValueError(f"tools[{index}] must be a dict (a JSON schema), got {type(tool).__name__}")
        if enable_thinking is not None:
            # Only when given: templates test `enable_thinking is defined`, so None must stay undefined.
            template_kwargs["enable_thinking"] = enable_thinking
        template_kwargs.setdefault("documents", None)  # transformers always defines it
        # Caller's variables win over same-named special tokens (eos_token=... overrides), as in transformers.
        variables = _plain_template_data({**self.special_tokens, **template_kwargs})
        try:
            return template.render(
                messages=messages,
                tools=_plain_template_data(tools),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"chat template failed to render: {error}") from error

    def encode_chat(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        text = self.apply_chat_template(messages, tools, add_generation_prompt, enable_thinking, **template_kwargs)
        return self.encode(text)

    def _select_template(self, tools: list[dict] | None) -> str:
        # Same choice as transformers' get_chat_template for checkpoints with named templates.
        if not self.chat_templates:
            raise ValueError(
                "this checkpoint has no chat template (no chat_template.jinja and no chat_template in "
                f"{TOKENIZER_CONFIG_FILE}); format the prompt yourself and use encode()"
            )
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        raise ValueError(f"this checkpoint has chat templates {sorted(self.chat_templates)} but none named 'default'")


class IncrementalDecoder:
    """Token ids in, text deltas out, never splitting a UTF-8 character.

    Byte-level BPE can spread one character's bytes over several tokens; until the last byte arrives
    the decoded text ends in U+FFFD, so that text is held back. Each push decodes only a short window:
    the tokens of the last emitted delta (context, so decoders that strip a leading space see the same
    prefix) plus the held tokens.
    """

    # An incomplete character is at most 3 bytes, so with every token carrying at least one byte it
    # sits in the last 3 tokens; a window still ending in U+FFFD after more held tokens than this
    # holds real U+FFFD characters (or invalid bytes) and is released up to those last 3 tokens.
    MAX_HELD_TOKENS = 8
    PARTIAL_CHAR_TOKENS = 3

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # context tokens [0, _read), then held tokens [_read, end)
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, self.skip_special_tokens) if ids else ""

    def push(self, token_id: int) -> str:
        token_id = operator.index(token_id)
        if token_id < 0:
            raise ValueError(f"token id {token_id} is negative")
        if token_id >= self._tokenizer.vocab_size:
            # Checkpoints pad the embedding past the tokenizer (Qwen3.5: 248320 rows, ~248k tokens); a
            # padding id has no text, so it adds nothing rather than failing the whole stream.
            return ""
        self._ids.append(token_id)
        context = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if not text.endswith(REPLACEMENT_CHAR):
            cut = len(self._ids)
        elif len(self._ids) - self._read > self.MAX_HELD_TOKENS:
            cut = len(self._ids) - self.PARTIAL_CHAR_TOKENS
            text = self._decode(self._ids[:cut])
        else:
            return ""
        # Tokens up to `cut` are emitted: those since the old context become the new context, and
        # everything before them is dropped, which keeps the window short.
        self._ids, self._read = self._ids[self._read :], cut - self._read
        return text[len(context) :]

    def flush(self) -> str:
        context = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        self._ids, self._read = [], 0
        return text[len(context) :]


# -------------------------------------------------------------------- file parsing
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, key: str) -> str | None:
    """A special token entry is a string or a serialised AddedToken dict with "content"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{TOKENIZER_CONFIG_FILE}: {key} must be a string or a dict with 'content', got {value!r}")


def _named_special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for key, value in config.items():
        # Like transformers, a non-standard `*_token` key counts only when its value is a plain string.
        if key in STANDARD_SPECIAL_TOKENS or (key.endswith("_token") and isinstance(value, str)):
            content = _token_content(value, key)
            if content is not None:
                tokens[key] = content
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):  # the dict form names its tokens, so they are template variables too
        for key, value in extra.items():
            content = _token_content(value, f"extra_special_tokens.{key}")
            if content is not None:
                tokens[key] = content
    return tokens


def _add_missing_tokens(backend: BackendTokenizer, config: Mapping[str, Any], special: Mapping[str, str]) -> None:
    """Add tokens the config declares but tokenizer.json lacks, as transformers does on load."""
    declared = config.get("added_tokens_decoder") or {}
    if not isinstance(declared, Mapping):
        raise ValueError(f"{TOKENIZER_CONFIG_FILE}: added_tokens_decoder must map ids to tokens")
    for index, entry in sorted(declared.items(), key=lambda item: int(item[0])):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("content"), str):
            raise ValueError(f"{TOKENIZER_CONFIG_FILE}: added_tokens_decoder[{index}] needs a string 'content'")
        if backend.token_to_id(entry["content"]) is not None:
            continue
        flags = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
        backend.add_tokens([AddedToken(entry["content"], **flags)])
        if backend.token_to_id(entry["content"]) != int(index):
            raise ValueError(
                f"{TOKENIZER_CONFIG_FILE}: added token {entry['content']!r} should have id {index} but the "
                f"vocabulary gives it {backend.token_to_id(entry['content'])}"
            )
    extra = config.get("extra_special_tokens")
    extra_list = [_token_content(t, "extra_special_tokens") for t in extra] if isinstance(extra, list) else []
    for content in [*special.values(), *extra_list]:
        if content is not None and backend.token_to_id(content) is None:
            backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])


def _token_id_list(value: Any, source: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{source}: token ids must be non-negative ints or a list of them, got {value!r}")
    return list(values)


def _read_chat_templates(directory: Path, config: Mapping[str, Any]) -> dict[str, str]:
    # Template files replace whatever tokenizer_config.json holds inline, as in transformers.
    templates: dict[str, str] = {}
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (directory / CHAT_TEMPLATE_DIR).is_dir():
        for file in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:
        return templates
    inline = config.get("chat_template")
    if inline is None:
        return {}
    if isinstance(inline, str):
        return {"default": inline}
    if isinstance(inline, list) and all(
        isinstance(t, Mapping) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in inline
    ):
        return {t["name"]: t["template"] for t in inline}
    raise ValueError(f"{TOKENIZER_CONFIG_FILE}: chat_template must be a string or a list of {{name, template}} dicts")


# -------------------------------------------------------------------- chat-template rendering
def _prepare_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate, then normalise the way transformers does before rendering."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    prepared = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{index}] needs a string 'role', got {message.get('role')!r}")
        # APIs send content=None / tool_calls=None; templates handle a missing key but may print "None".
        message = _plain_template_data({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            # Key order matters to templates that iterate a message: same order as transformers.
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def _plain_template_data(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types: the sandbox can't vet arbitrary objects' methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, ...) carry extra methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers some templates carry) renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore attributes, closing a route to Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: `self` may be a kwarg name
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates without handing them the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, ') and forces ASCII; templates expect neither.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    env.globals["dict"] = _TemplateDict()
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"chat template does not compile (line {error.lineno}): {error.message}") from error
