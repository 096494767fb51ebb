"""Generation through `hybridlm.LLM` on a tiny random checkpoint: seeds, streaming, stops, limits, chat."""
from __future__ import annotations

import json
import shutil
from collections import defaultdict

import pytest
import torch

import hybridlm
from hybridlm import GenerationResult, SamplingParams

PROMPTS = ["Hello world", "def add(a, b):", "The model reads a token and writes the next one"]
CONTEXT = 512  # max_position_embeddings of the tiny config
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather today?"}]


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kwargs)


def sampled(seed: int, max_tokens: int = 12, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True, **kwargs)


@pytest.fixture(scope="module")
def llm(checkpoint):
    directory, _ = checkpoint("qwen3_5_text")
    return hybridlm.LLM(directory, device="cpu")


def collect(records) -> tuple[dict[int, list], dict[int, str], dict[int, list[int]]]:
    """Group StreamRecords by request: the records, the joined text and the token ids."""
    by_index, texts, tokens = defaultdict(list), defaultdict(str), defaultdict(list)
    for record in records:
        by_index[record.index].append(record)
        texts[record.index] += record.text
        tokens[record.index].append(record.token_id)
    return by_index, texts, tokens


def printable_window(text: str, length: int) -> int:
    """Start of a `length`-character window of printable ASCII nearest the middle of `text`."""
    starts = [i for i in range(1, len(text) - length) if all(" " <= c <= "~" for c in text[i:i + length])]
    assert starts, f"no printable {length}-character window in {text!r}"
    return min(starts, key=lambda i: abs(i - len(text) // 2))


# ---------------------------------------------------------------- seeds
def test_seeded_sampling_is_reproducible(llm):
    first = llm.generate(PROMPTS[0], sampled(seed=5))[0]
    again = llm.generate(PROMPTS[0], sampled(seed=5))[0]
    other = llm.generate(PROMPTS[0], sampled(seed=6))[0]
    assert first.token_ids == again.token_ids and first.text == again.text
    assert first.token_ids != other.token_ids
    assert len(first.token_ids) == 12


def test_seeded_sampling_is_independent_of_batch_mates(llm):
    alone = llm.generate(PROMPTS[0], sampled(seed=11))[0]
    # a longer mate left-pads this prompt; a shorter one is padded itself
    for mate in (PROMPTS[2], "Hi"):
        batch = llm.generate([PROMPTS[0], mate], [sampled(seed=11), sampled(seed=99, max_tokens=5)])
        assert batch[0].token_ids == alone.token_ids
        assert batch[0].text == alone.text
        assert len(batch[1].token_ids) == 5
    twins = llm.generate([PROMPTS[0], PROMPTS[0]], sampled(seed=11))
    assert twins[0].token_ids == twins[1].token_ids == alone.token_ids


def test_greedy_batch_equals_each_prompt_alone(llm):
    params = [greedy(4), greedy(12), greedy(8)]  # rows leave the batch at different steps
    batch = llm.generate(PROMPTS, params)
    for prompt, param, result in zip(PROMPTS, params, batch):
        alone = llm.generate(prompt, param)[0]
        assert result.token_ids == alone.token_ids and result.text == alone.text
        assert len(result.token_ids) == param.max_tokens


def test_greedy_repetition_penalty_matches_transformers(checkpoint, llm):
    _, reference = checkpoint("qwen3_5_text")
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:2]]
    results = llm.generate(prompt_token_ids=prompts, sampling=greedy(12, repetition_penalty=1.5))
    for prompt, result in zip(prompts, results):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                          min_new_tokens=12, do_sample=False, repetition_penalty=1.5,
                                          pad_token_id=0)[0, len(prompt):].tolist()
        assert result.token_ids == expected
    plain = llm.generate(prompt_token_ids=prompts[0], sampling=greedy(12))[0]
    assert plain.token_ids != results[0].token_ids  # the penalty changed the output


# ---------------------------------------------------------------- streaming
def test_stream_deltas_concatenate_to_generate(llm):
    params = [greedy(14), sampled(seed=3, max_tokens=9), greedy(5)]
    results = llm.generate(PROMPTS, params)
    by_index, texts, tokens = collect(llm.stream(PROMPTS, params))
    assert sorted(by_index) == [0, 1, 2]
    for index, result in enumerate(results):
        assert texts[index] == result.text
        assert tokens[index] == result.token_ids
        records = by_index[index]
        assert records[-1].finish_reason == result.finish_reason == "length"
        assert all(r.finish_reason is None for r in records[:-1])
        assert all(isinstance(r, hybridlm.StreamRecord) for r in records)


