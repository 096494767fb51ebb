"""The `hybridlm` command: argument parsing that calls the library, nothing more."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run Gated DeltaNet hybrid language models.")

ModelOption = Annotated[Optional[Path], typer.Option("--model", "-m", help="Checkpoint directory (HF layout).")]
DeviceOption = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available)")]
DtypeOption = Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16 (default: the checkpoint's)")]
StrictOption = Annotated[bool, typer.Option("--strict-config/--no-strict-config",
                                            help="Refuse config.json fields hybridlm does not know.")]


def _model_dir(model: Path | None) -> Path:
    if model is not None:
        return model
    from hybridlm.bundled import bundled_model_dir

    bundled = bundled_model_dir()
    if bundled is None:
        raise typer.BadParameter("no --model given and this install has no bundled model", param_hint="--model")
    return bundled


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop):
    from hybridlm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed, stop=stop or None)


@app.command()
def generate(
    prompt_arg: Annotated[Optional[str], typer.Argument(metavar="[PROMPT]", help="Text to complete.")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Text to complete.")] = None,
    model: ModelOption = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_p: float = 0.95,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: Optional[int] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    strict_config: StrictOption = True,
) -> None:
    """Complete a prompt, streaming the text to stdout; speeds go to stderr."""
    from hybridlm import LLM

    text = prompt if prompt is not None else prompt_arg
    if text is None:
        raise typer.BadParameter("give a prompt: hybridlm generate 'TEXT' or --prompt TEXT")
    try:
        params = _sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop)
        llm = LLM(_model_dir(model), device=device, dtype=dtype, strict_config=strict_config)
        records = llm.stream(text, sampling=params)  # validates the prompt before anything is printed
        sys.stdout.write(text)
        stats = _stream(llm, records)
    except (ValueError, TypeError, FileNotFoundError) as error:
        _fail(error)
    sys.stdout.write("\n")
    sys.stdout.flush()
    typer.echo(stats, err=True)


def _stream(llm, records) -> str:
    """Write text deltas as they come; return a one-line speed summary."""
    import time

    from hybridlm.engine.generate import peak_memory_bytes
    from hybridlm.info import human_bytes

    start, first, count, reason = time.perf_counter(), None, 0, None
    for record in records:
        if first is None:
            first = time.perf_counter()
        count += 1
        reason = record.finish_reason or reason
        sys.stdout.write(record.text)
        sys.stdout.flush()
    end = time.perf_counter()
    decode = count - 1
    speed = f"{decode / (end - first):.1f} tok/s" if decode > 0 and end > first else "n/a"
    return (f"[{count} tokens, finish={reason}, first token {1000 * ((first or end) - start):.0f} ms, "
            f"decode {speed}, peak memory {human_bytes(peak_memory_bytes(llm.model.device))}]")


@app.command()
def chat(
    model: ModelOption = None,
    system: Annotated[Optional[str], typer.Option(help="System message.")] = None,
    think: Annotated[Optional[bool], typer.Option("--think/--no-think", help="Thinking on or off.")] = None,
    max_tokens: int = 1024,
    temperature: float = 0.7,
    top_p: float = 0.95,
    top_k: int = 20,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: Optional[int] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    strict_config: StrictOption = True,
) -> None:
    """Interactive chat, streaming each reply. /reset clears the conversation, /exit (or EOF) quits."""
    from hybridlm import LLM

    try:
        params = _sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, None)
        llm = LLM(_model_dir(model), device=device, dtype=dtype, strict_config=strict_config)
    except (ValueError, TypeError, FileNotFoundError) as error:
        _fail(error)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for record in llm.chat_stream(messages, sampling=params, enable_thinking=think):
                reply.append(record.text)
                sys.stdout.write(record.text)
                sys.stdout.flush()
        except ValueError as error:  # e.g. the conversation outgrew the context
            messages.pop()
            typer.secho(f"\nerror: {error}", fg=typer.colors.RED, err=True)
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def _cpu_serving_dtype(model_dir: Path, device: str | None, strict_config: bool) -> str | None:
    """On the CPU, serve in float32 when its weights fit in half the available memory (None: the checkpoint's).

    16-bit matmuls on the CPU go through oneDNN, which generates and keeps code for every new input shape: a
    server sees new batch shapes all the time, and its resident memory grew ~15 MiB per 200 requests without
    end; in float32 (MKL) it stayed flat, and ran as fast (benchmarks/RESULTS.md). transformers also computes
    in float32 on the CPU by default.
    """
    import torch

    from hybridlm.config import ModelConfig
    from hybridlm.info import describe

    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu":
        return None
    try:
        config = ModelConfig.from_file(model_dir, strict=strict_config)
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, TypeError):
        return None  # not Linux, or a bad config (the server reports that itself)
    fp32_bytes = describe(config, torch.float32).weight_bytes
    return "float32" if fp32_bytes <= available // 2 else None


def _cache_budget(gib: float | None, weight_bytes: int) -> tuple[int, str]:
    if gib is not None:
        return int(gib * 2**30), "--cache-memory"
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        budget = int(total * 0.9) - weight_bytes
        if budget <= 0:
            raise ValueError(f"the weights ({weight_bytes / 2**30:.1f} GiB) do not fit in 90% of this GPU's memory")
        return budget, f"90% of {torch.cuda.get_device_name(0)} minus the weights"
    return 16 * 2**30, "no GPU here: an example budget, set --cache-memory"


@app.command()
def info(
    model: ModelOption = None,
    context: Annotated[Optional[int], typer.Option(help="Context length for the memory estimate.")] = None,
    dtype: Annotated[str, typer.Option(help="Dtype of weights, conv state and KV for the estimate.")] = "bfloat16",
    cache_memory: Annotated[Optional[float], typer.Option(
        help="Cache budget in GiB for the capacity rows [default: 90% of this GPU's memory minus the weights; "
             "without a GPU, 16 GiB].")] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Running sequences the cache reserves state for.")] = 64,
    strict_config: StrictOption = True,
) -> None:
    """Layer pattern, parameters, state / KV memory per token and at a context length, and what a cache budget
    holds (as the engine would plan it)."""
    from rich.console import Console
    from rich.table import Table

    from hybridlm.config import ModelConfig
    from hybridlm.io.checkpoint import DTYPES
    from hybridlm.info import describe, human_bytes

    try:
        config = ModelConfig.from_file(_model_dir(model), strict=strict_config)
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
        if context is not None and context <= 0:
            raise ValueError(f"--context must be positive, got {context}")
        if cache_memory is not None and cache_memory <= 0:
            raise ValueError(f"--cache-memory must be positive, got {cache_memory}")
        if max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be >= 1, got {max_num_seqs}")
        facts = describe(config, DTYPES[dtype])
        budget, source = _cache_budget(cache_memory, facts.weight_bytes)
        plan = facts.cache_plan(budget, max_num_seqs)
    except (ValueError, TypeError, FileNotFoundError) as error:
        _fail(error)
    tokens = context or facts.context_length
    table = Table(title=f"{_model_dir(model)}", show_header=False)
    rows = [
        ("model type", facts.model_type),
        ("layers", f"{len(facts.layer_pattern)}: {facts.layer_pattern.count('L')} Gated DeltaNet, "
                   f"{facts.layer_pattern.count('A')} full attention"),
        ("layer pattern", facts.layer_pattern),
        ("parameters", f"{facts.num_parameters:,} ({facts.num_parameters / 1e9:.3f} B)"),
        (f"weights ({dtype})", human_bytes(facts.weight_bytes)),
        ("context (max_position_embeddings)", f"{facts.context_length:,}"),
        ("recurrent + conv state per sequence", human_bytes(facts.state_bytes_per_sequence)),
        ("KV cache per token", human_bytes(facts.kv_bytes_per_token)),
        (f"cache for one sequence of {tokens:,} tokens", human_bytes(facts.memory_at(tokens))),
        ("  (if every layer were attention)", human_bytes(tokens * facts.all_attention_kv_bytes_per_token)),
        ("cache budget", f"{human_bytes(budget)} ({source})"),
        (f"  state slots ({max_num_seqs} running sequences)", human_bytes(plan.state_bytes)),
        ("  prefix-cache state snapshots", f"{plan.num_snapshot_slots:,} ({human_bytes(plan.snapshot_bytes)})"),
        ("  KV capacity", f"{plan.max_cached_tokens:,} tokens ({plan.num_blocks:,} blocks of {plan.block_size})"
                          if facts.layer_pattern.count("A") else "no attention layers: unbounded"),
        (f"  sequences of {tokens:,} tokens at once", f"{min(max_num_seqs, plan.max_cached_tokens // tokens):,}"
                                                      if facts.layer_pattern.count("A") else f"{max_num_seqs:,}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console(width=120).print(table)


@app.command()
def train(
    paths: Annotated[Optional[list[Path]], typer.Argument(metavar="[PATH...]", help="More data paths.")] = None,
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="Text/code files, folders or JSONL.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory.")] = None,
    eval_data: Annotated[Optional[list[Path]], typer.Option(help="Held-out files (default: a share of --data).")] = None,
    heldout_fraction: Annotated[float, typer.Option(help="Share of data files held out.")] = 0.05,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Reuse this checkpoint's tokenizer.")] = None,
    ratio: Annotated[Optional[int], typer.Option(help="GDN layers per attention layer (3: LLLA).")] = None,
    pattern: Annotated[Optional[str], typer.Option(help="Explicit layer pattern, e.g. LLLA.")] = None,
    hidden: int = 256,
    layers: int = 8,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 64,
    gdn_heads: int = 4,
    gdn_value_heads: int = 4,
    gdn_head_dim: int = 64,
    intermediate: Annotated[Optional[int], typer.Option(help="MLP width (default 3 x hidden).")] = None,
    vocab: Annotated[int, typer.Option(help="BPE vocabulary to train.")] = 4096,
    seq_len: int = 512,
    batch_size: Annotated[int, typer.Option(help="Rows per optimizer step, all processes together.")] = 16,
    grad_accum: int = 1,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default 1000).")] = None,
    tokens: Annotated[Optional[int], typer.Option(help="Token budget instead of --steps.")] = None,
    lr: float = 3e-3,
    warmup: int = 100,
    eval_every: int = 100,
    eval_rows: Annotated[int, typer.Option(help="Held-out rows per evaluation.")] = 64,
    save_every: int = 200,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    autocast: Annotated[bool, typer.Option("--autocast/--no-autocast", help="bf16 autocast.")] = True,
    activation_checkpointing: bool = False,
    gdn_keep_states: Annotated[Optional[bool], typer.Option(
        "--gdn-keep-states/--no-gdn-keep-states",
        help="GDN kernels keep their forward's states for the backward: faster, ~1 KB more per token and GDN "
             "value head per layer (head dim 128). Default: on with --activation-checkpointing (one layer's "
             "states at a time), else off.")] = None,
    fsdp: Annotated[Optional[bool], typer.Option("--fsdp/--no-fsdp", help="Default: FSDP2 under torchrun.")] = None,
    resume: bool = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train a hybrid from scratch (launch with torchrun for several GPUs)."""
    import os
    import shlex

    from hybridlm.train import TrainConfig
    from hybridlm.train import train as run_training

    sources = [*(data or []), *(paths or [])]
    if not sources:
        raise typer.BadParameter("give the training data: --data PATH [PATH...]", param_hint="--data")
    if out is None:
        raise typer.BadParameter("give the run directory: --out DIR", param_hint="--out")
    try:
        config = TrainConfig(
            data=tuple(str(p) for p in sources), out=str(out), eval_data=tuple(str(p) for p in eval_data or ()),
            heldout_fraction=heldout_fraction, tokenizer=None if tokenizer is None else str(tokenizer),
            vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
            head_dim=head_dim, gdn_heads=gdn_heads, gdn_value_heads=gdn_value_heads, gdn_head_dim=gdn_head_dim,
            intermediate_size=intermediate, ratio=ratio, pattern=pattern, seq_len=seq_len, batch_size=batch_size,
            grad_accum=grad_accum, steps=steps, tokens=tokens, lr=lr, warmup=warmup, eval_every=eval_every,
            eval_rows=eval_rows, save_every=save_every, seed=seed, device=device, autocast=autocast,
            activation_checkpointing=activation_checkpointing, gdn_keep_states=gdn_keep_states, fsdp=fsdp,
            progress=progress, resume=resume, command=shlex.join(["hybridlm", *sys.argv[1:]]),
        )
        result = run_training(config)
    except (ValueError, TypeError, FileNotFoundError) as error:
        _fail(error)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        heldout = "n/a" if result.heldout_loss is None else f"{result.heldout_loss:.4f}"
        typer.echo(f"[{result.steps} steps, {result.tokens_seen:,} tokens, train loss {result.train_loss:.4f}, "
                   f"held-out loss {heldout}, {result.tokens_per_s:,.0f} tok/s] model: {result.model_dir}", err=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The run is finished and saved, and every rank has left the process group. Leave now, without the
        # interpreter's teardown: there a rank aborted now and then ("terminate called without an active exception",
        # a distributed thread destroyed while joinable), and torchrun reported a finished run as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@app.command()
def serve(
    model: ModelOption = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default; 0.0.0.0 exposes it).")] = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="HYBRIDLM_API_KEY",
                                                   help="Require 'Authorization: Bearer KEY' on /v1/*.")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="Model id clients use (default: folder name).")] = None,
    think: Annotated[Optional[bool], typer.Option("--think/--no-think",
                                                  help="Default enable_thinking (requests may override).")] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Sequences decoded together.")] = 64,
    max_waiting: Annotated[int, typer.Option(help="Queued sequences beyond those before 429.")] = 256,
    block_size: Annotated[int, typer.Option(help="Prefix-cache granularity in tokens.")] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(
        help="Tokens one step takes at most (longer prompts are prefilled in chunks).")] = 8192,
    cache_memory: Annotated[Optional[float], typer.Option(
        help="KV and state cache budget in GiB [default: on a GPU, --gpu-memory-utilization of its memory minus what "
             "is in use and room for a step's activations; on the CPU, at most 1 GiB].")] = None,
    gpu_memory_utilization: Annotated[float, typer.Option(
        help="Share of the GPU's memory the process may fill when --cache-memory is not given.")] = 0.9,
    cuda_graphs: Annotated[bool, typer.Option(
        "--cuda-graphs/--no-cuda-graphs", help="Capture decode steps and short prefills in CUDA graphs.")] = True,
    prefill_graphs: Annotated[int, typer.Option(
        help="Prefill chunks of one sequence up to this many tokens replay a CUDA graph (0: never).")] = 2048,
    shutdown_grace: Annotated[float, typer.Option(help="Seconds in-flight requests get on shutdown.")] = 30.0,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    strict_config: StrictOption = True,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat, completions, tools, streaming).

    On the CPU without --dtype, weights are computed in float32 when that fits in half the available memory."""
    import os

    # oneDNN (CPU matmuls) caches a primitive per input shape, and a server sees a new shape with nearly every
    # step: the cache made resident memory climb by ~150 MiB over 1000 requests. Uncached, the load test ran
    # as fast and memory levelled off (benchmarks/RESULTS.md). Set before the first CPU matmul; users may override.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
    from hybridlm.engine.engine import EngineConfig

    if dtype is None:
        dtype = _cpu_serving_dtype(_model_dir(model), device, strict_config)
    try:
        from hybridlm.serve import run
    except ImportError as error:
        _fail(ImportError(f"{error}; install the server's dependencies: pip install 'hybridlm[serve]'"))
    try:
        if cache_memory is not None and cache_memory <= 0:
            raise ValueError(f"--cache-memory must be a positive number of GiB, got {cache_memory}")
        engine_config = EngineConfig(
            max_num_seqs=max_num_seqs, block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
            cache_memory_bytes=None if cache_memory is None else int(cache_memory * 2**30),
            gpu_memory_utilization=gpu_memory_utilization, cuda_graphs=cuda_graphs, prefill_graphs=prefill_graphs)
        run(_model_dir(model), host=host, port=port, api_key=api_key, model_name=served_model_name,
            device=device, dtype=dtype, strict_config=strict_config, max_waiting=max_waiting,
            engine_config=engine_config, enable_thinking=think, shutdown_grace_seconds=shutdown_grace)
    except (ValueError, TypeError, FileNotFoundError) as error:
        _fail(error)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
