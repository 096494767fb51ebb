"""The training loop, top to bottom: setup, data, model, wrap, optimizer, resume, loop, eval, checkpoint.

One process or N (torchrun): every process runs this same file. With N > 1 each process takes a disjoint
slice of every global batch and the model is sharded with FSDP2 (`fully_shard` on each decoder layer and
the root). The loss of a step is the mean over all target tokens of the global batch, whatever the
split, so one process and N processes follow the same trajectory up to float round-off.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import random
import shlex
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from hybridlm.io.checkpoint import build_empty_model, save_model
from hybridlm.io.tokenizer import Tokenizer
from hybridlm.model import HybridLM
from hybridlm.train import data as train_data
from hybridlm.train.data import IGNORE_INDEX, PackedRows, RowOrder
from hybridlm.train.recipe import TrainConfig
from hybridlm.train.report import CARD_FILE, LOG_FILE, PLOT_FILE, JsonLog, Progress, plot_losses, write_model_card

logger = logging.getLogger(__name__)

VOCAB_MULTIPLE = 64  # embedding rows padded past the tokenizer, as real checkpoints do (aligned matmuls)
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class TrainResult:
    train_loss: float  # the last step's training loss
    heldout_loss: float | None  # at the last step; None without held-out data
    steps: int  # optimizer steps done, in all runs of this directory
    start_step: int  # where this call began (> 0 when resumed)
    tokens_seen: int  # training tokens, in all runs of this directory
    wall_time_s: float  # this call, setup to the last file written
    tokens_per_s: float  # training throughput of this call (eval and checkpoints excluded)
    losses: tuple[float, ...]  # training loss of each step this call ran
    out_dir: Path
    model_dir: Path


def train(config: TrainConfig, *, stop_after: int | None = None) -> TrainResult:
    """Train `config`'s model on its data; write OUT/model, OUT/checkpoint, log.jsonl, loss.png.

    `stop_after`: stop (checkpointed) once this many steps are done, as a preempted job would; a later
    call with `resume=True` continues exactly where it stopped.
    """
    call_start = time.perf_counter()
    # ---- setup -------------------------------------------------------------------------------------
    rank, world, local_rank, owns_group = _init_distributed(config)
    device = _resolve_device(config.device, local_rank)
    main = rank == 0
    use_fsdp = world > 1 or bool(config.fsdp)
    micro_rows = config.batch_size // config.grad_accum  # rows of one micro-step, all processes together
    if micro_rows % world:
        raise ValueError(f"batch_size / grad_accum = {micro_rows} rows must split evenly over {world} processes")
    local_rows = micro_rows // world
    out = Path(config.out)
    checkpoint_dir, model_dir, tokenizer_dir = out / "checkpoint", out / "model", out / "tokenizer"
    resuming = _check_run_dir(config, out, checkpoint_dir)
    _barrier(world)  # every process has looked at OUT before rank 0 writes to it
    if main:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out)
    command = config.command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    # ---- data --------------------------------------------------------------------------------------
    files = train_data.list_files(config.data)
    if config.eval_data:
        train_files, heldout_files = files, train_data.list_files(config.eval_data)
    else:
        train_files, heldout_files = train_data.split_files(files, config.heldout_fraction)
    train_corpus = train_data.read_corpus(train_files)
    heldout_corpus = train_data.read_corpus(heldout_files)
    if not train_corpus.documents:
        raise ValueError(f"no text found in {', '.join(config.data)} (after holding out {len(heldout_files)} file(s))")
    if main and not (resuming and (tokenizer_dir / "tokenizer.json").is_file()):
        if config.tokenizer is not None:
            train_data.copy_tokenizer(config.tokenizer, tokenizer_dir)
        else:  # trained on the training split only, so the held-out loss stays honest
            backend = train_data.train_tokenizer(train_corpus.documents, config.vocab_size)
            train_data.save_tokenizer(backend, tokenizer_dir)
    _barrier(world)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    separator = train_data.document_separator(tokenizer)
    train_rows = PackedRows(train_data.tokenize(tokenizer, train_corpus.documents), config.seq_len, separator,
                            seed=config.seed)
    heldout_rows = (PackedRows(train_data.tokenize(tokenizer, heldout_corpus.documents), config.seq_len, separator)
                    if heldout_corpus.documents else None)
    order = RowOrder(len(train_rows), config.seed)
    fingerprint = train_rows.fingerprint()

    # ---- model -------------------------------------------------------------------------------------
    vocab_size = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    model_config = config.model_config(vocab_size, tuple(tokenizer.eos_token_ids), tokenizer.pad_token_id)
    model = build_empty_model(model_config, device, torch.float32)  # fp32 master weights
    model.init_weights(std=config.init_std, seed=config.seed)
    num_parameters = model.num_parameters()

    if config.gdn_keep_states and device.type != "cuda":
        logger.warning("gdn_keep_states has no effect on %s: the GDN layers run the PyTorch reference there, not the "
                       "Triton kernels", device.type)
    keep_gdn_states = gdn_states_kept_by(config)

    # ---- wrap (before the optimizer: it must hold the sharded parameters) -------------------------
    if config.activation_checkpointing:
        _checkpoint_layers(model)
    if use_fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)

    # ---- optimizer ---------------------------------------------------------------------------------
    # Weight decay on matrices only; norms, A_log and dt_bias are scales and decays, not features.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8,
    )
    total_steps = config.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup=config.warmup, total=total_steps, floor=config.min_lr_ratio)
    )

    # ---- resume ------------------------------------------------------------------------------------
    step, position, tokens_seen, train_time_before = 0, 0, 0, 0.0
    if resuming:
        state = torch.load(checkpoint_dir / "state.pt", map_location="cpu", weights_only=True)
        set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        step, position, tokens_seen = state["step"], state["position"], state["tokens_seen"]
        train_time_before = state["train_time_s"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["data_fingerprint"] != fingerprint:
            logger.warning("the training data changed since the checkpoint: the resumed run will not repeat "
                           "the uninterrupted one")
        del state
    log = JsonLog(out / LOG_FILE, enabled=main, keep_until_step=step if resuming else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.autocast else nullcontext()
    log.write("start", step=step, resumed=resuming, world_size=world, device=_describe_device(device),
              fsdp=use_fsdp, parameters=num_parameters, train_rows=len(train_rows), train_tokens=train_rows.num_tokens,
              heldout_tokens=heldout_rows.num_tokens if heldout_rows else 0, config=config.to_dict())
    progress = Progress(total_steps, step, enabled=main, bar=config.progress, log_every=config.log_every)

    # ---- loop --------------------------------------------------------------------------------------
    start_step, losses, heldout_loss = step, [], None
    train_time = 0.0  # this call's, eval and checkpoints excluded
    last_step = min(total_steps, stop_after) if stop_after is not None else total_steps
    model.train()
    try:
        while step < last_step:
            step_start = time.perf_counter()
            # This process's rows of each micro-step: a disjoint slice of the global batch.
            batches = [
                train_rows.batch(order.rows(position + m * micro_rows + rank * local_rows, local_rows)).to(device)
                for m in range(config.grad_accum)
            ]
            num_targets = _all_reduce_sum([float(sum(b.num_targets for b in batches))], device, world)[0]
            loss_sum = torch.zeros((), device=device)
            for m, batch in enumerate(batches):
                if use_fsdp:  # reduce-scatter once per step, not once per micro-step
                    model.set_requires_gradient_sync(m == len(batches) - 1)
                # (the backward too: activation checkpointing reruns the forward there, and must save the same)
                with _gdn_states_kept(keep_gdn_states):
                    with autocast:
                        logits = model(batch.input_ids, cu_seqlens=batch.cu_seqlens)  # [1, R*S, V]
                    micro_loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
                    # FSDP averages gradients over processes: scale by `world` so the sum over all target
                    # tokens of the global batch, divided by their count, is what reaches every shard.
                    (micro_loss * (world / max(num_targets, 1.0))).backward()
                loss_sum += micro_loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = _all_reduce_sum([float(loss_sum)], device, world)[0] / max(num_targets, 1.0)
            step += 1
            position += config.batch_size
            tokens_seen += config.tokens_per_step
            losses.append(loss)
            elapsed = time.perf_counter() - step_start
            train_time += elapsed
            speed = config.tokens_per_step / elapsed
            eta = (total_steps - step) * train_time / (step - start_step)
            log.write("train", step=step, loss=loss, lr=lr, grad_norm=float(grad_norm), tokens=tokens_seen,
                      tokens_per_s=speed, train_time_s=train_time_before + train_time)
            progress.update(step, loss, speed, eta)

            # ---- eval ----------------------------------------------------------------------------------
            due = step == last_step or (config.eval_every and step % config.eval_every == 0)
            if heldout_rows is not None and due:
                heldout_loss = _evaluate(model, heldout_rows, config, local_rows, rank, world, device, autocast)
                log.write("eval", step=step, loss=heldout_loss, tokens=tokens_seen)
                progress.heldout(step, heldout_loss)

            # ---- checkpoint ----------------------------------------------------------------------------
            if step == last_step or (config.save_every and step % config.save_every == 0):
                state = {
                    "model": get_model_state_dict(model, options=FULL_STATE),
                    "optimizer": get_optimizer_state_dict(model, optimizer, options=FULL_STATE),
                    "scheduler": scheduler.state_dict(),
                    "step": step, "position": position, "tokens_seen": tokens_seen,
                    "data_fingerprint": fingerprint,
                    "train_time_s": train_time_before + train_time,
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                }
                if main:
                    _write_checkpoint(state, checkpoint_dir)
                    _export_model(state["model"], model_config, tokenizer_dir, model_dir)
                    log.write("checkpoint", step=step, tokens=tokens_seen)
                del state
                _barrier(world)
    finally:
        progress.close()

    # ---- report ------------------------------------------------------------------------------------
    tokens_per_s = len(losses) * config.tokens_per_step / train_time if train_time else 0.0
    if main:
        log.write("end", step=step, loss=losses[-1] if losses else None, heldout_loss=heldout_loss,
                  tokens=tokens_seen, tokens_per_s=tokens_per_s, wall_time_s=time.perf_counter() - call_start)
        plot_losses(out / LOG_FILE, out / PLOT_FILE)
        write_model_card(model_dir / CARD_FILE, dict(
            name=f"{out.resolve().name} ({num_parameters / 1e6:.1f}M hybrid)", num_layers=config.num_layers,
            pattern=model_config.layer_pattern, hidden_size=config.hidden_size, parameters=num_parameters,
            vocab_size=vocab_size,
            tokenizer=f"reused from {config.tokenizer}" if config.tokenizer else
            f"byte-level BPE of {tokenizer.vocab_size} tokens trained on the training split",
            data=list(config.data) + [f"{p} (held out)" for p in config.eval_data],
            train_files=len(train_corpus.files), train_documents=train_rows.num_documents,
            train_tokens=train_rows.num_tokens, heldout_files=len(heldout_corpus.files),
            heldout_documents=heldout_rows.num_documents if heldout_rows else 0,
            heldout_tokens=heldout_rows.num_tokens if heldout_rows else 0, command=command,
            device=_describe_device(device), world_size=world, fsdp=use_fsdp,
            precision="bf16 autocast, fp32 weights" if config.autocast else "fp32",
            steps=step, batch_size=config.batch_size, seq_len=config.seq_len, lr=config.lr, warmup=config.warmup,
            min_lr=config.lr * config.min_lr_ratio, tokens_seen=tokens_seen,
            train_time_s=train_time_before + train_time, tokens_per_s=tokens_per_s,
            train_loss=losses[-1] if losses else float("nan"), heldout_loss=heldout_loss, model_dir=model_dir,
        ))
    if owns_group:
        # every rank leaves together: a rank that tears gloo down while rank 0 still writes the report
        # aborted once at exit ("terminate called without an active exception")
        _barrier(world)
        dist.destroy_process_group()
    return TrainResult(
        train_loss=losses[-1] if losses else float("nan"), heldout_loss=heldout_loss, steps=step,
        start_step=start_step, tokens_seen=tokens_seen, wall_time_s=time.perf_counter() - call_start,
        tokens_per_s=tokens_per_s, losses=tuple(losses), out_dir=out, model_dir=model_dir,
    )


# ---- the pieces the loop calls, in the order it calls them --------------------------------------------

def _init_distributed(config: TrainConfig) -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, whether this call created the process group), from torchrun's
    environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if config.fsdp is False and world > 1:
        raise ValueError(f"fsdp=False runs a single process, but WORLD_SIZE is {world}")
    if config.fsdp and not launched and not dist.is_initialized():
        raise ValueError("fsdp=True needs a torchrun launch (RANK and WORLD_SIZE in the environment)")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), False
    if not launched or (world == 1 and not config.fsdp):
        return 0, 1, 0, False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(config.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank, True


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _check_run_dir(config: TrainConfig, out: Path, checkpoint_dir: Path) -> bool:
    """Whether to resume. Refuses to overwrite a run, and to resume one with a different recipe."""
    has_checkpoint = (checkpoint_dir / "state.pt").is_file()
    if not config.resume:
        if has_checkpoint:
            raise ValueError(f"{out} already holds a training run: pass resume=True (--resume) to continue it, "
                             "or choose another output directory")
        return False
    if not has_checkpoint:
        logger.warning("resume asked for, but %s has no checkpoint: starting from scratch", out)
        return False
    mismatches = config.resume_mismatches(TrainConfig.load(out))
    if mismatches:
        raise ValueError(f"cannot resume {out} with a different recipe: " + "; ".join(mismatches))
    return True


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 down to `floor` at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _checkpoint_layers(model: HybridLM) -> None:
    """Recompute each decoder layer in the backward pass instead of storing its activations. The
    instance's `forward` is replaced (not the module), so parameter names and FSDP hooks are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def gdn_states_kept_by(config: TrainConfig) -> bool:
    """Whether the GDN kernels keep their forward's states for the backward: `gdn_keep_states`, or when None, exactly
    with activation checkpointing. There the forward is rerun right before each layer's backward, so the kept states
    are held for one layer at a time, and the backward skips two launches per layer (the w/u and state passes)."""
    return config.activation_checkpointing if config.gdn_keep_states is None else config.gdn_keep_states