def test_chat_stream_equals_chat(llm):
    result = llm.chat(MESSAGES, sampling=greedy(10))
    by_index, texts, tokens = collect(llm.chat_stream(MESSAGES, sampling=greedy(10)))
    assert texts[0] == result.text and tokens[0] == result.token_ids
    assert by_index[0][-1].finish_reason == "length"


# ---------------------------------------------------------------- stop strings
@pytest.mark.parametrize("length", [1, 3, 6])
def test_stop_string_cuts_before_it(llm, length):
    full = llm.generate(PROMPTS[1], greedy(32))[0]
    start = printable_window(full.text, length)
    stop = full.text[start:start + length]
    expected = full.text[: full.text.find(stop)]
    params = greedy(32, stop=[stop])
    result = llm.generate(PROMPTS[1], params)[0]
    assert result.text == expected
    assert result.finish_reason == "stop"
    assert len(result.token_ids) < 32
    assert result.token_ids == full.token_ids[: len(result.token_ids)]
    by_index, texts, tokens = collect(llm.stream(PROMPTS[1], params))
    assert all(stop not in record.text for record in by_index[0])
    assert texts[0] == expected and stop not in texts[0]
    assert tokens[0] == result.token_ids
    assert by_index[0][-1].finish_reason == "stop"


def test_first_of_several_stop_strings_wins(llm):
    full = llm.generate(PROMPTS[1], greedy(32))[0]
    early, late = printable_window(full.text[:12], 1), printable_window(full.text, 2)
    early_stop, late_stop = full.text[early], full.text[late:late + 2]
    cut = min(full.text.find(early_stop), full.text.find(late_stop))
    result = llm.generate(PROMPTS[1], greedy(32, stop=[late_stop, early_stop]))[0]
    assert result.text == full.text[:cut] and result.finish_reason == "stop"


@pytest.mark.parametrize("stop", ["NEVER-THERE", "add(a"])  # the second is in the prompt, not the output
def test_stop_string_never_produced_changes_nothing(llm, stop):
    full = llm.generate(PROMPTS[1], greedy(16))[0]
    assert stop not in full.text
    result = llm.generate(PROMPTS[1], greedy(16, stop=stop))[0]
    assert result.text == full.text and result.token_ids == full.token_ids and result.finish_reason == "length"


def test_text_held_for_a_partial_stop_match_is_released_at_the_end(llm):
    full = llm.generate(PROMPTS[1], greedy(16))[0]
    stop = full.text[-2:] + "\x00NEVER"  # the output ends with the start of the stop string
    by_index, texts, _ = collect(llm.stream(PROMPTS[1], greedy(16, stop=stop)))
    assert texts[0] == full.text
    assert by_index[0][-1].finish_reason == "length"
    assert llm.generate(PROMPTS[1], greedy(16, stop=stop))[0].text == full.text


def _last_token_stop(llm, prompt: str) -> tuple[int, str, str] | None:
    """(n, text of n-1 tokens, stop) where the n-th token's text first appears at the very end."""
    for n in range(6, 24):
        before = llm.generate(prompt, greedy(n - 1))[0].text
        after = llm.generate(prompt, greedy(n))[0].text
        stop = after[len(before):]
        if after.startswith(before) and stop and all(" " <= c <= "~" for c in stop) and after.find(stop) == len(before):
            return n, before, stop
    return None


def test_stop_string_in_the_last_allowed_token_finishes_with_stop(llm):
    found = _last_token_stop(llm, PROMPTS[1])
    assert found is not None
    n, before, stop = found
    result = llm.generate(PROMPTS[1], greedy(n, stop=stop))[0]
    assert result.text == before  # the text is cut either way
    assert result.finish_reason == "stop"  # vLLM: a matched stop string is a stop, even on the last token


# ---------------------------------------------------------------- stop tokens, eos, max_tokens
def _first_new_token_at(tokens: list[int], at_least: int) -> int:
    """The first position >= at_least whose token does not occur earlier."""
    return next(i for i in range(at_least, len(tokens)) if tokens[i] not in tokens[:i])


def test_stop_token_ids_end_generation(llm):
    full = llm.generate(PROMPTS[0], greedy(20))[0]
    position = _first_new_token_at(full.token_ids, 2)
    stop_id = full.token_ids[position]
    result = llm.generate(PROMPTS[0], greedy(20, stop_token_ids=[stop_id]))[0]
    assert result.token_ids == full.token_ids[: position + 1]  # the stop token is reported, not decoded
    assert result.finish_reason == "stop"
    shorter = llm.generate(PROMPTS[0], greedy(position))[0]  # the text of the tokens before the stop
    assert result.text == shorter.text
    streamed = list(llm.stream(PROMPTS[0], greedy(20, stop_token_ids=[stop_id])))
    assert [r.token_id for r in streamed] == result.token_ids and streamed[-1].finish_reason == "stop"


