"""End to end on one GPU: hybridlm vs Hugging Face transformers (+ fla kernels), random-weight Qwen3.5 shapes.

    python benchmarks/bench_e2e.py [--parts gate,prefill,decode] [--models 0.8B 9B] [--log PATH] [--tiny]

Both models get the same random bf16 weights (transformers' model is built first; ours takes its state
dict). Correctness gate first, in the same run, for every model built beside transformers: last-token logits
of a 64-token prompt compared (relative error); a speed-up is printed only when the gate passed.
Parts (`--parts`, comma-separated; default gate,prefill,decode, the original measurements):
  gate        only the gate (it runs anyway whenever transformers is built)
  prefill     tokens/s of one prompt (forward with the last token's logits only; ours through `model.forward`,
              transformers with use_cache=False), for each `--models` shape
  decode      tokens/s at batch 1 after a 512-token prompt (ours through the Engine, transformers through
              `generate`, greedy; time for N tokens minus time for 1). Floor: every weight read once per token
              (bytes / the device copy rate, measured in the same process: benchmarks/bandwidth.py)
  throughput  on `--serving-model` (0.8B): 256 requests at t=0, prompt lengths uniform in 128-2048 (seeded),
              256 new tokens each, greedy, ignore_eos: output tokens/s of the Engine (continuous batching) vs
              transformers' batched `generate` (left-padded batches of `--hf-batch`, on a seeded subset of
              `--hf-requests` whose rate extrapolates; the output says so); TTFT, TPOT and inter-token p50/p99
              from the same Engine run
  prefix      on `--serving-model`: 32 requests sharing a 4096-token prefix + 64 own tokens, 32 new tokens:
              wall time with prefix caching on vs off, and the cached prompt tokens
  long        on `--long-model` (9B), ours alone: one prompt filling the 262,144-token context (262,143 prompt
              tokens + 1 generated: the Engine needs room for the generated token) prefilled in chunks of
              `--long-chunk` tokens per step (several sizes: one row each; default 8192, the Engine's) through
              the Engine: wall time and torch.cuda.max_memory_allocated
`--tiny`: a tiny config and tiny sizes, on the CPU when there is no GPU (a few seconds; `--no-hf` skips
transformers). The table comes last; `--log PATH` (and $OUT/bench_e2e.log when $OUT is set) gets every line.

GPU time on one H100 (2026-11-23, engine mid-rework: its decode CUDA graphs did not capture yet, so these ran
with `--engine-option cuda_graphs=False`; `[part: N s]` lines in the output give each run's own numbers):
  process start (torch, transformers, fla imports)  ~20 s per call, plus the machine's start
  gate,prefill,decode (both shapes)  ~6 min (earlier runs)
  throughput,prefix (0.8B)  258 s measured with --hf-requests 128, ~235 s with the default 64:
                     build + gate 80 s (mostly Triton and fla compiles); throughput 157 s = warm-ups ~25 s
                     + ours 81.5 s for all 256 requests (804 tok/s; only ~3k tokens out in the first 32 s while
                     prompts prefill beside running decodes) + transformers 51 s for 128 requests (2 batches
                     of 64, ~25 s each); prefix 21 s (4 Engine runs + warm-ups)
  long (9B)          56-67 s: 9B build and warm-up ~8 s, prefill 48-51 s (5.1-5.4k tok/s, slowing as the context
                     grows: attention gathers the whole context per 2048-token chunk), peak 30.4 GB
  throughput with --serving-model 9B: estimated +5-6 min (build + gate ~1.5, ours ~2-3, transformers 64
                     requests in 2 batches of 32 ~1)
Recommended calls (10 minutes each at most): `--parts gate,prefill,decode`, then
`--parts throughput,prefix,long` (~5.5 min now, less as the engine gets faster).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_serving as serving  # noqa: E402
from bandwidth import copy_bandwidth  # noqa: E402
from hybridlm.config import ModelConfig  # noqa: E402
from hybridlm.engine.engine import Engine, EngineConfig  # noqa: E402
from hybridlm.io.checkpoint import build_empty_model  # noqa: E402
from hybridlm.io.tokenizer import Tokenizer  # noqa: E402

SHAPES = {
    "0.8B": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
                 linear_num_value_heads=16, intermediate_size=3584, tie_word_embeddings=True),
    "9B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
               linear_num_value_heads=32, intermediate_size=12288, tie_word_embeddings=False),
}
COMMON = dict(vocab_size=248320, head_dim=256, linear_num_key_heads=16, linear_key_head_dim=128,
              linear_value_head_dim=128, linear_conv_kernel_dim=4, max_position_embeddings=262144,
              rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25})
# 3 GDN + 1 attention layer, head sizes the Triton kernels accept (multiples of 16), 4k context
TINY = dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
            linear_value_head_dim=32, linear_conv_kernel_dim=4, intermediate_size=256, max_position_embeddings=4096,
            tie_word_embeddings=True, rope_parameters=COMMON["rope_parameters"])
PARTS = ("gate", "prefill", "decode", "throughput", "long", "prefix")
# size options: (full, tiny)
SIZES = dict(prefill=([4096, 32768], [256]), decode_tokens=(128, 8), prompt=(512, 64), requests=(256, 12),
             prompt_min=(128, 16), prompt_max=(2048, 160), new_tokens=(256, 8), hf_requests=(64, 12),
             max_num_seqs=(256, 8), chunk=(2048, 128), long_tokens=(262144, 4096), long_chunk=([8192], [512]),
             prefix_requests=(32, 4), prefix_tokens=(4096, 256), suffix_tokens=(64, 16), prefix_new_tokens=(32, 4))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LINES: list[str] = []
LOG_FILES: list = []


def log(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)
    for f in LOG_FILES:  # written as we go: a run killed at its time limit keeps what it measured
        f.write(line + "\n")
        f.flush()


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        serving.sync(DEVICE)
        start = time.perf_counter()
        fn()
        serving.sync(DEVICE)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def config_dict(name: str) -> dict:
    return dict(TINY) if name == "tiny" else {**COMMON, **SHAPES[name]}


def randomize(model, seed: int = 0) -> None:
    """Random weights that keep a Qwen3.5 stack numerically tame (decays in (-16, -1) x dt, unit norms)."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("A_log"):
                param.copy_(torch.empty(param.shape, device=DEVICE).uniform_(1, 16, generator=generator).log_())
            elif pname.endswith("dt_bias") or pname.endswith("linear_attn.norm.weight"):
                param.fill_(1.0)
            elif param.ndim == 1:
                param.normal_(0, 0.1, generator=generator)
            else:
                param.normal_(0, 0.02, generator=generator)


