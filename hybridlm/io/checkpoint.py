"""Hugging Face checkpoints in and out: safetensors shards, the key layouts of every family.

All checkpoint quirks live here (the `sanitize` of mlx-lm): the `model.` / `model.language_model.`
prefixes, per-expert or fused MoE experts, Qwen3-Next's per-key-head interleaved `in_proj_qkvz` /
`in_proj_ba`, and the vision / MTP tensors a text model skips. Tensors are read one at a time from the
memory-mapped shards straight into the model's preallocated parameters (on the target device, in the
target dtype), so loading never holds two copies of the weights.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hybridlm.config import ModelConfig
from hybridlm.model import HybridLM

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Parameters kept in fp32 whatever the model dtype: the GDN decay math is sensitive (USERS.md, item 5).
FP32_PARAMS = re.compile(r"\.(A_log|dt_bias)$")
SKIPPED_PREFIXES = ("model.visual.", "visual.", "mtp.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "preprocessor_config.json",
                   "video_preprocessor_config.json", "chat_template.json")


@dataclass(frozen=True)
class CheckpointLayout:
    """How a checkpoint spells the text model's tensors; `save` writes the same layout back."""

    prefix: str = "model."  # "model.language_model." for the multimodal wrappers
    fused_experts: bool = False  # experts.gate_up_proj / experts.down_proj instead of experts.{e}.*
    interleaved_gdn: bool = False  # Qwen3-Next: in_proj_qkvz / in_proj_ba grouped per key head
    source_dir: Path | None = None  # where skipped (vision, MTP) tensors can be copied from on save


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if dtype is not None else (config.torch_dtype or "float32")
    if name == "auto":
        name = config.torch_dtype or "float32"
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of float32, bfloat16, float16")
    return DTYPES[name]


def resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the shard that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object")
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are not in {path}: {', '.join(missing)}")
        return {key: path / name for key, name in weight_map.items()}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    files = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                files[key] = shard
    return files


def detect_layout(keys: set[str], config: ModelConfig, source_dir: Path | None) -> CheckpointLayout:
    wrapped = any(k.startswith("model.language_model.") for k in keys)
    return CheckpointLayout(
        prefix="model.language_model." if wrapped else "model.",
        fused_experts=any(k.endswith("mlp.experts.gate_up_proj") for k in keys),
        interleaved_gdn=any(k.endswith("linear_attn.in_proj_qkvz.weight") for k in keys),
        source_dir=source_dir,
    )


# ---- loading -----------------------------------------------------------------------------------------

Target = tuple[str, Callable[[torch.Tensor], torch.Tensor] | None, tuple | None]
# (parameter name, transform of the checkpoint tensor or None, index into the parameter or None)