@pytest.fixture(scope="module")
def eos_llm(checkpoint, tmp_path_factory, llm):
    """A copy of the checkpoint whose generation_config names a token greedy decoding reaches as eos."""
    directory, _ = checkpoint("qwen3_5_text")
    full = llm.generate(PROMPTS[0], greedy(20))[0]
    position = _first_new_token_at(full.token_ids, 2)
    copy = tmp_path_factory.mktemp("eos") / "checkpoint"
    shutil.copytree(directory, copy)
    config_file = copy / "generation_config.json"
    generation = json.loads(config_file.read_text())
    generation["eos_token_id"] = [full.token_ids[position]]
    config_file.write_text(json.dumps(generation))
    eos_llm = hybridlm.LLM(copy, device="cpu")
    assert full.token_ids[position] in eos_llm.eos_token_ids
    return eos_llm, full, position


def test_eos_ends_generation_unless_ignored(eos_llm):
    eos_llm, full, position = eos_llm
    stopped = eos_llm.generate(PROMPTS[0], SamplingParams(max_tokens=20, temperature=0))[0]
    assert stopped.token_ids == full.token_ids[: position + 1]
    assert stopped.finish_reason == "stop"
    ignored = eos_llm.generate(PROMPTS[0], greedy(20))[0]
    assert ignored.token_ids == full.token_ids and ignored.finish_reason == "length"
    # ignore_eos leaves explicit stop tokens in force
    explicit = eos_llm.generate(PROMPTS[0], greedy(20, stop_token_ids=[full.token_ids[position]]))[0]
    assert explicit.token_ids == stopped.token_ids and explicit.finish_reason == "stop"


@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_max_tokens_finishes_with_length(llm, max_tokens):
    results = llm.generate(PROMPTS, greedy(max_tokens))
    for result in results:
        assert len(result.token_ids) == result.generation_tokens == max_tokens
        assert result.finish_reason == "length"
    by_index, _, _ = collect(llm.stream(PROMPTS[0], greedy(max_tokens)))
    assert len(by_index[0]) == max_tokens


def test_default_sampling_comes_from_generation_config(llm):
    assert llm.default_sampling.temperature == 0.6
    assert llm.default_sampling.top_p == 0.95 and llm.default_sampling.top_k == 20
    result = llm.generate(PROMPTS[0])[0]  # no SamplingParams: the checkpoint's defaults
    assert 1 <= len(result.token_ids) <= llm.default_sampling.max_tokens
    assert result.finish_reason in ("stop", "length")


# ---------------------------------------------------------------- the context
@pytest.mark.parametrize("length", [CONTEXT, CONTEXT + 40])
def test_prompt_filling_the_context_raises(llm, length):
    with pytest.raises(ValueError, match="context"):
        llm.generate(prompt_token_ids=[7] * length, sampling=greedy(4))


@pytest.mark.parametrize("length", [CONTEXT - 6, CONTEXT - 1])
def test_generation_stops_at_the_context_end(llm, length):
    prompt = [(5 * i) % 300 for i in range(length)]
    result = llm.generate(prompt_token_ids=prompt, sampling=greedy(50))[0]
    assert len(prompt) + len(result.token_ids) == CONTEXT
    assert result.finish_reason == "length"
    records = list(llm.stream(prompt_token_ids=prompt, sampling=greedy(50)))
    assert [r.token_id for r in records] == result.token_ids and records[-1].finish_reason == "length"


def test_a_long_prompt_in_a_batch_stops_alone(llm):
    long_prompt = [(3 * i) % 300 for i in range(CONTEXT - 3)]
    short_prompt = llm.tokenizer.encode(PROMPTS[0])
    long_result, short_result = llm.generate(prompt_token_ids=[long_prompt, short_prompt], sampling=greedy(8))
    assert len(long_result.token_ids) == 3 and long_result.finish_reason == "length"
    assert short_result.token_ids == llm.generate(PROMPTS[0], greedy(8))[0].token_ids


# ---------------------------------------------------------------- bad requests
def test_empty_prompt_raises(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", greedy(4))
    with pytest.raises(ValueError, match="empty"):
        llm.generate(prompt_token_ids=[[]], sampling=greedy(4))
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["fine", ""], greedy(4))
    with pytest.raises(ValueError):
        llm.generate([], greedy(4))


@pytest.mark.parametrize("bad", [336, 10_000, -1])
def test_out_of_vocab_token_id_raises(llm, bad):
    with pytest.raises(ValueError, match=str(bad)):
        llm.generate(prompt_token_ids=[1, 2, bad, 3], sampling=greedy(4))


