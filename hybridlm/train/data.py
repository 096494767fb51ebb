"""Training data: read a corpus, train (or reuse) a tokenizer, pack documents into rows.

Documents are text or code files (one file, one document) or JSONL lines (a string, or an object with
"text" or "content"). Each document is followed by the separator `<|endoftext|>`, the documents are
concatenated and cut into rows of `seq_len + 1` tokens (consecutive rows share one token, so every token
is a target exactly once). A row keeps its document boundaries: `Batch.cu_seqlens` restarts positions,
attention and the recurrent state at each one, and the target of a document's last token (the
separator, whose successor is the next document's first token) is masked with -100.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from hybridlm.io.tokenizer import GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Tokenizer
from hybridlm.ops.varlen import attach_host_bounds, host_bounds
from hybridlm.train.recipe import SPECIAL_TOKENS

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # cross_entropy's ignore_index: a position with no target
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSONL_TEXT_KEYS = ("text", "content")
# Copied from a checkpoint whose tokenizer is reused (same names as hybridlm.io.checkpoint.TOKENIZER_FILES
# minus the multimodal preprocessor files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt")

# The GPT-4-style pre-tokenisation split that Qwen2+ tokenizers use: contractions, letter runs, single
# digits, punctuation runs, newlines, whitespace (code keeps its indentation as whitespace runs).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Our own ChatML-style template: <|im_start|>role\ncontent<|im_end|>\n per message. Content may be a string
# or a list of {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = """\
{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.content is string %}
{{- message.content }}
{%- elif message.content is defined %}
{%- for part in message.content %}
{%- if part.type == 'text' %}{{- part.text }}{%- endif %}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


# ---- corpus ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceFile:
    path: Path
    key: str  # path inside the folder it was found in: decides the held-out split, wherever the folder lives


def list_files(paths: Sequence[str | Path]) -> list[SourceFile]:
    """Files named directly, and every non-hidden file under named folders, in sorted order."""
    found: dict[Path, SourceFile] = {}
    for given in paths:
        root = Path(given)
        if root.is_file():
            found.setdefault(root.resolve(), SourceFile(root, root.name))
        elif root.is_dir():
            for path in sorted(root.rglob("*")):
                relative = path.relative_to(root)
                if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                    found.setdefault(path.resolve(), SourceFile(path, relative.as_posix()))
        else:
            raise FileNotFoundError(f"training data {str(root)!r} is neither a file nor a folder")
    return list(found.values())


def read_documents(path: Path) -> list[str]:
    """The documents of one file: its text, or one per JSONL line. Binary / non-UTF-8 files give none."""
    raw = path.read_bytes()
    if b"\0" in raw[:8192]:
        return []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return []
    if path.suffix.lower() not in JSONL_SUFFIXES:
        return [text] if text.strip() else []
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON: {error}") from None
        if isinstance(record, dict):
            record = next((record[k] for k in JSONL_TEXT_KEYS if isinstance(record.get(k), str)), None)
        if not isinstance(record, str):
            raise ValueError(f"{path}:{number}: a JSONL line must be a string or an object with a string "
                             f"{' or '.join(repr(k) for k in JSONL_TEXT_KEYS)}")
        if record.strip():
            documents.append(record)
    return documents


@dataclass
class Corpus:
    documents: list[str]
    files: list[Path]
    skipped: list[Path]  # binary or non-UTF-8 files

    @property
    def num_bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.documents)


def read_corpus(files: Sequence[SourceFile]) -> Corpus:
    corpus = Corpus([], [], [])
    for source in files:
        documents = read_documents(source.path)
        if documents:
            corpus.documents.extend(documents)
            corpus.files.append(source.path)
        elif source.path.stat().st_size:
            corpus.skipped.append(source.path)
    if corpus.skipped:
        logger.warning("skipped %d binary or non-UTF-8 file(s), e.g. %s", len(corpus.skipped), corpus.skipped[0])
    return corpus


def split_files(files: Sequence[SourceFile], heldout_fraction: float) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, held-out) by whole files. Files are ranked by a hash of their key, so the split is stable
    across seeds and machines, and adding a file never moves another one."""
    if heldout_fraction <= 0 or len(files) < 2:
        return list(files), []
    count = min(len(files) - 1, max(1, round(heldout_fraction * len(files))))
    ranked = sorted(files, key=lambda f: hashlib.sha1(f.key.encode()).hexdigest())
    heldout = {f.path for f in ranked[:count]}
    return [f for f in files if f.path not in heldout], [f for f in files if f.path in heldout]


# ---- tokenizer ---------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], vocab_size: int) -> BackendTokenizer:
    """A byte-level BPE of at most `vocab_size` ids, laid out like Qwen's: NFC, the GPT-4 split, byte
    fallback through the 256-symbol alphabet (no unknown token), special tokens first."""
    tokenizer = BackendTokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(backend: BackendTokenizer, directory: str | Path) -> None:
    """tokenizer.json, tokenizer_config.json (with our ChatML template) and generation_config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / TOKENIZER_FILE))
    ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
    end_of_text, _, im_end = SPECIAL_TOKENS
    added_tokens_decoder = {
        str(ids[token]): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}
        for token in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": None,
        "eos_token": end_of_text,
        "pad_token": end_of_text,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    generation = {"eos_token_id": [ids[end_of_text], ids[im_end]], "pad_token_id": ids[end_of_text]}
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")


