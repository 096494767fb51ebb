"""Corpus reading, the held-out split, the tokenizer, and packing that never leaks across documents."""
from __future__ import annotations

import pytest
import torch

from hybridlm.config import ModelConfig, layer_types_from_pattern
from hybridlm.io.checkpoint import build_empty_model
from hybridlm.io.tokenizer import Tokenizer
from hybridlm.train import data
from hybridlm.train.data import IGNORE_INDEX, PackedRows, RowOrder

SEPARATOR = 0


def test_corpus_reads_text_code_and_jsonl_and_skips_hidden_and_binary(corpus):
    files = data.list_files([corpus])
    keys = [f.key for f in files]
    assert "code/add.py" in keys and "counts.jsonl" in keys and "blob.bin" in keys
    assert not any(k.startswith(".") for k in keys)
    read = data.read_corpus(files)
    assert [p.name for p in read.skipped] == ["blob.bin"]
    assert len(read.documents) == 12 + 1 + 9  # stories, the .py file, the JSONL lines
    assert "a plain string line is a document too." in read.documents


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: a JSONL line must be a string or an object"):
        data.read_documents(path)
    path.write_text('{"text": "fine"}\n{broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        data.read_documents(path)
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        data.list_files([tmp_path / "missing"])


def test_heldout_split_is_by_whole_files_and_stable(corpus, tmp_path):
    files = data.list_files([corpus])
    train, heldout = data.split_files(files, 0.2)
    assert len(heldout) == round(0.2 * len(files)) and len(train) + len(heldout) == len(files)
    assert not {f.path for f in train} & {f.path for f in heldout}
    # the same split wherever the folder lives, and adding a file moves no other file
    moved = tmp_path / "moved"
    for f in files:
        (moved / f.key).parent.mkdir(parents=True, exist_ok=True)
        (moved / f.key).write_bytes(f.path.read_bytes())
    heldout_keys = {f.key for f in heldout}
    assert {f.key for f in data.split_files(data.list_files([moved]), 0.2)[1]} == heldout_keys
    (moved / "zzz_new.txt").write_text("a new file")
    after = {f.key for f in data.split_files(data.list_files([moved]), 0.2)[1]}
    assert after - heldout_keys <= {"zzz_new.txt"} and len(heldout_keys - after) <= 1
    assert data.split_files(files[:1], 0.5) == (files[:1], [])
    assert data.split_files(files, 0.0) == (files, [])


def test_trained_tokenizer_files_load_in_hybridlm_and_transformers(corpus, tmp_path):
    documents = data.read_corpus(data.list_files([corpus])).documents
    backend = data.train_tokenizer(documents, vocab_size=400)
    data.save_tokenizer(backend, tmp_path)
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.vocab_size <= 400
    assert [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tokenizer.eos_token_ids == [0, 2] and tokenizer.pad_token_id == 0
    assert data.document_separator(tokenizer) == 0
    text = "alice sees the cat. Über naïve café 😀\n    return a + b"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text  # byte-level: every string round-trips, no unknown token
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reference(text, add_special_tokens=False).input_ids == ids
    assert reference.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True) == chat


DOCUMENTS = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33, 34, 35, 36, 37, 38, 39], [41], [51, 52, 53]]


def test_rows_cover_the_stream_and_mask_targets_at_boundaries():
    rows = PackedRows(DOCUMENTS, seq_len=8, separator=SEPARATOR)
    stream = [t for d in DOCUMENTS for t in [*d, SEPARATOR]]  # 25 tokens
    assert rows.num_tokens == len(stream) and rows.num_documents == len(DOCUMENTS)
    assert len(rows) == 3  # ceil((25 - 1) / 8)
    batch = rows.batch(range(len(rows)))
    inputs, targets = batch.input_ids[0].tolist(), batch.targets[0].tolist()
    assert inputs == stream[:24]  # rows overlap by one token, so the inputs are the stream
    # every target is the next token inside a document; a document's last token (its separator) has none
    last_of_document = {len(d) + sum(len(e) + 1 for e in DOCUMENTS[:i]) for i, d in enumerate(DOCUMENTS)}
    for t in range(24):
        expected = IGNORE_INDEX if t in last_of_document else stream[t + 1]
        assert targets[t] == expected, t
    # segments start at every document start and at every row start
    assert batch.cu_seqlens.tolist() == [0, 6, 8, 9, 16, 19, 21, 24]
    assert batch.num_targets == 24 - len(last_of_document & set(range(24)))