@pytest.mark.parametrize("bad", [2.0, True, "3"])
def test_non_integer_token_id_raises(llm, bad):
    with pytest.raises((ValueError, TypeError)):
        llm.generate(prompt_token_ids=[1, 2, bad], sampling=greedy(4))


def test_stream_refuses_bad_prompts_when_consumed(llm):
    with pytest.raises(ValueError, match="empty"):
        list(llm.stream(prompt_token_ids=[[]], sampling=greedy(4)))
    with pytest.raises(ValueError, match="context"):
        list(llm.stream(prompt_token_ids=[[7] * CONTEXT], sampling=greedy(4)))


def test_prompts_and_token_ids_are_exclusive(llm):
    with pytest.raises(ValueError, match="exactly one"):
        llm.generate("hi", greedy(4), prompt_token_ids=[1, 2])
    with pytest.raises(ValueError, match="exactly one"):
        llm.generate(sampling=greedy(4))
    with pytest.raises(ValueError, match="exactly one"):
        llm.stream()


def test_sampling_list_must_match_prompts(llm):
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(PROMPTS[:2], [greedy(3)])
    with pytest.raises(TypeError):
        llm.generate([PROMPTS[0], 5], greedy(3))


# ---------------------------------------------------------------- prompt forms
def test_every_prompt_form_gives_the_same_tokens(llm):
    ids = [llm.tokenizer.encode(p) for p in PROMPTS[:2]]
    as_str = llm.generate(PROMPTS[0], greedy(6))
    as_list = llm.generate(PROMPTS[:2], greedy(6))
    as_ids = llm.generate(prompt_token_ids=ids[0], sampling=greedy(6))
    as_id_lists = llm.generate(prompt_token_ids=ids, sampling=greedy(6))
    assert len(as_str) == len(as_ids) == 1 and len(as_list) == len(as_id_lists) == 2
    assert as_str[0].token_ids == as_ids[0].token_ids == as_list[0].token_ids == as_id_lists[0].token_ids
    assert as_list[1].token_ids == as_id_lists[1].token_ids
    assert as_str[0].text == as_ids[0].text
    assert as_str[0].prompt_token_ids == ids[0] and as_list[1].prompt_token_ids == ids[1]
    assert as_list[1].prompt_tokens == len(ids[1])
    assert all(isinstance(r, GenerationResult) for r in as_list + as_id_lists)


def test_tuple_prompts_work(llm):
    ids = tuple(llm.tokenizer.encode(PROMPTS[0]))
    assert llm.generate(prompt_token_ids=ids, sampling=greedy(4))[0].token_ids == \
        llm.generate(PROMPTS[0], greedy(4))[0].token_ids
    assert len(llm.generate(tuple(PROMPTS[:2]), greedy(3))) == 2


# ---------------------------------------------------------------- chat
def test_chat_renders_the_chat_template(llm):
    expected_ids = llm.tokenizer.encode_chat(MESSAGES)
    assert llm.chat_prompt(MESSAGES) == expected_ids
    text = llm.tokenizer.apply_chat_template(MESSAGES)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    result = llm.chat(MESSAGES, sampling=greedy(8))
    assert isinstance(result, GenerationResult)
    assert result.prompt_token_ids == expected_ids
    assert result.token_ids == llm.generate(prompt_token_ids=expected_ids, sampling=greedy(8))[0].token_ids
    assert len(result.token_ids) == 8 and result.finish_reason == "length"


def test_chat_without_thinking_changes_the_prompt(llm):
    thinking = llm.chat(MESSAGES, sampling=greedy(4))
    plain = llm.chat(MESSAGES, sampling=greedy(4), enable_thinking=False)
    assert plain.prompt_token_ids == llm.tokenizer.encode_chat(MESSAGES, enable_thinking=False)
    assert plain.prompt_token_ids != thinking.prompt_token_ids
    assert plain.prompt_token_ids[: len(thinking.prompt_token_ids)] == thinking.prompt_token_ids
    tail = llm.tokenizer.decode(plain.prompt_token_ids[len(thinking.prompt_token_ids):])
    assert tail == "<think>\n\n</think>\n\n"
    assert llm.chat(MESSAGES, sampling=greedy(4), enable_thinking=True).prompt_token_ids == thinking.prompt_token_ids


def test_chat_with_a_bad_conversation_raises(llm):
    with pytest.raises(ValueError):
        llm.chat([], sampling=greedy(4))
    with pytest.raises(ValueError):
        llm.chat([{"content": "no role"}], sampling=greedy(4))


# ---------------------------------------------------------------- speeds
def test_results_carry_speeds(llm):
    for result in llm.generate(PROMPTS, greedy(6)):
        assert result.prompt_tps > 0
        assert result.generation_tps > 0
        assert result.peak_memory_bytes > 0