def copy_tokenizer(source: str | Path, directory: str | Path) -> None:
    """Reuse a checkpoint's tokenizer: copy its tokenizer files."""
    source, directory = Path(source), Path(directory)
    if not (source / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {source}: cannot reuse its tokenizer")
    directory.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)


def document_separator(tokenizer: Tokenizer) -> int:
    """The token that ends every document: <|endoftext|>, else the tokenizer's first end-of-sequence id."""
    separator = tokenizer.token_to_id(SPECIAL_TOKENS[0])
    if separator is None and tokenizer.eos_token_ids:
        separator = tokenizer.eos_token_ids[0]
    if separator is None:
        raise ValueError(f"the tokenizer has no {SPECIAL_TOKENS[0]} and no end-of-sequence token to end documents with")
    return separator


def tokenize(tokenizer: Tokenizer, documents: Sequence[str], batch: int = 1024) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(documents), batch):
        encodings = tokenizer.backend.encode_batch(list(documents[start:start + batch]), add_special_tokens=False)
        out.extend(e.ids for e in encodings)
    return out


# ---- packing -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batch:
    """R rows flattened into one packed row: HybridLM packs documents of one row (B = 1), and rows are
    independent, so R rows of S tokens are one row of R*S tokens whose cu_seqlens also cut every row."""

    input_ids: torch.Tensor  # [1, R*S]
    targets: torch.Tensor  # [1, R*S], IGNORE_INDEX where no target
    cu_seqlens: torch.Tensor  # [N+1], document (and row) starts, then R*S

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        bounds = host_bounds(self.cu_seqlens)  # on the host already: the kernels then never read it back
        return Batch(self.input_ids.to(device), self.targets.to(device),
                     attach_host_bounds(self.cu_seqlens.to(device), bounds))


class PackedRows:
    """Documents (each followed by `separator`) concatenated and cut into rows of `seq_len + 1` tokens.

    Row i covers stream tokens [i*S, i*S + S]: its inputs are the first S, its targets the last S. The
    last row is padded with `separator`, in a padding segment of its own whose targets are masked.
    """

    def __init__(self, documents: Sequence[Sequence[int]], seq_len: int, separator: int, seed: int | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        order = list(range(len(documents)))
        if seed is not None:  # mix files before packing; rows are shuffled again every epoch
            random.Random(seed).shuffle(order)
        lengths = [len(documents[i]) + 1 for i in order]
        total = sum(lengths)
        self.seq_len = seq_len
        self.num_documents = sum(1 for n in lengths if n > 1)
        self.num_tokens = total  # real tokens, separators included
        self.num_rows = max(1, -(-(total - 1) // seq_len))
        padded = self.num_rows * seq_len + 1
        tokens = torch.full((padded,), separator, dtype=torch.int32)
        document = torch.full((padded,), -1, dtype=torch.int32)  # -1: padding
        position = 0
        for index, length in zip(order, lengths):
            tokens[position:position + length - 1] = torch.as_tensor(documents[index], dtype=torch.int32)
            document[position:position + length] = index
            position += length
        self.tokens, self.document = tokens, document  # [num_rows * S + 1]

    def __len__(self) -> int:
        return self.num_rows

    def fingerprint(self) -> str:
        """A hash of the packed stream: a resumed run checks that it reads the data it stopped in."""
        return hashlib.sha1(self.tokens.numpy().tobytes() + self.document.numpy().tobytes()).hexdigest()

    def batch(self, rows: Sequence[int], valid: Sequence[bool] | None = None) -> Batch:
        """The rows `rows`, flattened; rows whose `valid` entry is False keep their inputs but have no
        targets (filler that lets every process run the same number of forward passes)."""
        if not rows:
            raise ValueError("a batch needs at least one row")
        S = self.seq_len
        rows_t = torch.as_tensor(list(rows), dtype=torch.long)
        if int(rows_t.min()) < 0 or int(rows_t.max()) >= self.num_rows:
            raise IndexError(f"row index out of range [0, {self.num_rows}): {list(rows)}")
        index = rows_t[:, None] * S + torch.arange(S + 1)  # [R, S+1]
        tokens, document = self.tokens[index].long(), self.document[index]
        inputs = tokens[:, :-1]  # [R, S]
        # A target exists inside a document only: not across a boundary, not in the padding.
        keep = (document[:, 1:] == document[:, :-1]) & (document[:, :-1] >= 0)
        if valid is not None:
            keep &= torch.as_tensor(list(valid), dtype=torch.bool)[:, None]
        targets = torch.where(keep, tokens[:, 1:], torch.full_like(tokens[:, 1:], IGNORE_INDEX))
        starts = torch.ones_like(inputs, dtype=torch.bool)  # a segment starts at each row start ...
        starts[:, 1:] = document[:, 1:-1] != document[:, :-2]  # ... and where the document changes
        cu_seqlens = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([inputs.numel()])])
        return Batch(inputs.reshape(1, -1), targets.reshape(1, -1), cu_seqlens)


class RowOrder:
    """The training stream: position p is row `order(p // n)[p % n]`, each epoch a fresh permutation
    seeded by (seed, epoch). The only state is the position, so resuming is exact."""

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows = num_rows
        self.seed = seed
        self._epoch, self._permutation = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._permutation = epoch, torch.randperm(self.num_rows, generator=generator)
        return self._permutation

    def rows(self, start: int, count: int) -> list[int]:
        return [int(self.permutation(p // self.num_rows)[p % self.num_rows]) for p in range(start, start + count)]
