"""TrainConfig: one typed, validated training recipe — data, model size, schedule, hardware.

Built once (from Python or the CLI), validated with ValueErrors that name the numbers, never mutated,
and recorded as `train_config.json` in the run directory so a run can be read back and resumed.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from hybridlm.config import ModelConfig, layer_types_from_pattern

CONFIG_FILE = "train_config.json"
# Fields that may change between a run and its resumption; every other field must match the checkpoint.
RESUMABLE_CHANGES = {
    "out", "steps", "tokens", "eval_every", "save_every", "log_every", "device", "progress", "resume", "command",
    "activation_checkpointing", "fsdp", "gdn_keep_states",
}
DEFAULT_STEPS = 1000
# tokenizer special tokens: documents end with the first; the chat template uses the other two
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BYTE_ALPHABET = 256


@dataclass(frozen=True)
class TrainConfig:
    """A training run. `batch_size` is the global number of rows (of `seq_len` tokens) per optimizer
    step, split over `grad_accum` micro-steps and over the processes of a torchrun launch."""

    data: tuple[str, ...]
    out: str
    eval_data: tuple[str, ...] = ()  # held-out files; when empty, `heldout_fraction` of the data files
    heldout_fraction: float = 0.05
    tokenizer: str | None = None  # a directory with tokenizer.json to reuse; None: train byte-level BPE
    vocab_size: int = 4096  # BPE target size when training a tokenizer
    # model
    hidden_size: int = 256
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    gdn_heads: int = 4  # Gated DeltaNet key heads
    gdn_value_heads: int = 4
    gdn_head_dim: int = 64
    intermediate_size: int | None = None  # SwiGLU width; None: 3 * hidden_size
    ratio: int | None = None  # GDN layers per attention layer: 3 -> LLLA LLLA ...
    pattern: str | None = None  # or an explicit pattern of L and A, repeated to num_layers
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # batch and schedule
    seq_len: int = 512
    batch_size: int = 16
    grad_accum: int = 1
    steps: int | None = None  # optimizer steps; None: from `tokens`, else DEFAULT_STEPS
    tokens: int | None = None  # token budget, rounded up to whole steps
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    # evaluation, checkpoints, logs
    eval_every: int = 100  # 0: only at the end
    eval_rows: int = 64  # held-out rows per evaluation (all of them when fewer)
    save_every: int = 200  # 0: only at the end
    log_every: int = 10  # plain-text progress lines when there is no progress bar
    seed: int = 0
    # hardware
    device: str = "auto"  # auto: cuda:LOCAL_RANK when available, else cpu
    autocast: bool = True  # bf16 autocast; weights, gradients and optimizer state stay fp32
    activation_checkpointing: bool = False
    # the GDN kernels keep their forward's intermediates (w, h, v_new: 1 KB per token and value head at head dim 128)
    # for the backward instead of recomputing them; CUDA only. None: exactly with activation checkpointing, where
    # they live only from a layer's recomputed forward to its backward (one layer's worth at a time)
    gdn_keep_states: bool | None = None
    fsdp: bool | None = None  # None: FSDP2 exactly when launched with more than one process
    progress: bool = True  # rich progress bar (only on a TTY)
    resume: bool = False
    command: str | None = None  # the command line, for the model card

    def __post_init__(self) -> None:
        for name in ("data", "eval_data"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (str, Path)) else tuple(value))
            object.__setattr__(self, name, tuple(str(p) for p in getattr(self, name)))
        object.__setattr__(self, "out", str(self.out))
        if self.tokenizer is not None:
            object.__setattr__(self, "tokenizer", str(self.tokenizer))
        self._validate()

    def _validate(self) -> None:
        problems = []
        if not self.data:
            problems.append("data needs at least one file or folder")
        if not self.out:
            problems.append("out (the run directory) must be given")
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "gdn_heads",
                    "gdn_value_heads", "gdn_head_dim", "seq_len", "batch_size", "grad_accum", "eval_rows", "log_every")
        for name in positive + ("intermediate_size", "steps", "tokens"):
            value = getattr(self, name)
            if value is None and name not in positive:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup", "eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name} must be a non-negative integer, got {value!r}")
        if problems:  # the checks below assume the types are right
            raise ValueError("invalid training config: " + "; ".join(problems))
        if self.steps is not None and self.tokens is not None:
            problems.append(f"give steps ({self.steps}) or tokens ({self.tokens}), not both")
        if self.ratio is not None and self.pattern is not None:
            problems.append(f"give ratio ({self.ratio}) or pattern ({self.pattern!r}), not both")
        bad_ratio = not isinstance(self.ratio, int) or isinstance(self.ratio, bool) or self.ratio < 0
        if self.ratio is not None and bad_ratio:
            problems.append(f"ratio must be a non-negative integer, got {self.ratio!r}")
        else:
            try:
                layer_types_from_pattern(self.layer_pattern_spec, self.num_layers)
            except (ValueError, AttributeError) as error:
                problems.append(str(error))
        if not problems:  # head counts, head sizes: the model config knows its own rules
            try:
                self.model_config(max(self.vocab_size, BYTE_ALPHABET))
            except ValueError as error:
                problems.append(str(error).removeprefix("invalid model config: "))
        if self.batch_size % self.grad_accum:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        if self.tokenizer is None and self.vocab_size < BYTE_ALPHABET + len(SPECIAL_TOKENS) + 1:
            problems.append(f"vocab_size must be at least {BYTE_ALPHABET + len(SPECIAL_TOKENS) + 1} for a byte-level "
                            f"BPE (256 bytes + {len(SPECIAL_TOKENS)} special tokens + merges), got {self.vocab_size}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            problems.append(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            problems.append(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.grad_clip < 0:
            problems.append(f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip}")
        if self.init_std <= 0:
            problems.append(f"init_std must be positive, got {self.init_std}")
        if self.warmup >= self.total_steps and self.warmup > 0:
            problems.append(f"warmup ({self.warmup}) must be shorter than the run ({self.total_steps} steps)")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def layer_pattern_spec(self) -> str | int:
        if self.pattern is not None:
            return self.pattern
        return 3 if self.ratio is None else self.ratio

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return math.ceil(self.tokens / self.tokens_per_step)
        return DEFAULT_STEPS

    def model_config(self, vocab_size: int, eos_token_ids: tuple[int, ...] = (), pad_token_id: int | None = None
                     ) -> ModelConfig:
        """The Qwen3.5 text model (`qwen3_5_text`) of this recipe, for a tokenizer of `vocab_size` ids."""
        return ModelConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            linear_num_key_heads=self.gdn_heads,
            linear_num_value_heads=self.gdn_value_heads,
            linear_key_head_dim=self.gdn_head_dim,
            linear_value_head_dim=self.gdn_head_dim,
            intermediate_size=self.intermediate_size or 3 * self.hidden_size,
            layer_types=layer_types_from_pattern(self.layer_pattern_spec, self.num_layers),
            tie_word_embeddings=self.tie_embeddings,
            max_position_embeddings=max(self.seq_len, 2048),
            rope_theta=self.rope_theta,
            eos_token_id=tuple(eos_token_ids),
            pad_token_id=pad_token_id,
            model_type="qwen3_5_text",
            torch_dtype="float32",
        )

    # ---- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data"], out["eval_data"] = list(self.data), list(self.eval_data)
        return out

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def load(cls, directory: str | Path) -> TrainConfig:
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
        return cls.from_dict(json.loads(path.read_text()))

    def resume_mismatches(self, previous: TrainConfig) -> list[str]:
        """Fields that differ from `previous` and would make a resumed run a different run."""
        mine, theirs = self.to_dict(), previous.to_dict()
        return [f"{k}: {theirs[k]!r} -> {mine[k]!r}"
                for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k]]