def test_last_row_padding_has_no_targets():
    rows = PackedRows([[5, 6, 7]], seq_len=8, separator=SEPARATOR)
    batch = rows.batch([0])
    assert batch.input_ids[0].tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert batch.targets[0].tolist() == [6, 7, 0] + [IGNORE_INDEX] * 5
    assert batch.cu_seqlens.tolist() == [0, 4, 8]  # the padding is a segment of its own
    assert rows.batch([0], valid=[False]).num_targets == 0


def test_row_order_is_a_seeded_permutation_per_epoch():
    order = RowOrder(5, seed=3)
    first, second = order.rows(0, 5), order.rows(5, 5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    assert RowOrder(5, seed=3).rows(7, 4) == (first + second)[7:] + order.rows(10, 1)
    assert RowOrder(5, seed=4).rows(0, 5) != first


def _tiny_model(pattern: str) -> torch.nn.Module:
    config = ModelConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=len(pattern), num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, intermediate_size=64, layer_types=layer_types_from_pattern(pattern, len(pattern)),
    )
    model = build_empty_model(config, torch.device("cpu"), torch.float32)
    model.init_weights(std=0.3, seed=0)  # large weights: any leak would show
    return model.eval()


@torch.no_grad()
def test_no_token_sees_another_document():
    """Changing one document never changes another document's logits, in its own row or another row."""
    model = _tiny_model("LALA")
    documents = [[3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15], [16, 17, 18], [19, 20, 21, 22, 23, 24, 25, 26]]
    rows = PackedRows(documents, seq_len=12, separator=SEPARATOR)
    batch = rows.batch([0, 1])  # row 0: document 0 and the start of document 1; row 1: the rest

    def logits(docs):
        b = PackedRows(docs, seq_len=12, separator=SEPARATOR).batch([0, 1])
        assert torch.equal(b.cu_seqlens, batch.cu_seqlens)
        return model(b.input_ids, cu_seqlens=b.cu_seqlens)[0], model(b.input_ids)[0]

    base, base_unpacked = logits(documents)
    changed, changed_unpacked = logits([documents[0], [40 + t for t in documents[1]], *documents[2:]])
    document_0 = slice(0, 8)  # its 7 tokens and its separator
    document_1_row_0 = slice(8, 12)
    torch.testing.assert_close(changed[document_0], base[document_0], rtol=0, atol=1e-6)
    assert not torch.allclose(changed[document_1_row_0], base[document_1_row_0])
    # the continuation of document 1 in row 1 starts afresh, and documents 2 and 3 are untouched
    torch.testing.assert_close(changed[17:], base[17:], rtol=0, atol=1e-6)
    # the check has teeth: without cu_seqlens the change does reach later documents
    assert not torch.allclose(changed_unpacked[17:], base_unpacked[17:], atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("pattern", ["LL", "AA"])
def test_a_packed_document_matches_the_document_alone(pattern):
    """Positions restart and state starts empty at each document: packed logits equal unpacked ones."""
    model = _tiny_model(pattern)
    documents = [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16]]
    batch = PackedRows(documents, seq_len=16, separator=SEPARATOR).batch([0])
    packed = model(batch.input_ids, cu_seqlens=batch.cu_seqlens)[0]
    start = 0
    for document in documents:
        alone = model(torch.tensor([[*document, SEPARATOR]]))[0]
        end = min(start + len(document) + 1, 16)
        torch.testing.assert_close(packed[start:end], alone[: end - start], rtol=1e-5, atol=1e-5)
        start = end
