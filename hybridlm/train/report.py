"""What a training run shows and leaves behind: the progress bar, log.jsonl, loss.png, MODEL_CARD.md."""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
CARD_FILE = "MODEL_CARD.md"


class Progress:
    """A rich progress bar (loss, tokens/s, ETA) on a terminal; otherwise a plain line every `log_every`
    steps on stderr. Silent when `enabled` is False (every process but rank 0)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool, bar: bool, log_every: int) -> None:
        self.enabled, self.log_every, self.total_steps = enabled, log_every, total_steps
        self._bar = None
        if enabled and bar and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("held-out {task.fields[heldout]}"),
                TextColumn("{task.fields[speed]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(file=sys.stderr), transient=False,
            )
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, loss="-",
                                            heldout="-", speed="-")
            self._bar.start()

    def update(self, step: int, loss: float, tokens_per_s: float, eta_s: float) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=f"{loss:.4f}", speed=f"{tokens_per_s:,.0f}")
        elif step % self.log_every == 0 or step == self.total_steps:
            print(f"step {step}/{self.total_steps}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  "
                  f"ETA {_duration(eta_s)}", file=sys.stderr, flush=True)

    def heldout(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, heldout=f"{loss:.4f}")
        else:
            print(f"step {step}/{self.total_steps}  held-out loss {loss:.4f}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class JsonLog:
    """log.jsonl: one JSON object per line ("start", "train", "eval", "checkpoint", "end" events)."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None = None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None and path.is_file():
            # Resuming: records written after the checkpoint belong to the lost part of the run.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif enabled:
            path.write_text("")

    def write(self, event: str, **fields: Any) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"event": event, **fields}) + "\n")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_losses(log_path: Path, png_path: Path) -> bool:
    """loss.png from log.jsonl: training loss (raw and smoothed) and held-out loss against tokens seen.
    Returns False, with a warning, when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'hybridlm[train]'): no %s", png_path.name)
        return False
    records = read_log(log_path)
    train = [(r["tokens"], r["loss"]) for r in records if r["event"] == "train"]
    heldout = [(r["tokens"], r["loss"]) for r in records if r["event"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        x, y = zip(*train)
        window = len(y) // 25  # 4% of the run, centred: smooth without lagging behind
        if window > 1:
            ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8, label="train")
            ax.plot(x, _smooth(y, window), color="tab:blue", linewidth=1.6, label=f"train ({window}-step mean)")
        else:
            ax.plot(x, y, color="tab:blue", linewidth=1.2, label="train")
    if heldout:
        x, y = zip(*heldout)
        ax.plot(x, y, "o-", color="tab:orange", linewidth=1.6, markersize=3, label="held-out")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return True


def _smooth(values: tuple[float, ...], window: int) -> list[float]:
    """Centred moving average; the window shrinks at both ends."""
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def write_model_card(path: Path, facts: dict[str, Any]) -> None:
    f = facts
    heldout = f.get("heldout_loss")
    heldout_text = ("n/a (no held-out data)" if heldout is None
                    else f"{heldout:.4f} (perplexity {math.exp(min(heldout, 50)):.2f})")
    lines = [
        f"# {f['name']}",
        "",
        "A Gated DeltaNet hybrid language model (`qwen3_5_text`) trained from scratch with `hybridlm train`.",
        "",
        "## Model",
        f"- layers: {f['num_layers']}, pattern `{f['pattern']}` (L = Gated DeltaNet, A = gated full attention)",
        f"- hidden size {f['hidden_size']}, parameters {f['parameters']:,}",
        f"- vocabulary {f['vocab_size']} ({f['tokenizer']})",
        "",
        "## Data",
        f"- sources: {', '.join(f['data'])}",
        f"- train: {f['train_files']} file(s), {f['train_documents']} document(s), {f['train_tokens']:,} tokens",
        (f"- held-out: {f['heldout_files']} file(s), {f['heldout_documents']} document(s), "
         f"{f['heldout_tokens']:,} tokens"),
        "",
        "## Training",
        f"- command: `{f['command']}`",
        f"- device: {f['device']} x {f['world_size']} process(es){' with FSDP2' if f['fsdp'] else ''}",
        f"- precision: {f['precision']}",
        (f"- steps: {f['steps']} of {f['batch_size']} rows x {f['seq_len']} tokens; lr {f['lr']} "
         f"(warmup {f['warmup']}, cosine to {f['min_lr']:g})"),
        f"- tokens seen: {f['tokens_seen']:,}",
        (f"- training time: {_duration(f['train_time_s'])} (evaluation and checkpoints excluded), "
         f"{f['tokens_per_s']:,.0f} tokens/s"),
        "",
        "## Results",
        f"- final training loss: {f['train_loss']:.4f}",
        f"- final held-out loss: {heldout_text}",
        "",
        "## Use",
        "```python",
        "from hybridlm import LLM, SamplingParams",
        f"llm = LLM({str(f['model_dir'])!r})",
        "print(llm.generate('Once upon a time', SamplingParams(max_tokens=64))[0].text)",
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