def build_hf(name: str):
    import transformers

    config = transformers.Qwen3_5TextConfig(**config_dict(name))
    with torch.device("meta"):
        model = transformers.Qwen3_5ForCausalLM(config)
    model = model.to_empty(device=DEVICE).to(torch.bfloat16).eval()
    randomize(model)
    # `to_empty` leaves buffers uninitialised too: the rotary tables (`inv_freq`) held whatever memory was there,
    # which made transformers' logits NaN on some runs. Take them, in fp32 as `from_pretrained` keeps them, from a
    # fresh module built for real.
    for module in model.modules():
        if hasattr(module, "inv_freq"):
            fresh = type(module)(module.config)
            for bname, buffer in fresh.named_buffers(recurse=False):
                setattr(module, bname, buffer.to(DEVICE))
    model.tie_weights()  # building on meta and filling in place can leave a tied head untied
    return model


def build_ours(name: str, hf_model=None):
    """Ours with transformers' weights, or with its own random weights when `hf_model` is None."""
    config = ModelConfig.from_dict({"model_type": "qwen3_5_text", **config_dict(name)})
    model = build_empty_model(config, DEVICE, torch.bfloat16)
    if hf_model is None:
        randomize(model)
    else:
        state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                param.copy_(state[pname])
    model.fuse_input_projections()  # as hybridlm.load does
    return model.eval()


def gate(name: str, ours, hf_model) -> tuple[bool, str]:
    """Same function? Compare last-token logits of a 64-token prompt. Random-weight logits are nearly flat,
    so bf16 rounding alone moves them by a few percent; where an fp32 copy fits (not 9B), both bf16 runs are
    measured against it and ours must be no further from it than transformers is (with a 1.5x margin)."""
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (1, 64), device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(1))

    def rel(x, y):
        return ((x - y).norm() / y.norm()).item()

    with torch.inference_mode():
        a = ours(ids, logits_to_keep=1).float()[0, -1]
        b = hf_model(ids, logits_to_keep=1).logits.float()[0, -1]
        if name != "9B":
            reference = build_empty_model(ours.config, DEVICE, torch.float32)
            for (_, target), (_, source) in zip(reference.named_parameters(), ours.named_parameters()):
                target.copy_(source)
            r = reference(ids, logits_to_keep=1)[0, -1]
            del reference
            ok = rel(a, r) <= 1.5 * rel(b, r) + 1e-3 and math.isfinite(rel(a, r))
            return ok, f"vs fp32: ours {rel(a, r):.2e}, transformers {rel(b, r):.2e}; ours vs transformers {rel(a, b):.2e}"
    ok = rel(a, b) < 0.1 and math.isfinite(rel(a, b))
    return ok, f"ours vs transformers {rel(a, b):.2e} (no fp32 copy fits beside both bf16 models)"


