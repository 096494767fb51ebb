"""The ratio study (issue 5): GDN-to-attention layer ratios at matched size and matched tokens, on one GPU.

    PYTHONUNBUFFERED=1 python3 benchmarks/ratio_study.py --models all-attn,1:1,3:1 --out $OUT/ratio
    PYTHONUNBUFFERED=1 python3 benchmarks/ratio_study.py --models 7:1,all-gdn --out $OUT/ratio
    python3 benchmarks/ratio_study.py --report RESULTS_DIR [RESULTS_DIR ...] --doc docs/ratio_study.md
    python3 benchmarks/ratio_study.py --tiny --models all-attn,3:1 --out /tmp/ratio   # seconds, on a CPU

Five 8-layer models whose only difference is the layer pattern (L = Gated DeltaNet, A = gated attention):
all-attn (AAAAAAAA), 1:1 (LALALALA), 3:1 (LLLALLLA), 7:1 (LLLLLLLA), all-gdn (LLLLLLLL). Widths are chosen
so that a GDN layer and an attention layer hold nearly the same parameters (~1.05M each), so every model
lands within 0.5% of 26.3M parameters without touching the MLP. Per model, in one process:

1. language model: `hybridlm.train.train` (the library's recipe, unchanged) on the Python standard library
   source of the running interpreter, the same token budget for every model, one byte-level BPE trained
   once on the training split and shared; held-out loss on whole held-out files (the trainer's split).
2. MQAR (Zoology-style multi-query associative recall): the same architecture with a small vocabulary,
   trained from scratch on a mix of two tasks (256 tokens / 16 key-value pairs and 1024 / 64) for a
   fixed number of steps, accuracy on the answer positions of fixed held-out examples.
3. memory: recurrent + conv state and KV cache of one 32k-token sequence, from the model's own
   `cache_layout` (what the engine sizes its pools from): bf16 KV and conv state, fp32 recurrent state.

Every finished model writes OUT/<model>.json at once (a run cut short keeps what finished) plus its logs;
`--report` merges any number of result folders into a table, a plot and docs/ratio_study.md's results.
One file on purpose: it is what travels to the GPU, and the report must read exactly what the run wrote.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hybridlm.config import ModelConfig  # noqa: E402
from hybridlm.io.checkpoint import build_empty_model  # noqa: E402
from hybridlm.io.tokenizer import Tokenizer  # noqa: E402
from hybridlm.model import HybridLM  # noqa: E402
from hybridlm.train import TrainConfig, train  # noqa: E402
from hybridlm.train import data as train_data  # noqa: E402
from hybridlm.train.report import LOG_FILE, read_log  # noqa: E402
from hybridlm.train.trainer import VOCAB_MULTIPLE, lr_factor  # noqa: E402

STUDY = "ratio_study"
MODELS = {"all-attn": "A", "1:1": "LA", "3:1": "LLLA", "7:1": "LLLLLLLA", "all-gdn": "L"}
IGNORE_INDEX = -100
CACHE_BLOCK = 64  # the engine's KV block size: a 32k-token sequence fills whole blocks
RESULTS_BEGIN, RESULTS_END = "<!-- ratio-study-results:begin -->", "<!-- ratio-study-results:end -->"
# Differences smaller than these are called ties in the generated conclusion: one seed per model, so a
# few hundredths of a nat or a couple of accuracy points are within what a rerun could move.
LOSS_TIE, ACCURACY_TIE, SPEED_TIE = 0.02, 0.02, 0.05


@dataclass(frozen=True)
class Settings:
    # model widths, shared by every pattern: attention 8 heads (4 KV) x 64 and GDN 4 key / 8 value heads
    # x 64 give ~1.05M parameters per mixer either way
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 64
    gdn_heads: int = 4
    gdn_value_heads: int = 8
    gdn_head_dim: int = 64
    intermediate_size: int = 1280
    # language model
    vocab_size: int = 4096
    heldout_fraction: float = 0.05
    max_files: int = 0  # 0: every .py file of the standard library
    seq_len: int = 512
    batch_rows: int = 16
    lm_tokens: int = 2**21
    lm_lr: float = 2e-3
    lm_warmup: int = 25
    eval_rows: int = 512
    # MQAR: keys [0, K), values [K, 2K), filler tokens [2K, vocab)
    mqar_tasks: tuple[tuple[int, int], ...] = ((256, 16), (1024, 64))  # (sequence length, key-value pairs)
    mqar_keys: int = 128
    mqar_vocab: int = 512
    mqar_steps: int = 300
    mqar_batch_tokens: int = 32768  # per task and step
    mqar_lr: float = 1e-3
    mqar_eval_answers: int = 8192  # per task
    memory_tokens: int = 32768
    seed: int = 0

    @property
    def lm_steps(self) -> int:
        return math.ceil(self.lm_tokens / (self.batch_rows * self.seq_len))


FULL = Settings()
TINY = Settings(hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=16, gdn_heads=1, gdn_value_heads=2,
                gdn_head_dim=16, intermediate_size=128, vocab_size=320, max_files=24, seq_len=64, batch_rows=4,
                lm_tokens=6 * 4 * 64, lm_warmup=2, eval_rows=8, mqar_tasks=((64, 4), (128, 8)), mqar_keys=16,
                mqar_vocab=64, mqar_steps=6, mqar_batch_tokens=256, mqar_eval_answers=64)


def log(line: str = "") -> None:
    print(line, flush=True)


# ---- the models -----------------------------------------------------------------------------------------

def pattern_of(name: str) -> str:
    """'all-attn', 'all-gdn' or 'N:1' (N GDN layers per attention layer) -> the repeating L/A unit."""
    if name in MODELS:
        return MODELS[name]
    ratio, _, one = name.partition(":")
    if not (ratio.isdigit() and one == "1"):
        raise ValueError(f"unknown model {name!r}: use {', '.join(MODELS)} or N:1")
    return "L" * int(ratio) + "A"


def slug(name: str) -> str:
    return name.replace(":", "to")  # file names without ':'


def lm_config(s: Settings, pattern: str, data: Path | str, tokenizer: Path | str | None, out: Path | str) -> TrainConfig:
    return TrainConfig(
        data=(str(data),), out=str(out), heldout_fraction=s.heldout_fraction, tokenizer=tokenizer and str(tokenizer),
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_layers=s.num_layers, num_heads=s.num_heads,
        num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, gdn_heads=s.gdn_heads, gdn_value_heads=s.gdn_value_heads,
        gdn_head_dim=s.gdn_head_dim, intermediate_size=s.intermediate_size, pattern=pattern, seq_len=s.seq_len,
        batch_size=s.batch_rows, tokens=s.lm_tokens, lr=s.lm_lr, warmup=s.lm_warmup, eval_every=0,
        eval_rows=s.eval_rows, save_every=0, log_every=max(1, s.lm_steps // 8), seed=s.seed,
        autocast=torch.cuda.is_available(), progress=False, command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    )


def describe(s: Settings, pattern: str, vocab: int) -> dict:
    """Parameters and the inference cache of one 32k-token sequence, from the model's own cache layout."""
    config = lm_config(s, pattern, "-", None, "-").model_config(vocab)
    with torch.device("meta"):
        model = HybridLM(config)
    layout = model.cache_layout
    tokens = -(-s.memory_tokens // CACHE_BLOCK) * CACHE_BLOCK
    state = layout.state_bytes_per_sequence(torch.bfloat16)  # bf16 conv + fp32 recurrent state
    kv = layout.kv_bytes_per_token(torch.bfloat16) * tokens
    parameters = model.num_parameters()
    return dict(layers=config.layer_pattern, attention_layers=len(layout.attention_layers),
                gdn_layers=len(layout.recurrent_layers), parameters=parameters,
                non_embedding_parameters=parameters - model.embed_tokens.weight.numel(),
                memory=dict(tokens=s.memory_tokens, state_bytes=state, kv_bytes=kv, total_bytes=state + kv,
                            total_mib=(state + kv) / 2**20))


# ---- data and tokenizer (once per invocation) -----------------------------------------------------------

def prepare_corpus(s: Settings, work: Path, source: Path | None) -> tuple[Path, dict]:
    """Copy the .py files of `source` (default: this interpreter's standard library) into WORK/stdlib."""
    source = source or Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in source.rglob("*.py") if p.is_file() and not any(
        part in ("site-packages", "dist-packages") or part.startswith(".") for part in p.relative_to(source).parts))
    if s.max_files:  # --tiny: a few small top-level modules
        files = [p for p in files if len(p.relative_to(source).parts) == 1 and p.stat().st_size <= 16_000]
        files = files[: s.max_files]
    target = work / "stdlib"
    shutil.rmtree(target, ignore_errors=True)
    for path in files:
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    if not files:
        raise ValueError(f"no .py files under {source}")
    return target, dict(source=str(source), python=platform.python_version(), files=len(files),
                        bytes=sum(p.stat().st_size for p in files))


