"""End to end on one GPU: hybridlm vs Hugging Face transformers (+ fla kernels), random-weight Qwen3.5 shapes.

    python benchmarks/bench_e2e.py [--models 0.8B 9B] [--decode-tokens 128] [--prefill 4096 32768]

Both models get the same random bf16 weights (transformers' model is built first; ours takes its state
dict). Correctness gate first, in the same run: last-token logits of a 64-token prompt compared (relative
error) and the greedy next tokens; a speed-up is printed only when the gate passed.
Measured: prefill tokens/s of one prompt (forward with the last token's logits only; ours through
`model.forward`, transformers with use_cache=False), and decode tokens/s at batch 1 after a 512-token
prompt (ours through the continuous-batching Engine, transformers through `generate`, greedy; decode time =
time for N tokens minus time for 1). Floors: decode reads every weight once per token (bytes / 3.02 TB/s).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hybridlm.config import ModelConfig  # noqa: E402
from hybridlm.engine.engine import Engine, EngineConfig  # noqa: E402
from hybridlm.engine.params import SamplingParams  # noqa: E402
from hybridlm.io.checkpoint import build_empty_model  # noqa: E402
from hybridlm.io.tokenizer import Tokenizer  # noqa: E402

BANDWIDTH = 3.02e12
SHAPES = {
    "0.8B": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
                 linear_num_value_heads=16, intermediate_size=3584, tie_word_embeddings=True),
    "9B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
               linear_num_value_heads=32, intermediate_size=12288, tie_word_embeddings=False),
}
COMMON = dict(vocab_size=248320, head_dim=256, linear_num_key_heads=16, linear_key_head_dim=128,
              linear_value_head_dim=128, linear_conv_kernel_dim=4, max_position_embeddings=262144,
              rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25})
LINES: list[str] = []


def log(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def cuda_time(fn, repeats: int = 3) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def build_hf(name: str):
    import transformers

    config = transformers.Qwen3_5TextConfig(**COMMON, **SHAPES[name])
    with torch.device("meta"):
        model = transformers.Qwen3_5ForCausalLM(config)
    model = model.to_empty(device="cuda").to(torch.bfloat16).eval()
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("A_log"):
                param.copy_(torch.empty(param.shape, device="cuda").uniform_(1, 16, generator=generator).log_())
            elif pname.endswith("dt_bias") or pname.endswith("linear_attn.norm.weight"):
                param.fill_(1.0)
            elif param.ndim == 1:
                param.normal_(0, 0.1, generator=generator)
            else:
                param.normal_(0, 0.02, generator=generator)
    model.tie_weights()  # building on meta and filling in place can leave a tied head untied
    return model


def build_ours(name: str, hf_model):
    config = ModelConfig.from_dict({"model_type": "qwen3_5_text", **COMMON, **SHAPES[name]})
    model = build_empty_model(config, torch.device("cuda"), torch.bfloat16)
    state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            param.copy_(state[pname])
    return model.eval()


def gate(name: str, ours, hf_model) -> tuple[bool, str]:
    """Same function? Compare last-token logits of a 64-token prompt. Random-weight logits are nearly flat,
    so bf16 rounding alone moves them by a few percent; where an fp32 copy fits (0.8B), both bf16 runs are
    measured against it and ours must be no further from it than transformers is (with a 1.5x margin)."""
    ids = torch.randint(0, 248320, (1, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))

    def rel(x, y):
        return ((x - y).norm() / y.norm()).item()

    with torch.inference_mode():
        a = ours(ids, logits_to_keep=1).float()[0, -1]
        b = hf_model(ids, logits_to_keep=1).logits.float()[0, -1]
        if name == "0.8B":
            reference = build_empty_model(ours.config, torch.device("cuda"), torch.float32)
            for (_, target), (_, source) in zip(reference.named_parameters(), ours.named_parameters()):
                target.copy_(source)
            r = reference(ids, logits_to_keep=1)[0, -1]
            del reference
            ok = rel(a, r) <= 1.5 * rel(b, r) + 1e-3 and math.isfinite(rel(a, r))
            return ok, f"vs fp32: ours {rel(a, r):.2e}, transformers {rel(b, r):.2e}; ours vs transformers {rel(a, b):.2e}"
    ok = rel(a, b) < 0.1 and math.isfinite(rel(a, b))
    return ok, f"ours vs transformers {rel(a, b):.2e} (no fp32 copy fits beside both bf16 models)"


def prefill_rate(fn, tokens: int) -> float:
    return tokens / cuda_time(fn)


def ours_decode(model, tokenizer, prompt_len: int, new_tokens: int) -> float:
    engine = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=8, cache_memory_bytes=4 << 30))
    prompt = torch.randint(0, 248320, (prompt_len,), generator=torch.Generator().manual_seed(2)).tolist()

    def run(n: int) -> float:
        engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        torch.cuda.synchronize()
        start = time.perf_counter()
        while engine.has_work:
            engine.step()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(4)  # warm-up: Triton compiles
    one, many = min(run(1) for _ in range(2)), min(run(new_tokens) for _ in range(2))
    return (new_tokens - 1) / (many - one)


def hf_decode(model, prompt_len: int, new_tokens: int) -> float:
    ids = torch.randint(0, 248320, (1, prompt_len), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(2)
    one, many = min(run(1) for _ in range(2)), min(run(new_tokens) for _ in range(2))
    return (new_tokens - 1) / (many - one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["0.8B", "9B"], choices=sorted(SHAPES))
    parser.add_argument("--prefill", nargs="+", type=int, default=[4096, 32768])
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=512)
    args = parser.parse_args()
    import transformers

    log(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  transformers {transformers.__version__}")
    try:
        import fla  # noqa: F401

        log("transformers runs with fla's kernels (fla importable)")
    except ImportError as error:
        log(f"fla not importable ({error}): transformers runs its PyTorch fallback")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tests.tiny_tokenizer import write_tiny_tokenizer

    tokenizer_dir = tempfile.mkdtemp()
    write_tiny_tokenizer(__import__("pathlib").Path(tokenizer_dir))
    tokenizer = Tokenizer.from_dir(tokenizer_dir)  # token ids past its vocabulary decode to '' (text unused here)
    rows = []
    for name in args.models:
        hf_model = build_hf(name)
        ours = build_ours(name, hf_model)
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        passed, detail = gate(name, ours, hf_model)
        log(f"{name}: {weight_bytes / 1e9:.2f} GB of weights; gate {'PASS' if passed else 'FAIL'} ({detail})")
        for tokens in args.prefill:
            ids = torch.randint(0, 248320, (1, tokens), device="cuda")
            with torch.inference_mode():
                mine = prefill_rate(lambda: ours(ids, logits_to_keep=1), tokens)
                try:
                    theirs = prefill_rate(lambda: hf_model(ids, logits_to_keep=1, use_cache=False), tokens)
                except torch.OutOfMemoryError:
                    theirs = float("nan")
                    torch.cuda.empty_cache()
            rows.append((name, f"prefill {tokens}", mine, theirs, passed, ""))
            log(f"  prefill {tokens}: ours {mine:,.0f} tok/s, transformers {theirs:,.0f} tok/s")
        mine = ours_decode(ours, tokenizer, args.prompt, args.decode_tokens)
        with torch.inference_mode():
            theirs = hf_decode(hf_model, args.prompt, args.decode_tokens)
        floor = BANDWIDTH / weight_bytes
        rows.append((name, "decode B=1", mine, theirs, passed, f"{mine / floor:.1%} of floor ({floor:,.0f} tok/s)"))
        log(f"  decode B=1: ours {mine:,.1f} tok/s, transformers {theirs:,.1f} tok/s, floor {floor:,.0f}")
        del ours, hf_model
        gc.collect()
        torch.cuda.empty_cache()
    log()
    log("| model | measure | hybridlm tok/s | transformers+fla tok/s | speed-up | note |")
    log("|---|---|---|---|---|---|")
    for name, what, mine, theirs, passed, note in rows:
        ratio = f"x{mine / theirs:.2f}" if passed and theirs == theirs and theirs > 0 else "gate failed" if not passed else "-"
        log(f"| {name} | {what} | {mine:,.1f} | {theirs:,.1f} | {ratio} | {note} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_e2e.log"), "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
