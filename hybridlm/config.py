"""ModelConfig: one typed, validated description of a Gated DeltaNet hybrid, built from config.json.

Every supported checkpoint family resolves here, once, into the same frozen dataclass; nothing
downstream looks at the raw JSON again (except `save`, which writes it back).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LINEAR = "linear_attention"
FULL = "full_attention"

TEXT_MODEL_TYPES = {"qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"}
WRAPPER_MODEL_TYPES = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
SUPPORTED_MODEL_TYPES = sorted(TEXT_MODEL_TYPES | set(WRAPPER_MODEL_TYPES))

# Fields a text config must carry: no default is safe for them.
REQUIRED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
)

# Text-config fields that do not change what the model computes (bookkeeping of transformers,
# training-only knobs, the multi-token-prediction head that a plain forward ignores).
IGNORED_TEXT_FIELDS = {
    "architectures", "dtype", "torch_dtype", "transformers_version", "initializer_range", "use_cache",
    "attention_dropout", "output_router_logits", "router_aux_loss_coef", "model_type", "_name_or_path",
    "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings", "use_sliding_window", "sliding_window",
    "max_window_layers", "output_attentions", "output_hidden_states", "return_dict", "tie_encoder_decoder",
    "chunk_size_feed_forward", "is_encoder_decoder", "add_cross_attention", "problem_type", "id2label",
    "label2id", "task_specific_params", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "base_config_key", "mamba_ssm_dtype", "layer_scan_norm", "pruned_heads", "torchscript",
}
# Top-level fields of the multimodal wrappers; the text part lives under text_config.
IGNORED_WRAPPER_FIELDS = IGNORED_TEXT_FIELDS | {
    "text_config", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
    "vision_end_token_id", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
}
ROPE_KEYS = {
    "rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
    "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate", "mrope_section",
    "mrope_interleaved",
}
SUPPORTED_ROPE_TYPES = {"default", "linear", "yarn"}


@dataclass(frozen=True)
class ModelConfig:
    """The text model of a Qwen3.5 / Qwen3-Next hybrid. Sizes follow the config.json names."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    layer_types: tuple[str, ...] = ()
    head_dim: int = 256
    linear_conv_kernel_dim: int = 4
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # yarn/linear parameters, as sorted (key, value) pairs
    # Sparse MoE (num_experts == 0: every FFN is a dense SwiGLU MLP).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    model_type: str = "qwen3_5_text"
    torch_dtype: str | None = None
    # The config.json this came from, written back by `save`; not part of the model's identity.
    raw: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_hidden_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        self._validate()

    def _validate(self) -> None:
        problems = []
        for name in REQUIRED_FIELDS + ("head_dim", "linear_conv_kernel_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        bad = sorted({t for t in self.layer_types if t not in (LINEAR, FULL)})
        if bad:
            problems.append(f"layer_types may only hold {LINEAR!r} or {FULL!r}, got {bad}")
        if not problems:
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append(
                    f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                    f"num_key_value_heads ({self.num_key_value_heads})"
                )
            if self.linear_num_value_heads % self.linear_num_key_heads:
                problems.append(
                    f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                    f"linear_num_key_heads ({self.linear_num_key_heads})"
                )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            problems.append(f"rope_type {self.rope_type!r} is not supported (supported: {sorted(SUPPORTED_ROPE_TYPES)})")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            problems.append(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        elif int(self.head_dim * self.partial_rotary_factor) % 2:
            problems.append(f"rotary dims head_dim*partial_rotary_factor = {self.rotary_dim} must be even")
        if self.num_experts:
            for name in ("num_experts_per_tok", "moe_intermediate_size"):
                if getattr(self, name) <= 0:
                    problems.append(f"{name} must be positive for a MoE model (num_experts={self.num_experts})")
            if self.num_experts_per_tok > self.num_experts:
                problems.append(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})"
                )
        if any(t == "dense" for t in self.mlp_types) and self.intermediate_size <= 0:
            problems.append("intermediate_size must be positive: some layers use a dense MLP")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the short causal conv: q, k and v (not z, a, b)."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def mlp_types(self) -> tuple[str, ...]:
        """'moe' or 'dense' for each layer (Qwen3-Next's decoder_sparse_step / mlp_only_layers rule)."""
        return tuple(
            "moe"
            if self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
            else "dense"
            for i in range(self.num_hidden_layers)
        )

    @property
    def layer_pattern(self) -> str:
        """'L' for a Gated DeltaNet layer, 'A' for full attention: 'LLLA' * 8 for the 9B."""
        return "".join("L" if t == LINEAR else "A" for t in self.layer_types)

    @property
    def rope_parameters(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @property
    def is_wrapper(self) -> bool:
        return self.model_type in WRAPPER_MODEL_TYPES

    # ---- HF config.json --------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: dict, strict: bool = True) -> ModelConfig:
        """Build from the content of a config.json. Raises ValueError naming every problem found."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type is None:
            raise ValueError("config.json has no 'model_type'; expected one of " + ", ".join(SUPPORTED_MODEL_TYPES))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; hybridlm supports " + ", ".join(SUPPORTED_MODEL_TYPES)
            )
        text = config
        if model_type in WRAPPER_MODEL_TYPES:
            text = config.get("text_config")
            if not isinstance(text, dict):
                raise ValueError(f"model_type {model_type!r} needs a 'text_config' object in config.json")
            _check_unknown(config, IGNORED_WRAPPER_FIELDS, "config.json", strict)
        field_names = {f.name for f in fields(cls)} - {"raw", "model_type", "rope_scaling", "eos_token_id"}
        known = field_names | IGNORED_TEXT_FIELDS | {
            "rope_parameters", "rope_scaling", "full_attention_interval", "eos_token_id", "hidden_act",
            "attention_bias", "attn_output_gate", "rope_theta", "partial_rotary_factor",
        }
        where = "text_config" if text is not config else "config.json"
        _check_unknown(text, known, where, strict)
        missing = [name for name in REQUIRED_FIELDS if name not in text]
        if missing:
            raise ValueError(f"{where} is missing required field(s): {', '.join(missing)}")
        if text.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {text['hidden_act']!r} is not supported (Qwen3.5 uses 'silu')")
        if text.get("attention_bias", False):
            raise ValueError("attention_bias=true is not supported (Qwen3.5 attention has no biases)")
        if text.get("attn_output_gate", True) is not True:
            raise ValueError("attn_output_gate=false is not supported (Qwen3.5 gates every attention output)")

        kwargs = {name: text[name] for name in field_names if name in text and text[name] is not None}
        if "layer_types" not in kwargs:
            interval = text.get("full_attention_interval", 4)
            kwargs["layer_types"] = default_layer_types(text["num_hidden_layers"], interval)
        rope = _parse_rope(text)
        kwargs.update(rope_theta=rope.pop("rope_theta"), partial_rotary_factor=rope.pop("partial_rotary_factor"))
        kwargs["rope_type"] = rope.pop("rope_type")
        kwargs["rope_scaling"] = tuple(sorted(rope.items()))
        eos = text.get("eos_token_id", config.get("eos_token_id"))
        kwargs["eos_token_id"] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in config:
            kwargs["tie_word_embeddings"] = config["tie_word_embeddings"]
        kwargs["torch_dtype"] = text.get("dtype") or text.get("torch_dtype") or config.get("dtype") or config.get(
            "torch_dtype"
        )
        if model_type == "qwen3_next":
            kwargs.setdefault("decoder_sparse_step", 1)
        elif model_type in ("qwen3_5_text", "qwen3_5"):
            kwargs["num_experts"] = 0  # dense family: ignore stray MoE fields
        try:
            return cls(model_type=model_type, raw=config, **kwargs)
        except TypeError as error:  # a field of the wrong JSON type reached a comparison
            raise ValueError(f"invalid model config: {error}") from None

    @classmethod
    def from_file(cls, path: str | Path, strict: bool = True) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        return cls.from_dict(config, strict=strict)

    def text_config_dict(self) -> dict:
        """The text part as transformers writes it (the top level of a text-only config.json)."""
        text_type = WRAPPER_MODEL_TYPES.get(self.model_type, self.model_type)
        out = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("raw", "model_type", "rope_scaling", "rope_theta", "partial_rotary_factor", "rope_type",
                         "torch_dtype", "eos_token_id")
        }
        out["layer_types"] = list(self.layer_types)
        out["mlp_only_layers"] = list(self.mlp_only_layers)
        if not self.num_experts:
            for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                        "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"):
                out.pop(key)
        elif text_type != "qwen3_next":
            for key in ("decoder_sparse_step", "mlp_only_layers"):
                out.pop(key)
        if not self.intermediate_size:
            out.pop("intermediate_size")
        if self.eos_token_id:
            out["eos_token_id"] = list(self.eos_token_id) if len(self.eos_token_id) > 1 else self.eos_token_id[0]
        out["rope_parameters"] = {
            "rope_type": self.rope_type, "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor, **self.rope_parameters,
        }
        out["hidden_act"] = "silu"
        out["model_type"] = text_type
        if self.torch_dtype:
            out["dtype"] = self.torch_dtype
        return out

    def to_dict(self) -> dict:
        """A config.json for this model: the original file with the text part updated, or a fresh
        text-only one (`qwen3_5_text`, `qwen3_5_moe_text` or `qwen3_next`)."""
        text = self.text_config_dict()
        if self.is_wrapper:
            out = json.loads(json.dumps(self.raw)) if self.raw else {"model_type": self.model_type}
            merged = dict(out.get("text_config", {}))
            merged.update(text)
            out["text_config"] = merged
            out["tie_word_embeddings"] = self.tie_word_embeddings
            out.setdefault("architectures", [_ARCHITECTURES[self.model_type]])
            return out
        out = {k: v for k, v in self.raw.items() if k in IGNORED_TEXT_FIELDS} if self.raw else {}
        out.update(text)
        out["architectures"] = [_ARCHITECTURES[self.model_type]]
        return out


_ARCHITECTURES = {
    "qwen3_5_text": "Qwen3_5ForCausalLM",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
}


def default_layer_types(num_layers: int, full_attention_interval: int = 4) -> tuple[str, ...]:
    """Every `full_attention_interval`-th layer is full attention (layer i iff (i+1) % interval == 0)."""
    if not isinstance(full_attention_interval, int) or full_attention_interval <= 0:
        raise ValueError(f"full_attention_interval must be a positive integer, got {full_attention_interval!r}")
    return tuple(FULL if (i + 1) % full_attention_interval == 0 else LINEAR for i in range(num_layers))


def layer_types_from_pattern(pattern: str | int, num_layers: int) -> tuple[str, ...]:
    """'LLLA' (repeated to num_layers) or a ratio n (n linear layers, then one attention layer)."""
    if isinstance(pattern, int) or (isinstance(pattern, str) and pattern.isdigit()):
        ratio = int(pattern)
        if ratio < 0:
            raise ValueError(f"ratio must be >= 0, got {ratio}")
        pattern = "L" * ratio + "A"
    pattern = pattern.upper()
    if not pattern or set(pattern) - {"L", "A"}:
        raise ValueError(f"layer pattern must be a string of 'L' (GDN) and 'A' (attention), got {pattern!r}")
    if len(pattern) != num_layers and num_layers % len(pattern):
        raise ValueError(f"layer pattern {pattern!r} does not tile {num_layers} layers")
    full = (pattern * (num_layers // len(pattern) + 1))[:num_layers]
    return tuple(LINEAR if c == "L" else FULL for c in full)


def _check_unknown(config: dict, known: set[str], where: str, strict: bool) -> None:
    unknown = sorted(k for k in config if k not in known)
    if not unknown:
        return
    message = (
        f"unknown config field(s) in {where}: {', '.join(unknown)}. hybridlm does not know how they change "
        "the model; pass strict_config=False (CLI: --no-strict-config) to load anyway"
    )
    if strict:
        raise ValueError(message)
    logger.warning(message)


def _parse_rope(text: dict) -> dict[str, Any]:
    """RoPE settings from `rope_parameters` (transformers >= 5) or the older top-level fields."""
    params = dict(text.get("rope_parameters") or {})
    legacy = text.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise ValueError("rope_parameters / rope_scaling must be JSON objects")
    for key, value in legacy.items():
        params.setdefault(key, value)
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in params and key in text:
            params[key] = text[key]
    unknown = sorted(set(params) - ROPE_KEYS)
    if unknown:
        raise ValueError(f"unknown rope parameter(s): {', '.join(unknown)}")
    params["rope_type"] = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    params.setdefault("rope_theta", 10000.0)
    params.setdefault("partial_rotary_factor", 0.25)
    # mrope_section / mrope_interleaved are kept (and written back) but inert here: text positions are
    # identical on mRoPE's three streams, so every frequency sees the same position.
    if params["rope_type"] == "yarn":
        if "factor" not in params:
            raise ValueError("rope_type 'yarn' needs 'factor'")
        params.setdefault("original_max_position_embeddings", text.get("max_position_embeddings"))
    if params["rope_type"] == "linear" and "factor" not in params:
        raise ValueError("rope_type 'linear' needs 'factor'")
    return params
