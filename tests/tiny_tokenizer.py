"""A tiny Qwen-style byte-level BPE checkpoint tokenizer, built in a few milliseconds for tests.

The real Qwen3.5 tokenizer is 150k tokens and not available offline; this one has the same shape
(byte-level BPE with a GPT-4-style split regex, NFC normaliser, ChatML special tokens, a chat template
with tools and thinking) so `hybridlm.io.tokenizer` can be checked against transformers on it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# (content, special): special ones are skipped by decode(skip_special_tokens=True); the rest are
# plain added tokens, as in Qwen's own tokenizer.json.
QWEN_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
]

# The GPT-4-style pre-tokenisation split that Qwen2+ tokenizers use: contractions, letter runs,
# single digits, punctuation runs, newlines, whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Our own ChatML-style template for these tests (not Qwen's text). Tool-call arguments must be a
# mapping; a JSON string is rejected through raise_exception so tests can exercise that path.
TINY_CHAT_TEMPLATE = """\
{%- if tools %}
<|im_start|>system
{% if messages and messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}
You may call these tools:
<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools>
To call a tool, answer with:
<tool_call>
<function=NAME>
<parameter=KEY>
VALUE
</parameter>
</function>
</tool_call><|im_end|>
{% elif messages and messages[0].role == 'system' %}
<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if loop.first and message.role == 'system' %}
{%- continue %}
{%- endif %}
{%- if message.role == 'tool' %}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' %}
<|im_start|>assistant
{% if message.reasoning_content is defined and message.reasoning_content %}
<think>
{{ message.reasoning_content }}
</think>

{% endif %}
{{- message.content if message.content is defined else '' }}
{%- if message.tool_calls is defined %}
{%- for tool_call in message.tool_calls %}
{%- set call = tool_call.function if tool_call.function is defined else tool_call %}
{%- if call.arguments is not mapping %}
{{- raise_exception('tool call arguments must be a mapping, not ' ~ (call.arguments | string)) }}
{%- endif %}
{%- if loop.first and message.content is defined and message.content %}

{% endif %}
<tool_call>
<function={{ call.name }}>
{% for key, value in call.arguments | items %}
<parameter={{ key }}>
{{ value if value is string else value | tojson }}
</parameter>
{% endfor %}
</function>
</tool_call>
{%- if not loop.last %}

{% endif %}
{%- endfor %}
{%- endif %}
<|im_end|>
{% else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}
<think>

</think>

{% endif %}
{%- endif %}
"""


def _training_corpus() -> list[str]:
    """A few KB of English, Python and non-ASCII text; fixed seed so every run trains the same merges."""
    rng = random.Random(1234)
    words = (
        "the model reads a token and writes the next one while the cache keeps state for every layer "
        "gated delta rule attention hybrid linear recurrent memory weather city today tomorrow answer"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(60)]
    lines += [
        "def add(a: int, b: int) -> int:\n    return a + b\n",
        "for i in range(10):\n    print(f\"value {i}\")\n",
        "class Cache:\n    def __init__(self, size):\n        self.size = size\n",
        'import json\ndata = json.loads(\'{"city": "Paris", "days": 3}\')\n',
    ] * 8
    lines += ["你好，世界。今天天气很好。", "日本語のテキストです。", "Ça va très bien, merci ! Über naïve café."] * 6
    lines += ["emoji 😀 🚀 👍🏽 ✨", "Ελληνικά και русский текст"] * 6
    return lines


def build_tiny_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer)
    # Added one at a time, in order, so their ids follow the base vocab in the order listed.
    for content, special in QWEN_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    return tokenizer


def write_tiny_tokenizer(directory: Path, eos_in_generation_config: bool = True) -> int:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json; return the vocab size."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))

    added_tokens_decoder = {
        str(tokenizer.token_to_id(content)): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in QWEN_ADDED_TOKENS
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": TINY_CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))

    generation_config: dict[str, object] = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True}
    if eos_in_generation_config:
        eos_ids = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
        generation_config["eos_token_id"] = eos_ids
    (directory / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return tokenizer.get_vocab_size(with_added_tokens=True)
