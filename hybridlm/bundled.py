"""The small model shipped inside the package, for `hybridlm generate` with no --model."""
from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "bundled_model"


def bundled_model_dir() -> Path | None:
    """The bundled checkpoint directory, or None while this install ships none."""
    return BUNDLED_DIR if (BUNDLED_DIR / "config.json").is_file() else None