def _targets(key: str, layout: CheckpointLayout, config: ModelConfig) -> list[Target] | None:
    """Where checkpoint tensor `key` goes in HybridLM. None: not a tensor of the text model."""
    if key == "lm_head.weight":
        return [("lm_head.weight", None, None)]
    if not key.startswith(layout.prefix):
        return None
    name = key[len(layout.prefix):]
    expert = re.match(r"(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
    if expert:
        base, e, proj = expert.group(1), int(expert.group(2)), expert.group(3)
        inter = config.moe_intermediate_size
        if proj == "down_proj":
            return [(f"{base}.down_proj", None, (e,))]
        rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
        return [(f"{base}.gate_up_proj", None, (e, rows))]
    if name.endswith("linear_attn.in_proj_qkvz.weight"):
        base = name[: -len("in_proj_qkvz.weight")]
        return [(base + "in_proj_qkv.weight", lambda t: _split_qkvz(t, config)[0], None),
                (base + "in_proj_z.weight", lambda t: _split_qkvz(t, config)[1], None)]
    if name.endswith("linear_attn.in_proj_ba.weight"):
        base = name[: -len("in_proj_ba.weight")]
        return [(base + "in_proj_b.weight", lambda t: _split_ba(t, config)[0], None),
                (base + "in_proj_a.weight", lambda t: _split_ba(t, config)[1], None)]
    return [(name, None, None)]


def _split_qkvz(t: torch.Tensor, c: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Next groups rows per key head: [q_h | k_h | v of its Hv/Hk heads | z of them]."""
    group = c.linear_num_value_heads // c.linear_num_key_heads
    dk, dv, hidden = c.linear_key_head_dim, c.linear_value_head_dim, t.shape[-1]
    per_head = t.reshape(c.linear_num_key_heads, 2 * dk + 2 * group * dv, hidden)
    q, k, v, z = per_head.split([dk, dk, group * dv, group * dv], dim=1)
    qkv = torch.cat([q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)])
    return qkv, z.reshape(-1, hidden)


def _split_ba(t: torch.Tensor, c: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    group = c.linear_num_value_heads // c.linear_num_key_heads
    per_head = t.reshape(c.linear_num_key_heads, 2 * group, t.shape[-1])
    return per_head[:, :group].reshape(-1, t.shape[-1]), per_head[:, group:].reshape(-1, t.shape[-1])


def _merge_qkvz(qkv: torch.Tensor, z: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    group = c.linear_num_value_heads // c.linear_num_key_heads
    heads, dk, dv, hidden = c.linear_num_key_heads, c.linear_key_head_dim, c.linear_value_head_dim, qkv.shape[-1]
    q, k, v = qkv.split([heads * dk, heads * dk, heads * group * dv])
    parts = [q.reshape(heads, dk, hidden), k.reshape(heads, dk, hidden), v.reshape(heads, group * dv, hidden),
             z.reshape(heads, group * dv, hidden)]
    return torch.cat(parts, dim=1).reshape(-1, hidden)


def _merge_ba(b: torch.Tensor, a: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    heads, hidden = c.linear_num_key_heads, b.shape[-1]
    return torch.cat([b.reshape(heads, -1, hidden), a.reshape(heads, -1, hidden)], dim=1).reshape(-1, hidden)


def build_empty_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> HybridLM:
    """The model with uninitialised parameters allocated once, directly on `device` in `dtype`."""
    with torch.device("meta"):
        model = HybridLM(config)
    model.to(dtype)
    for name, param in model.named_parameters():
        if FP32_PARAMS.search(name):
            param.data = param.data.float()
    return model.to_empty(device=device)


def load_model(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    strict_config: bool = True,
) -> HybridLM:
    """Load a checkpoint directory (config.json + safetensors) into a HybridLM.

    Every missing, unexpected or misshaped tensor is collected and reported in one ValueError.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = ModelConfig.from_file(path, strict=strict_config)
    device, dtype = resolve_device(device), resolve_dtype(dtype, config)
    files = checkpoint_files(path)
    layout = detect_layout(set(files), config, path)
    model = build_empty_model(config, device, dtype)
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}  # parameter -> elements written
    unexpected, misshaped, skipped = [], [], 0
    by_shard: dict[Path, list[str]] = {}
    for key, shard in files.items():
        by_shard.setdefault(shard, []).append(key)
    with torch.no_grad():
        for shard, keys in by_shard.items():
            with safe_open(shard, framework="pt", device="cpu") as f:
                for key in sorted(keys):
                    if key.startswith(SKIPPED_PREFIXES):
                        skipped += 1
                        continue
                    targets = _targets(key, layout, config)
                    if key == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # tied checkpoints sometimes ship a copy of the embedding
                    if targets is None or any(name not in params for name, _, _ in targets):
                        unexpected.append(key)
                        continue
                    tensor = f.get_tensor(key)
                    for name, transform, index in targets:
                        try:
                            value = transform(tensor) if transform else tensor
                        except RuntimeError:
                            misshaped.append(f"{key}: shape {tuple(tensor.shape)} does not fit {name}")
                            continue
                        destination = params[name].data if index is None else params[name].data[index]
                        if tuple(value.shape) != tuple(destination.shape):
                            misshaped.append(f"{key}: expected {tuple(destination.shape)}, got {tuple(value.shape)}")
                            continue
                        destination.copy_(value)
                        filled[name] = filled.get(name, 0) + value.numel()
    missing = [name for name, p in params.items() if filled.get(name, 0) != p.numel()]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensor(s): " + ", ".join(_hf_name(n, layout) for n in missing))
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} tensor(s): " + ", ".join(unexpected))
        if misshaped:
            problems.append(f"misshaped {len(misshaped)} tensor(s): " + "; ".join(misshaped))
        raise ValueError(f"checkpoint {path} does not match its config.json: " + " | ".join(problems))
    if skipped:
        logger.info("skipped %d vision/MTP tensors of %s (text-only model)", skipped, path)
    model.checkpoint_layout = layout
    # one GEMM per block's input projections at inference (weights become views of one tensor: names, saving and
    # training are unchanged); a plain forward then makes ~half the GEMM launches (prefill is host-bound at 4k)
    model.fuse_input_projections()
    model.eval()
    return model


