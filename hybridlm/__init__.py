"""hybridlm: run, serve and train Gated DeltaNet hybrid language models (Qwen3.5, Qwen3-Next)."""
from hybridlm.config import ModelConfig
from hybridlm.engine.generate import GenerationResult, StreamRecord
from hybridlm.engine.llm import LLM
from hybridlm.engine.params import SamplingParams
from hybridlm.io.checkpoint import load_model as load
from hybridlm.io.checkpoint import save_model as save

__all__ = ["LLM", "GenerationResult", "ModelConfig", "SamplingParams", "StreamRecord", "load", "save"]
__version__ = "0.1.0"