def _gdn_states_kept(enabled: bool):
    """`gdn_keep_states`: the chunked GDN kernels keep their forward's w, h and v_new for the backward instead of
    recomputing them (`gdn_chunk_bwd.BWD_REUSE_FORWARD_STATES`); a plain context otherwise."""
    if not enabled:
        return nullcontext()
    from hybridlm.ops.triton.gdn_chunk_bwd import forward_states_kept

    return forward_states_kept()


def _all_reduce_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def _evaluate(model, rows: PackedRows, config: TrainConfig, local_rows: int, rank: int, world: int,
              device: torch.device, autocast) -> float:
    """Mean loss over the first `eval_rows` held-out rows. Every process runs the same number of
    forward passes (FSDP gathers weights collectively); rows past the end are fillers without targets."""
    count = min(config.eval_rows, len(rows))
    per_pass = local_rows * world
    loss_sum, num_targets = 0.0, 0
    model.eval()
    for start in range(0, count, per_pass):
        indices = [start + rank * local_rows + j for j in range(local_rows)]
        batch = rows.batch([i if i < count else 0 for i in indices], valid=[i < count for i in indices]).to(device)
        with autocast:
            logits = model(batch.input_ids, cu_seqlens=batch.cu_seqlens)
        loss_sum += float(F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(),
                                          ignore_index=IGNORE_INDEX, reduction="sum"))
        num_targets += batch.num_targets
    model.train()
    loss_sum, num_targets = _all_reduce_sum([loss_sum, float(num_targets)], device, world)
    return loss_sum / max(num_targets, 1.0)


def _write_checkpoint(state: dict, directory: Path) -> None:
    """Write beside the old checkpoint, then swap: a crash mid-write never leaves a broken one."""
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    torch.save(state, partial / "state.pt")
    previous = directory.with_name(directory.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if directory.exists():
        directory.rename(previous)
    partial.rename(directory)
    shutil.rmtree(previous, ignore_errors=True)


def _export_model(state_dict: dict, model_config, tokenizer_dir: Path, model_dir: Path) -> None:
    """OUT/model: the HF layout (config.json + model.safetensors + tokenizer files), which hybridlm.LLM
    and transformers' AutoModelForCausalLM both load."""
    model = build_empty_model(model_config, torch.device("cpu"), torch.float32)
    model.load_state_dict(state_dict)
    save_model(model, model_dir)
    for name in train_data.TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, model_dir / name)