def _hf_name(name: str, layout: CheckpointLayout) -> str:
    return name if name == "lm_head.weight" else layout.prefix + name


# ---- saving ------------------------------------------------------------------------------------------

def checkpoint_tensors(model: HybridLM, layout: CheckpointLayout) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under the checkpoint's names, one at a time."""
    config = model.config
    params = dict(model.named_parameters())
    for name, param in params.items():
        tensor = param.detach()
        if name == "lm_head.weight":
            yield name, tensor
        elif name.endswith("mlp.experts.gate_up_proj") and not layout.fused_experts:
            base = layout.prefix + name[: -len("gate_up_proj")]
            for e in range(tensor.shape[0]):
                gate, up = tensor[e].chunk(2, dim=0)
                yield f"{base}{e}.gate_proj.weight", gate
                yield f"{base}{e}.up_proj.weight", up
        elif name.endswith("mlp.experts.down_proj") and not layout.fused_experts:
            base = layout.prefix + name[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                yield f"{base}{e}.down_proj.weight", tensor[e]
        elif layout.interleaved_gdn and name.endswith("in_proj_qkv.weight"):
            base = name[: -len("in_proj_qkv.weight")]
            yield layout.prefix + base + "in_proj_qkvz.weight", _merge_qkvz(tensor, params[base + "in_proj_z.weight"], config)
        elif layout.interleaved_gdn and name.endswith("in_proj_b.weight"):
            base = name[: -len("in_proj_b.weight")]
            yield layout.prefix + base + "in_proj_ba.weight", _merge_ba(tensor, params[base + "in_proj_a.weight"], config)
        elif layout.interleaved_gdn and name.endswith(("in_proj_z.weight", "in_proj_a.weight")):
            continue  # written with their partner above
        else:
            yield layout.prefix + name, tensor


def _passthrough_tensors(layout: CheckpointLayout) -> Iterator[tuple[str, torch.Tensor]]:
    """Vision / MTP tensors of the source checkpoint, copied verbatim so a save loses nothing."""
    if layout.source_dir is None:
        return
    try:
        files = checkpoint_files(layout.source_dir)
    except FileNotFoundError:
        logger.warning("source checkpoint %s is gone: vision/MTP tensors not copied", layout.source_dir)
        return
    for key, shard in sorted(files.items()):
        if key.startswith(SKIPPED_PREFIXES):
            with safe_open(shard, framework="pt", device="cpu") as f:
                yield key, f.get_tensor(key)


def save_model(model: HybridLM, path: str | Path, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write config.json + safetensors (sharded past `max_shard_bytes`, with an index) in the layout the
    model was loaded from, plus the source's tokenizer files. transformers loads the result."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layout: CheckpointLayout = getattr(model, "checkpoint_layout", None) or _default_layout(model.config)
    source = layout.source_dir
    if source is not None and source.resolve() == path.resolve():
        raise ValueError(f"refusing to save over the checkpoint being read ({path}); choose another directory")
    tensors = checkpoint_tensors(model, layout)
    if model.config.is_wrapper:
        tensors = _chain(tensors, _passthrough_tensors(layout))
    for stale in path.glob("model*.safetensors*"):
        stale.unlink()
    # Each shard is written as soon as it is full, so a GPU model never sits in host RAM all at once;
    # the final "-of-N" names are known only at the end.
    written: list[tuple[Path, list[str], int]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        temporary = path / f"model-partial-{len(written)}.safetensors"
        save_file(shard, temporary, metadata={"format": "pt"})
        written.append((temporary, list(shard), size))

    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        tensor = tensor.contiguous().cpu()
        if tensor.untyped_storage().nbytes() != nbytes:  # a slice of a fused weight: safetensors wants its own
            tensor = tensor.clone()
        shard[key] = tensor
        size += nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(path / "model.safetensors")
    else:
        weight_map, total = {}, 0
        for i, (temporary, keys, nbytes) in enumerate(written):
            name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            temporary.rename(path / name)
            weight_map.update(dict.fromkeys(keys, name))
            total += nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = model.config.to_dict()
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    if model.config.is_wrapper:
        config["text_config"]["dtype"] = config["dtype"]
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, path / name)


def _default_layout(config: ModelConfig) -> CheckpointLayout:
    return CheckpointLayout(
        prefix="model.language_model." if config.is_wrapper else "model.",
        interleaved_gdn=config.model_type == "qwen3_next",
    )


def _chain(*iterators: Iterator) -> Iterator:
    for iterator in iterators:
        yield from iterator
