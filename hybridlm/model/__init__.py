"""The model: layers, the hybrid cache and the full causal LM."""
from hybridlm.model.cache import HybridCache
from hybridlm.model.model import CacheLayout, HybridLM

__all__ = ["CacheLayout", "HybridCache", "HybridLM"]
