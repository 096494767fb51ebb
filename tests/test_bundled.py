"""The model shipped inside the package: it loads, generates, and says how it was made."""
from __future__ import annotations

import hybridlm
from hybridlm.bundled import bundled_model_dir


def test_bundled_model_generates_python():
    directory = bundled_model_dir()
    assert directory is not None, "the package ships no bundled model"
    size = sum(f.stat().st_size for f in directory.iterdir())
    assert size <= 40 * 2**20
    llm = hybridlm.LLM(directory, device="cpu")
    assert llm.config.layer_pattern == "LLLALLLA"
    result = llm.generate("def fibonacci(n):", hybridlm.SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert result.finish_reason in ("stop", "length") and result.token_ids
    card = (directory / "MODEL_CARD.md").read_text()
    for fact in ("recipes/bundled_model.sh", "held-out loss", "tokens seen", "H100", "command"):
        assert fact in card