def prepare_tokenizer(s: Settings, data: Path, work: Path) -> tuple[Path, str, int]:
    """One byte-level BPE for every model, trained on the training split the trainer will use (same
    files, same hash-ranked split), so no held-out text shapes the vocabulary."""
    train_files, _ = train_data.split_files(train_data.list_files([data]), s.heldout_fraction)
    backend = train_data.train_tokenizer(train_data.read_corpus(train_files).documents, s.vocab_size)
    directory = work / "tokenizer"
    shutil.rmtree(directory, ignore_errors=True)
    train_data.save_tokenizer(backend, directory)
    digest = hashlib.sha1((directory / "tokenizer.json").read_bytes()).hexdigest()
    vocab = -(-Tokenizer.from_dir(directory).vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE  # as the trainer pads
    return directory, digest, vocab


# ---- phase 1: the language model, through the library's trainer ----------------------------------------

def train_language_model(s: Settings, pattern: str, data: Path, tokenizer: Path, run_dir: Path, out: Path,
                         name: str) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # the trainer refuses to overwrite a run
    start = time.perf_counter()
    result = train(lm_config(s, pattern, data, tokenizer, run_dir))
    records = read_log(run_dir / LOG_FILE)
    shutil.copyfile(run_dir / LOG_FILE, out / f"{slug(name)}.lm_log.jsonl")
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # optimizer state: ~12 bytes a parameter
    begin = next(r for r in records if r["event"] == "start")
    speeds = [r["tokens_per_s"] for r in records if r["event"] == "train"]
    warm = max(2, len(speeds) // 10)  # the first steps pay CUDA, allocator and kernel warm-up
    heldout = result.heldout_loss
    return dict(tokens=result.tokens_seen, steps=result.steps, seq_len=s.seq_len, batch_rows=s.batch_rows,
                lr=s.lm_lr, train_loss=result.train_loss, heldout_loss=heldout,
                heldout_ppl=math.exp(heldout) if heldout is not None else None,
                heldout_tokens_evaluated=min(s.eval_rows * s.seq_len, begin["heldout_tokens"]),
                heldout_tokens=begin["heldout_tokens"], train_tokens_available=begin["train_tokens"],
                parameters=begin["parameters"], device=begin["device"],
                tokens_per_s=statistics.median(speeds[warm:] or speeds), tokens_per_s_overall=result.tokens_per_s,
                train_time_s=sum(s.seq_len * s.batch_rows / v for v in speeds),
                wall_time_s=time.perf_counter() - start)


# ---- phase 2: MQAR ---------------------------------------------------------------------------------------

def mqar_batch(s: Settings, rows: int, seq_len: int, pairs: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoology's multi-query associative recall: `pairs` distinct keys each followed by its value, then the
    keys again as queries at even offsets drawn from a power law (most close to the pairs, some far), random
    filler tokens elsewhere. The target at a query is its value; every other target is ignored."""
    context = 2 * pairs
    slots = (seq_len - context) // 2
    if slots < pairs or pairs > s.mqar_keys or s.mqar_vocab <= 2 * s.mqar_keys:
        raise ValueError(f"MQAR: {pairs} pairs need at least {pairs} keys (have {s.mqar_keys}), a sequence longer "
                         f"than {seq_len} and a vocabulary larger than 2 x keys ({s.mqar_vocab})")
    keys = torch.rand(rows, s.mqar_keys, generator=generator).argsort(dim=1)[:, :pairs]  # [R, P] distinct
    values = s.mqar_keys + torch.rand(rows, s.mqar_keys, generator=generator).argsort(dim=1)[:, :pairs]
    inputs = torch.randint(2 * s.mqar_keys, s.mqar_vocab, (rows, seq_len), generator=generator)  # fillers
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    weights = torch.arange(1, slots + 1, dtype=torch.float) ** (0.01 - 1.0)  # Zoology's power_a = 0.01
    gaps = torch.multinomial(weights.expand(rows, slots), pairs, replacement=False, generator=generator)
    positions = context + 2 * gaps  # [R, P]
    inputs.scatter_(1, positions, keys)
    targets = torch.full((rows, seq_len), IGNORE_INDEX).scatter_(1, positions, values)
    return inputs, targets  # [R, T] each


def train_mqar(s: Settings, lm: TrainConfig, device: torch.device, out: Path, name: str) -> dict:
    """The same architecture with the MQAR vocabulary, trained from scratch on both tasks (one micro-batch
    of each per step, equal weight), then scored on fixed held-out examples (the same for every model)."""
    start = time.perf_counter()
    model = build_empty_model(lm.model_config(s.mqar_vocab), device, torch.float32)
    model.init_weights(std=lm.init_std, seed=s.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": lm.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=s.mqar_lr, betas=(0.9, 0.95))
    warmup = max(1, s.mqar_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, s.mqar_steps, 0.1))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(s.seed)  # the same training stream for every model
    log_path = out / f"{slug(name)}.mqar_log.jsonl"
    log_path.write_text("")
    step_times = []
    tokens_per_step = sum(max(1, s.mqar_batch_tokens // n) * n for n, _ in s.mqar_tasks)
    model.train()
    for step in range(1, s.mqar_steps + 1):
        step_start = time.perf_counter()
        record = {"step": step}
        for seq_len, pairs in s.mqar_tasks:
            inputs, targets = (t.to(device) for t in mqar_batch(s, max(1, s.mqar_batch_tokens // seq_len), seq_len,
                                                                pairs, generator))
            with autocast:
                logits = model(inputs)  # [R, T, V]
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
            (loss / len(s.mqar_tasks)).backward()
            answers = targets != IGNORE_INDEX
            record[f"loss_{seq_len}"] = float(loss.detach())  # syncs: the step time below is the GPU's too
            record[f"accuracy_{seq_len}"] = float((logits.detach().argmax(-1)[answers] == targets[answers]).float().mean())
        torch.nn.utils.clip_grad_norm_(model.parameters(), lm.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - step_start)
        with log_path.open("a") as f:
            f.write(json.dumps({**record, "time_s": step_times[-1]}) + "\n")
        if step % max(1, s.mqar_steps // 6) == 0 or step == s.mqar_steps:
            log(f"  mqar step {step}/{s.mqar_steps}  " + "  ".join(
                f"L={n}: loss {record[f'loss_{n}']:.3f} acc {record[f'accuracy_{n}']:.3f}" for n, _ in s.mqar_tasks)
                + f"  {step_times[-1] * 1e3:.0f} ms/step")
    train_time = time.perf_counter() - start
    tasks = [dict(seq_len=n, kv_pairs=p, **evaluate_mqar(s, model, n, p, device, autocast)) for n, p in s.mqar_tasks]
    warm = max(2, len(step_times) // 10)
    return dict(steps=s.mqar_steps, lr=s.mqar_lr, batch_tokens_per_task=s.mqar_batch_tokens, vocab=s.mqar_vocab,
                keys=s.mqar_keys, parameters=model.num_parameters(), tasks=tasks,
                tokens_per_s=tokens_per_step / statistics.median(step_times[warm:] or step_times),
                train_time_s=train_time, wall_time_s=time.perf_counter() - start)


@torch.no_grad()
def evaluate_mqar(s: Settings, model: HybridLM, seq_len: int, pairs: int, device: torch.device, autocast) -> dict:
    generator = torch.Generator().manual_seed(s.seed + 1_000_003 * seq_len)  # disjoint from the training stream
    rows = max(1, s.mqar_batch_tokens // seq_len)
    examples = -(-s.mqar_eval_answers // pairs)
    correct = total = 0
    model.eval()
    for begin in range(0, examples, rows):
        inputs, targets = (t.to(device) for t in mqar_batch(s, min(rows, examples - begin), seq_len, pairs, generator))
        with autocast:
            predictions = model(inputs).argmax(-1)
        answers = targets != IGNORE_INDEX
        correct += int((predictions[answers] == targets[answers]).sum())
        total += int(answers.sum())
    model.train()
    return dict(accuracy=correct / total, answers=total, examples=examples, chance=1.0 / s.mqar_keys)


# ---- one model, the whole study --------------------------------------------------------------------------

def run_model(s: Settings, name: str, data: Path, tokenizer: Path, vocab: int, work: Path, out: Path,
              device: torch.device, common: dict) -> dict:
    start = time.perf_counter()
    pattern = pattern_of(name)
    result = dict(study=STUDY, model=name, pattern=pattern, **describe(s, pattern, vocab), **common)
    log(f"== {name}: layers {result['layers']}, {result['parameters'] / 1e6:.2f}M parameters, "
        f"state + KV at {s.memory_tokens} tokens {result['memory']['total_mib']:.1f} MiB")
    result["lm"] = train_language_model(s, pattern, data, tokenizer, work / "runs" / slug(name), out, name)
    lm = result["lm"]
    log(f"  language model: {lm['tokens']:,} tokens, held-out loss {lm['heldout_loss']:.4f} "
        f"(ppl {lm['heldout_ppl']:.2f}), {lm['tokens_per_s']:,.0f} tok/s (median), {lm['wall_time_s']:.0f} s")
    config = lm_config(s, pattern, data, tokenizer, work / "runs" / slug(name))
    result["mqar"] = train_mqar(s, config, device, out, name)
    log("  mqar: " + ", ".join(f"L={t['seq_len']} ({t['kv_pairs']} pairs) accuracy {t['accuracy']:.3f}"
                               for t in result["mqar"]["tasks"])
        + f", {result['mqar']['tokens_per_s']:,.0f} tok/s, {result['mqar']['wall_time_s']:.0f} s")
    result["wall_time_s"] = time.perf_counter() - start
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return result


def gdn_path(device: torch.device) -> str:
    if device.type != "cuda":
        return "reference (plain PyTorch)"
    from hybridlm.ops import dispatch

    return "Triton chunk_gdn (forward + backward)" if dispatch.kernels() is not None else "reference (plain PyTorch)"


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


class Tee:
    """Write to the console and to the study's log file."""

    def __init__(self, stream, file) -> None:
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def teeing(path: Path):
    with path.open("a") as file:
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(stdout, file), Tee(stderr, file)
        handler = logging.StreamHandler(sys.stdout)
        package = logging.getLogger("hybridlm")
        package.addHandler(handler)
        level = package.level
        package.setLevel(logging.INFO)
        try:
            yield
        finally:
            package.removeHandler(handler)
            package.setLevel(level)
            sys.stdout, sys.stderr = stdout, stderr


def run_study(s: Settings, names: list[str], out: Path, work: Path, source: Path | None, deadline_s: float) -> None:
    began = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    with teeing(out / "ratio_study.log"):
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        log(f"ratio study: {', '.join(names)} on {device_name}, torch {torch.__version__}, Python "
            f"{platform.python_version()}, commit {git_commit()}")
        data, corpus = prepare_corpus(s, work, source)
        tokenizer, digest, vocab = prepare_tokenizer(s, data, work)
        log(f"data: {corpus['files']} files, {corpus['bytes'] / 1e6:.1f} MB from {corpus['source']}; tokenizer "
            f"{vocab} ids (sha1 {digest[:12]}), {time.perf_counter() - began:.0f} s")
        sizes = {n: describe(s, pattern_of(n), vocab)["parameters"] for n in dict.fromkeys([*MODELS, *names])}
        spread = max(sizes.values()) / min(sizes.values()) - 1
        log("parameters: " + ", ".join(f"{n} {p / 1e6:.3f}M" for n, p in sizes.items()) + f" (spread {spread:.2%})")
        if spread > 0.05:
            log(f"WARNING: parameter counts differ by {spread:.1%} (> 5%): not a matched comparison")
        common = dict(settings=dataclasses.asdict(s), settings_sha1=hashlib.sha1(
            json.dumps(dataclasses.asdict(s), sort_keys=True).encode()).hexdigest(), tokenizer_sha1=digest,
            vocab=vocab, corpus=corpus, device=device_name, gdn_path=gdn_path(device), torch=torch.__version__,
            commit=git_commit())
        longest = 0.0
        for name in names:
            elapsed = time.perf_counter() - began
            if deadline_s and longest and elapsed + 1.15 * longest > deadline_s:
                log(f"SKIPPED {name}: {elapsed:.0f} s gone, the slowest model took {longest:.0f} s and the deadline is "
                    f"{deadline_s:.0f} s; run it in another invocation with the same settings")
                continue
            try:
                result = run_model(s, name, data, tokenizer, vocab, work, out, device, common)
            except Exception as error:  # one failed model must not cost the others their GPU time
                log(f"FAILED {name}: {error!r}\n{traceback.format_exc()}")
                result = dict(study=STUDY, model=name, pattern=pattern_of(name), error=repr(error), **common)
            (out / f"{slug(name)}.json").write_text(json.dumps(result, indent=2) + "\n")
            longest = max(longest, result.get("wall_time_s", 0.0))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        log(f"done in {time.perf_counter() - began:.0f} s; results in {out}")


# ---- --report: table, plot, findings ---------------------------------------------------------------------

def load_results(directories: list[Path]) -> list[dict]:
    found: dict[str, dict] = {}
    for directory in directories:
        for path in sorted(Path(directory).glob("*.json")):
            result = json.loads(path.read_text())
            if not isinstance(result, dict) or result.get("study") != STUDY:
                continue
            previous = found.get(result["model"])
            if previous is None or result.get("finished_at", "") >= previous.get("finished_at", ""):
                found[result["model"]] = {**result, "_dir": str(directory)}
    if not found:
        raise ValueError(f"no {STUDY} results (*.json) in {', '.join(map(str, directories))}")
    # most attention first: all-attn, 1:1, 3:1, 7:1, all-gdn
    return sorted(found.values(), key=lambda r: (-r["pattern"].count("A") / len(r["pattern"]), r["model"]))


def consistency_notes(results: list[dict]) -> list[str]:
    notes = []
    for key, what in (("settings_sha1", "settings"), ("tokenizer_sha1", "tokenizer"), ("gdn_path", "GDN path"),
                      ("device", "device")):
        values = {r.get(key) for r in results}
        if len(values) > 1:
            notes.append(f"**Warning:** the models differ in {what} ({', '.join(sorted(map(str, values)))}): "
                         "they are not a matched comparison.")
    failed = [r["model"] for r in results if "error" in r]
    if failed:
        notes.append(f"**Failed:** {', '.join(failed)} (see their JSON for the error).")
    missing = [m for m in MODELS if m not in {r["model"] for r in results}]
    if missing:
        notes.append(f"**Not run:** {', '.join(missing)}.")
    return notes


def table(results: list[dict]) -> str:
    done = [r for r in results if "error" not in r]
    tasks = [(t["seq_len"], t["kv_pairs"]) for t in done[0]["mqar"]["tasks"]] if done else []
    header = (["model", "layers", "params", "LM tokens", "LM train tok/s", "held-out loss", "ppl"]
              + [f"MQAR {n} ({p} kv)" for n, p in tasks]
              + ["MQAR train tok/s", f"state + KV @ {done[0]['memory']['tokens'] // 1024}k" if done else "memory", "wall"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['pattern']} | failed: {r['error'][:60]} |" + " |" * (len(header) - 3))
            continue
        lm, memory = r["lm"], r["memory"]
        cells = [r["model"], f"`{r['layers']}`", f"{r['parameters'] / 1e6:.2f}M", f"{lm['tokens']:,}",
                 f"{lm['tokens_per_s'] / 1e3:,.1f}k", f"{lm['heldout_loss']:.4f}", f"{lm['heldout_ppl']:.2f}"]
        cells += [f"{t['accuracy']:.3f}" for t in r["mqar"]["tasks"]]
        cells += [f"{r['mqar']['tokens_per_s'] / 1e3:,.1f}k",
                  f"{memory['total_mib']:.1f} MiB ({memory['state_bytes'] / 2**20:.2f} state)", f"{r['wall_time_s']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if "error" not in r]
    names = [r["model"] for r in done]
    x = range(len(done))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), dpi=100)
    ax = axes[0][0]
    for r in done:
        curve = [(e["tokens"], e["loss"]) for e in r.get("_lm_log", []) if e["event"] == "train"]
        if curve:
            tokens, losses = zip(*curve)
            window = max(1, len(losses) // 20)
            smooth = [statistics.fmean(losses[max(0, i - window):i + 1]) for i in range(len(losses))]
            ax.plot(tokens, smooth, label=r["model"])
    ax.set(title="LM training loss (trailing mean)", xlabel="tokens", ylabel="nats / token")
    ax.legend()
    ax = axes[0][1]
    ax.bar(x, [r["lm"]["heldout_loss"] for r in done], color="tab:orange")
    low = min(r["lm"]["heldout_loss"] for r in done)
    ax.set_ylim(low - 0.3, max(r["lm"]["heldout_loss"] for r in done) + 0.1)
    ax.set(title="held-out loss (lower is better)", xticks=list(x), xticklabels=names, ylabel="nats / token")
    ax = axes[0][2]
    tasks = done[0]["mqar"]["tasks"]
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        ax.bar([j + i * width for j in x], [r["mqar"]["tasks"][i]["accuracy"] for r in done], width,
               label=f"L={task['seq_len']}, {task['kv_pairs']} pairs")
    ax.axhline(tasks[0]["chance"], color="grey", linestyle=":", label="chance")
    ax.set(title=f"MQAR accuracy after {done[0]['mqar']['steps']} steps", xticks=[j + 0.4 - width / 2 for j in x],
           xticklabels=names, ylim=(0, 1))
    ax.legend()
    ax = axes[1][0]
    ax.bar([j - 0.2 for j in x], [r["lm"]["tokens_per_s"] / 1e3 for r in done], 0.4,
           label=f"LM (packed rows of {done[0]['lm']['seq_len']})")
    ax.bar([j + 0.2 for j in x], [r["mqar"]["tokens_per_s"] / 1e3 for r in done], 0.4, label="MQAR (both lengths)")
    ax.set(title="training throughput", xticks=list(x), xticklabels=names, ylabel="k tokens / s")
    ax.legend()
    ax = axes[1][1]
    ax.bar(x, [r["memory"]["kv_bytes"] / 2**20 for r in done], label="KV cache (bf16)")
    ax.bar(x, [r["memory"]["state_bytes"] / 2**20 for r in done], bottom=[r["memory"]["kv_bytes"] / 2**20 for r in done],
           label="GDN state (fp32 + bf16 conv)")
    ax.set(title=f"inference cache, one {done[0]['memory']['tokens']}-token sequence", xticks=list(x),
           xticklabels=names, ylabel="MiB")
    ax.legend()
    ax = axes[1][2]
    last = done[0]["mqar"]["tasks"][-1]["seq_len"]
    for r in done:
        curve = r.get("_mqar_log", [])
        if curve:
            accuracies = [e[f"accuracy_{last}"] for e in curve]
            window = max(1, len(accuracies) // 20)
            ax.plot([e["step"] for e in curve],
                    [statistics.fmean(accuracies[max(0, i - window):i + 1]) for i in range(len(accuracies))],
                    label=r["model"])
    ax.set(title=f"MQAR training accuracy, L={last}", xlabel="step", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def findings(results: list[dict]) -> list[str]:
    """Where 3:1 stands on each measure, with the numbers; ties within LOSS_TIE / ACCURACY_TIE / SPEED_TIE."""
    done = {r["model"]: r for r in results if "error" not in r}
    hybrid = done.get("3:1")
    if hybrid is None:
        return ["3:1 is not among the finished models: no verdict."]
    measures = [("held-out loss", lambda r: r["lm"]["heldout_loss"], False, LOSS_TIE, "{:.4f}", "absolute")]
    for i, task in enumerate(hybrid["mqar"]["tasks"]):
        measures.append((f"MQAR accuracy at {task['seq_len']} ({task['kv_pairs']} pairs)",
                         lambda r, i=i: r["mqar"]["tasks"][i]["accuracy"], True, ACCURACY_TIE, "{:.3f}", "absolute"))
    measures += [("LM training tokens/s", lambda r: r["lm"]["tokens_per_s"], True, SPEED_TIE, "{:,.0f}", "relative"),
                 (f"state + KV at {hybrid['memory']['tokens']} tokens", lambda r: r["memory"]["total_mib"], False, 0.0,
                  "{:.1f} MiB", "relative")]
    wins, ties, losses, lines = [], [], [], []
    for label, value, higher, tie, form, kind in measures:
        ranked = sorted(done, key=lambda m: value(done[m]), reverse=higher)
        best = ranked[0]
        mine, top = value(hybrid), value(done[best])
        gap = abs(mine - top) if kind == "absolute" else abs(mine - top) / max(abs(top), 1e-12)
        if best == "3:1":
            runner = ranked[1] if len(ranked) > 1 else None
            margin = "" if runner is None else f", next {runner} at {form.format(value(done[runner]))}"
            (wins if runner is None or _gap(mine, value(done[runner]), kind) > tie else ties).append(label)
            lines.append(f"- {label}: 3:1 is best ({form.format(mine)}{margin}).")
        else:
            (ties if gap <= tie else losses).append(label)
            lines.append(f"- {label}: 3:1 ranks {ranked.index('3:1') + 1} of {len(ranked)} ({form.format(mine)}); "
                         f"best is {best} ({form.format(top)}).")
    summary = (f"**Verdict (generated from the numbers above).** 3:1 wins clearly on: {_join(wins)}. Ties with the "
               f"best (within {LOSS_TIE} nats, {ACCURACY_TIE:.0%} accuracy, {SPEED_TIE:.0%} speed) on: {_join(ties)}. "
               f"Loses on: {_join(losses)}.")
    if "all-attn" in done:
        attention = done["all-attn"]
        summary += (f" Against all-attention its cache at {hybrid['memory']['tokens']} tokens is {hybrid['memory']['total_mib']:.1f} vs "
                    f"{attention['memory']['total_mib']:.1f} MiB and it trains at "
                    f"{hybrid['lm']['tokens_per_s'] / attention['lm']['tokens_per_s']:.2f}x the tokens/s.")
    return lines + ["", summary]


def _gap(a: float, b: float, kind: str) -> float:
    return abs(a - b) if kind == "absolute" else abs(a - b) / max(abs(b), 1e-12)


def _join(items: list[str]) -> str:
    return ", ".join(items) or "nothing"


def write_report(directories: list[Path], doc: Path) -> str:
    results = load_results(directories)
    for r in results:  # the training curves, from the logs beside each JSON
        for key, suffix in (("_lm_log", "lm_log.jsonl"), ("_mqar_log", "mqar_log.jsonl")):
            path = Path(r["_dir"]) / f"{slug(r['model'])}.{suffix}"
            if path.is_file():
                r[key] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    image = doc.with_suffix(".png")
    done = [r for r in results if "error" not in r]
    if done:
        plot(results, image)
    first = done[0] if done else results[0]
    s = first.get("settings", {})
    lines = [RESULTS_BEGIN, "## Results", "",
             f"Run on {first.get('device')}, GDN ops: {first.get('gdn_path')}, torch {first.get('torch')}, commit "
             f"{first.get('commit')}; data: {first.get('corpus', {}).get('files')} files of Python "
             f"{first.get('corpus', {}).get('python')}'s standard library. One seed per model.", ""]
    notes = consistency_notes(results)
    lines += notes + [""] if notes else []
    lines += [table(results), ""]
    if done:
        lines += [f"![ratio study]({image.name})", ""]
        lm = first["lm"]
        lines += [f"LM: {lm['tokens']:,} tokens each ({lm['steps']} steps of {s.get('batch_rows')} x {s.get('seq_len')}), "
                  f"held-out loss over {lm['heldout_tokens_evaluated']:,} held-out tokens. MQAR: {first['mqar']['steps']} "
                  f"steps, {s.get('mqar_batch_tokens')} tokens per task and step, accuracy over "
                  f"{first['mqar']['tasks'][0]['answers']:,} held-out answers per length (chance "
                  f"{first['mqar']['tasks'][0]['chance']:.3f}). Tokens/s: median step after warm-up.", "",
                  "### Findings", ""] + findings(results) + [""]
    lines.append(RESULTS_END)
    section = "\n".join(lines)
    text = doc.read_text()
    if RESULTS_BEGIN not in text or RESULTS_END not in text:
        raise ValueError(f"{doc} has no {RESULTS_BEGIN} ... {RESULTS_END} section to replace")
    head, rest = text.split(RESULTS_BEGIN, 1)
    doc.write_text(head + section + rest.split(RESULTS_END, 1)[1])
    merged = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    doc.with_name(doc.stem + "_results.json").write_text(json.dumps(merged, indent=2) + "\n")
    return section


# ---- command line ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: all-attn, 1:1, 3:1, 7:1, all-gdn, N:1")
    parser.add_argument("--out", type=Path, default=Path("ratio_study_results"), help="per-model JSON and logs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hybridlm_ratio_study"), help="data, tokenizer, runs")
    parser.add_argument("--data", type=Path, default=None, help="a folder of .py files instead of the stdlib")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and budgets: seconds on a CPU")
    parser.add_argument("--lm-tokens", type=int, help=f"LM token budget per model (default {FULL.lm_tokens:,})")
    parser.add_argument("--mqar-steps", type=int, help=f"MQAR optimizer steps per model (default {FULL.mqar_steps})")
    parser.add_argument("--deadline-min", type=float, default=9.0,
                        help="skip a model that would end past this many minutes of this invocation (0: never)")
    parser.add_argument("--report", type=Path, nargs="+", metavar="RESULTS_DIR",
                        help="merge these result folders into --doc's results section, a PNG and a JSON beside it")
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "ratio_study.md")
    args = parser.parse_args(argv)
    if args.report:
        print(write_report(args.report, args.doc))
        print(f"wrote {args.doc}, {args.doc.with_suffix('.png')}, {args.doc.with_name(args.doc.stem + '_results.json')}")
        return
    settings = TINY if args.tiny else FULL
    if args.tiny and not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny ops: on a busy CPU, threads waiting on each other cost more than they give
    overrides = {k: v for k, v in (("lm_tokens", args.lm_tokens), ("mqar_steps", args.mqar_steps)) if v is not None}
    settings = dataclasses.replace(settings, **overrides)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for name in names:
        pattern_of(name)  # fail before any work on a typo
    run_study(settings, names, args.out, args.work, args.data, args.deadline_min * 60)


if __name__ == "__main__":
    main()
