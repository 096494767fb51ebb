"""Fixtures: the tiny random checkpoint, one LLM per session, one running server per module."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

import hybridlm  # noqa: E402
from hybridlm.engine.engine import EngineConfig  # noqa: E402
from hybridlm.serve import create_app  # noqa: E402
from tests.checkpoints import write_checkpoint  # noqa: E402
from tests.serve.helpers import API_KEY, MODEL, ServerThread, make_engine, scripted_output  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    # the tiny tokenizer spends a token per character or two: tool prompts need more than 512 positions
    directory = tmp_path_factory.mktemp("serve_model")
    write_checkpoint("qwen3_5_text", directory, max_position_embeddings=4096)
    return directory


@pytest.fixture(scope="session")
def tiny_llm(model_dir):
    # block_size 16 so that short conversations reach block boundaries and hit the prefix cache
    return hybridlm.LLM(model_dir, device="cpu", engine_config=EngineConfig(block_size=16, max_num_seqs=32))


@pytest.fixture(scope="module")
def server(tiny_llm):
    app = create_app(tiny_llm, model_name=MODEL, api_key=API_KEY, engine=make_engine(tiny_llm, max_num_seqs=32),
                     scripted_output=scripted_output, shutdown_grace_seconds=5)
    with ServerThread(app) as running:
        yield running
