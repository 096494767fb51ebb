"""The engine worker thread: one failing request or step never stops it; shutdown ends what is left."""
from __future__ import annotations

import asyncio

import pytest

from hybridlm.engine.params import SamplingParams
from hybridlm.serve.async_engine import AsyncEngine, Choice, EngineUnavailable, QueueFull, RequestFailed
from hybridlm.serve.sampling import SamplingExtras
from tests.serve.helpers import make_engine

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9]


async def collect(stream):
    return [output async for output in stream]


def test_worker_survives_failing_requests_and_steps(tiny_llm):
    engine = make_engine(tiny_llm, max_num_seqs=4)

    async def main():
        worker = AsyncEngine(engine, max_waiting=2)
        worker.start()
        good = await worker.submit([Choice(PROMPT, PARAMS)])
        # a sampler failure (a logit_bias id outside the logits) ends only its own request
        bad = await worker.submit([Choice(PROMPT, PARAMS, SamplingExtras(logit_bias={10**6: 1.0}))])
        bad_outputs, good_outputs = await collect(bad), await collect(good)
        assert isinstance(bad_outputs[-1].error, RequestFailed)
        assert len(good_outputs) == 8 and good_outputs[-1].finish_reason == "length"
        # the engine refuses a prompt: the submission raises, nothing stays queued
        with pytest.raises(ValueError, match="empty"):
            await worker.submit([Choice([], PARAMS)])
        # a step that raises ends the requests it was running; the loop goes on
        step = engine.step
        engine.step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
        failed = await collect(await worker.submit([Choice(PROMPT, PARAMS)]))
        engine.step = step
        assert isinstance(failed[-1].error, RequestFailed) and "boom" in str(failed[-1].error)
        after = await collect(await worker.submit([Choice(PROMPT, PARAMS), Choice(PROMPT, PARAMS)]))
        assert sum(o.finish_reason == "length" for o in after) == 2
        assert worker.unfinished == 0 and engine.blocks.num_free_state_slots == 4
        # admission: 4 running + 2 waiting, then 429
        held = await worker.submit([Choice(PROMPT, SamplingParams(max_tokens=2000, ignore_eos=True))] * 6)
        with pytest.raises(QueueFull):
            await worker.submit([Choice(PROMPT, PARAMS)])
        # shutdown with a short grace ends the held request with an error and refuses new ones
        await worker.shutdown(grace_seconds=0.2)
        outputs = await collect(held)
        assert isinstance(outputs[-1].error, EngineUnavailable)
        with pytest.raises(EngineUnavailable):
            await worker.submit([Choice(PROMPT, PARAMS)])
        assert not worker.alive and engine.blocks.num_free_state_slots == 4

    asyncio.run(main())
