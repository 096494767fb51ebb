"""Profile the engine's step loop on a tiny random 3:1 model: where host time goes, on any device.

    python benchmarks/profile_engine.py --requests 256 --new-tokens 32 [--device cpu] [--top 20]

Requests have seeded prompt lengths uniform in 128-2048, greedy, ignore_eos, all submitted at t=0; the model is
small enough that Python, scheduling and the reference ops' shapes dominate, which is what this is for.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hybridlm.bundled import bundled_model_dir  # noqa: E402
from hybridlm.config import ModelConfig  # noqa: E402
from hybridlm.engine.engine import Engine, EngineConfig  # noqa: E402
from hybridlm.engine.params import SamplingParams  # noqa: E402
from hybridlm.io.tokenizer import Tokenizer  # noqa: E402
from hybridlm.model import HybridLM  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top", type=int, default=20, help="functions to list, by own time")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_dir(bundled_model_dir())
    config = ModelConfig.from_dict(dict(
        model_type="qwen3_5_text", vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, intermediate_size=128,
        max_position_embeddings=4096, layer_types=["linear_attention"] * 3 + ["full_attention"]))
    model = HybridLM(config)
    model.init_weights(seed=0)
    model = model.to(args.device).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(128, 2048))]
               for _ in range(args.requests)]
    engine = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=256, cache_memory_bytes=2 << 30))
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    profile, steps, start = cProfile.Profile(), 0, time.perf_counter()
    profile.enable()
    while engine.has_work:
        engine.step()
        steps += 1
    profile.disable()
    seconds = time.perf_counter() - start
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    print(f"{args.requests} requests x {args.new_tokens} new tokens ({sum(map(len, prompts)):,} prompt tokens): "
          f"{steps} steps in {seconds:.1f} s on {args.device}")


if __name__ == "__main__":
    main()