def ours_decode(model, tokenizer, prompt_len: int, new_tokens: int) -> float:
    cache = serving.cache_bytes(model, 8, 8 * (prompt_len + new_tokens))
    engine = Engine(model, tokenizer, config=serving.engine_config(max_num_seqs=8, cache_memory_bytes=cache))
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(2)).tolist()

    def run(n: int) -> float:
        return serving.run_engine(engine, [prompt], serving.greedy(n)).wall_s

    run(4)  # warm-up: Triton compiles
    one, many = min(run(1) for _ in range(2)), min(run(new_tokens) for _ in range(2))
    return (new_tokens - 1) / (many - one)


def hf_decode(model, prompt_len: int, new_tokens: int) -> float:
    generator = torch.Generator(device=DEVICE).manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=DEVICE, generator=generator)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        serving.sync(DEVICE)
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        serving.sync(DEVICE)
        return time.perf_counter() - start

    run(2)
    one, many = min(run(1) for _ in range(2)), min(run(new_tokens) for _ in range(2))
    return (new_tokens - 1) / (many - one)


def compare_parts(name: str, parts: set[str], ours, hf_model, tokenizer, passed: bool | None, args) -> list:
    """prefill and decode, ours vs transformers."""
    rows = []
    ratio = lambda mine, theirs: (  # noqa: E731
        "gate failed" if passed is False else f"x{mine / theirs:.2f}" if theirs == theirs and theirs > 0 else "-")
    for tokens in args.prefill if "prefill" in parts else []:
        ids = torch.randint(0, ours.config.vocab_size, (1, tokens), device=DEVICE)
        with torch.inference_mode():
            mine = tokens / timed(lambda: ours(ids, logits_to_keep=1))
            theirs = float("nan")
            if hf_model is not None:
                try:
                    theirs = tokens / timed(lambda: hf_model(ids, logits_to_keep=1, use_cache=False))
                except torch.OutOfMemoryError:
                    serving.free_memory()
        rows.append((name, f"prefill {tokens}", f"{mine:,.1f} tok/s", f"{theirs:,.1f} tok/s", ratio(mine, theirs), ""))
        log(f"  prefill {tokens}: ours {mine:,.0f} tok/s, transformers {theirs:,.0f} tok/s")
    if "decode" in parts:
        mine = ours_decode(ours, tokenizer, args.prompt, args.decode_tokens)
        theirs = float("nan")
        if hf_model is not None:
            with torch.inference_mode():
                theirs = hf_decode(hf_model, args.prompt, args.decode_tokens)
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        floor = copy_bandwidth() / weight_bytes
        rows.append((name, "decode B=1", f"{mine:,.1f} tok/s", f"{theirs:,.1f} tok/s", ratio(mine, theirs),
                     f"{mine / floor:.1%} of floor ({floor:,.0f} tok/s)"))
        log(f"  decode B=1: ours {mine:,.1f} tok/s, transformers {theirs:,.1f} tok/s, floor {floor:,.0f}")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="gate,prefill,decode", help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(SHAPES), help="shapes for gate/prefill/decode")
    parser.add_argument("--serving-model", default="0.8B", choices=sorted(SHAPES), help="shape for throughput and prefix")
    parser.add_argument("--long-model", default="9B", choices=sorted(SHAPES))
    parser.add_argument("--tiny", action="store_true", help="tiny config and sizes (CPU without a GPU)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers (no gate, no ratios)")
    parser.add_argument("--hf-batch", type=int, default=None, help="transformers batch (default 64, 32 on 9B, 4 tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--engine-option", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="EngineConfig fields forced on every engine, e.g. cuda_graphs=False")
    for key, (full, _) in SIZES.items():
        option = "--" + key.replace("_", "-")
        if isinstance(full, list):
            parser.add_argument(option, nargs="+", type=int, default=None, help=f"default {full}")
        else:
            parser.add_argument(option, type=int, default=None, help=f"default {full}")
    args = parser.parse_args(argv)
    for key, (full, tiny) in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    if args.tiny:
        args.models = args.models or ["tiny"]
        args.serving_model = args.long_model = "tiny"
    args.models = args.models or ["0.8B", "9B"]
    if args.hf_batch is None:
        args.hf_batch = 4 if args.tiny else 32 if args.serving_model == "9B" else 64
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    options = {}
    for option in args.engine_option:
        key, _, value = option.partition("=")
        if key not in fields or not value:
            parser.error(f"--engine-option {option!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    args.engine_option = options
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    return args


def took(what: str, start: float) -> float:
    """Log the seconds since `start` (device time per part, for planning calls); return now."""
    now = time.perf_counter()
    log(f"  [{what}: {now - start:.0f} s]")
    return now


def print_table(rows: list) -> None:
    log()
    log("| model | measure | hybridlm | transformers+fla | ratio | note |")
    log("|---|---|---|---|---|---|")
    for row in rows:
        log("| " + " | ".join(row) + " |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    serving.ENGINE_OPTIONS.update(args.engine_option)
    parts = set(args.parts)
    if args.tiny and DEVICE.type == "cpu":
        torch.set_num_threads(1)  # tiny ops: thread hand-offs cost more than the math (100x on a busy machine)
    for path in [args.log] + ([Path(os.environ["OUT"]) / "bench_e2e.log"] if os.environ.get("OUT") else []):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            LOG_FILES.append(open(path, "w"))
    device_name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU"
    header = f"device {device_name}  torch {torch.__version__}  parts {','.join(args.parts)}"
    if not args.no_hf:
        import transformers

        header += f"  transformers {transformers.__version__}"
    options = "".join(f" {k}={v!r}" for k, v in args.engine_option.items())
    log(header + ("  (tiny)" if args.tiny else "") + (f"  engine options:{options}" if options else ""))
    if not args.no_hf:
        try:
            import fla  # noqa: F401

            log("transformers runs with fla's kernels (fla importable)")
        except ImportError as error:
            log(f"fla not importable ({error}): transformers runs its PyTorch fallback")
    from tests.tiny_tokenizer import write_tiny_tokenizer

    tokenizer_dir = tempfile.mkdtemp()
    write_tiny_tokenizer(Path(tokenizer_dir))
    tokenizer = Tokenizer.from_dir(tokenizer_dir)  # token ids past its vocabulary decode to '' (text unused here)
    # which shapes to build beside transformers, and what to run on each
    plan: dict[str, set[str]] = {}
    if parts & {"gate", "prefill", "decode"}:
        for name in args.models:
            plan.setdefault(name, set()).update(parts & {"gate", "prefill", "decode"})
    if parts & {"throughput", "prefix"}:
        plan.setdefault(args.serving_model, set()).update(parts & {"throughput", "prefix"})
    rows: list = []
    started = clock = time.perf_counter()
    try:
        for name, todo in plan.items():
            hf_model = None if args.no_hf else build_hf(name)
            ours = build_ours(name, hf_model)
            weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
            passed = None
            if hf_model is not None:
                passed, detail = gate(name, ours, hf_model)
                log(f"{name}: {weight_bytes / 1e9:.2f} GB of weights; gate {'PASS' if passed else 'FAIL'} ({detail})")
                rows.append((name, "gate", "PASS" if passed else "FAIL", "-", "-", detail))
            else:
                log(f"{name}: {weight_bytes / 1e9:.2f} GB of weights; no transformers, no gate")
            clock = took(f"{name} build + gate", clock)
            if todo & {"prefill", "decode"}:
                rows += compare_parts(name, todo, ours, hf_model, tokenizer, passed, args)
                clock = took(f"{name} prefill + decode", clock)
            if "throughput" in todo:
                rows += serving.throughput_part(
                    name, ours, hf_model, tokenizer, passed, requests=args.requests, low=args.prompt_min,
                    high=args.prompt_max, new_tokens=args.new_tokens, hf_requests=args.hf_requests,
                    hf_batch=args.hf_batch, max_num_seqs=args.max_num_seqs, chunk=args.chunk, seed=args.seed, log=log)
                clock = took(f"{name} throughput", clock)
            if "prefix" in todo:
                rows += serving.prefix_part(
                    name, ours, tokenizer, requests=args.prefix_requests, prefix=args.prefix_tokens,
                    suffix=args.suffix_tokens, new_tokens=args.prefix_new_tokens, chunk=args.chunk, seed=args.seed, log=log)
                clock = took(f"{name} prefix", clock)
            del ours, hf_model
            serving.free_memory()
        if "long" in parts:
            ours = build_ours(args.long_model)  # alone: the peak memory is ours
            log(f"{args.long_model}: long prompt, hybridlm alone")
            for chunk in args.long_chunk:  # one model, an Engine per step size
                rows += serving.long_part(args.long_model, ours, tokenizer, tokens=args.long_tokens, chunk=chunk,
                                          seed=args.seed, log=log)
            del ours
            serving.free_memory()
            clock = took(f"{args.long_model} long (build included)", clock)
    finally:
        took("all parts", started)
        print_table(rows)
        for f in LOG_FILES:
            f.close()


if __name__ == "__main__":
    main()
