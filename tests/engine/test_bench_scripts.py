"""benchmarks/bench_e2e.py in --tiny mode on the CPU: every part runs and the table has its rows.

The GPU run costs device time that a crash at the end would waste; this catches the crash here.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_serving import percentile  # noqa: E402


def has_qwen3_5_transformers() -> bool:
    if importlib.util.find_spec("transformers") is None:
        return False
    import transformers

    return hasattr(transformers, "Qwen3_5ForCausalLM")


def test_percentile_matches_linear_interpolation():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) != percentile([], 50)  # NaN


@pytest.mark.parametrize("with_hf", [has_qwen3_5_transformers()], ids=lambda hf: "transformers" if hf else "no-hf")
def test_bench_e2e_tiny_runs_every_part(tmp_path, with_hf):
    log = tmp_path / "bench.log"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--tiny", "--log", str(log),
               "--parts", "gate,prefill,decode,throughput,long,prefix"]
    if not with_hf:
        command.append("--no-hf")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("| model | measure |"):]
    rows = {cells[1]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in table.splitlines()[2:] if line.startswith("|"))}
    expected = ["prefill 256", "decode B=1", "throughput 12 req x 8 tok", "TTFT p50 / p99 ms", "TPOT p50 / p99 ms",
                "ITL p50 / p99 ms", "prefix cache 4 x (256+16)", "long prompt 4,095, 512/step"]
    assert [m for m in expected if m not in rows] == [], table
    assert ("gate" in rows) == with_hf
    if with_hf:
        assert rows["gate"][2] == "PASS", table
        assert re.fullmatch(r"x[0-9.]+", rows["throughput 12 req x 8 tok"][4]), table
    # every request shared 256 tokens: all but the first find them in the cache
    assert rows["prefix cache 4 x (256+16)"][5].startswith("768 of 1,088 prompt tokens cached"), table
    assert re.match(r"on [0-9.]+ s / off [0-9.]+ s", rows["prefix cache 4 x (256+16)"][2]), table
    assert rows["long prompt 4,095, 512/step"][2].endswith("peak n/a (CPU)"), table
    for measure in ("TTFT p50 / p99 ms", "TPOT p50 / p99 ms", "ITL p50 / p99 ms"):
        p50, p99 = (float(x.replace(",", "")) for x in rows[measure][2].split(" / "))
        assert 0 <= p50 <= p99, (measure, table)
    assert log.read_text().endswith(table.replace("\r", "")), "the log file ends with the same table"


def test_profile_engine_step_table_and_torch_profile():
    """profile_engine.py on the tiny model: the step table and a torch.profiler window both print."""
    script = str(ROOT / "benchmarks" / "profile_engine.py")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    result = subprocess.run([sys.executable, script, "--requests", "6", "--new-tokens", "3", "--chunk", "512",
                             "--steps-table", "--torch-profile", "1", "--top", "5"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| step kind |" in result.stdout and "decode only" in result.stdout
    assert "Self CPU" in result.stdout  # the profiler's table
    assert re.search(r"tiny: 6 requests x 3 new tokens .* steps in", result.stdout)


def test_profile_prefill_tiny_prints_its_table():
    """profile_prefill.py on the tiny model (CPU): the profiler's table, the host profile (--cprofile) and the
    summary row of each length (no CUDA graph on the CPU: "-")."""
    script = str(ROOT / "benchmarks" / "profile_prefill.py")
    result = subprocess.run([sys.executable, script, "--lengths", "32", "96", "--top", "3", "--cprofile", "4",
                             "--graph"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Self CPU" in result.stdout
    assert result.stdout.count("host profile, 10 forwards of") == 2 and "tottime" in result.stdout
    rows = re.findall(r"^\| tiny \| (\d+) \| [0-9.]+ \| [0-9,]+ \| [0-9.]+ \| - \|$", result.stdout, flags=re.M)
    assert rows == ["32", "96"], result.stdout[-1500:]


def test_bench_ttft_tiny_prints_its_table():
    """bench_ttft.py on the tiny model (CPU, where no prefill graph is captured): a row per length, tokens agree; the
    host profile of eager steps (--cprofile)."""
    script = str(ROOT / "benchmarks" / "bench_ttft.py")
    result = subprocess.run([sys.executable, script, "--lengths", "16", "80", "--repeats", "1", "--new-tokens", "3",
                             "--cprofile", "3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "graphs: engine built" in result.stdout and "prefill graphs none" in result.stdout
    assert "host profile, 5 eager first tokens of 16-token prompts" in result.stdout and "tottime" in result.stdout
    assert "Ordered by: cumulative time" in result.stdout and "host profile, 5 plain model.forward calls" in result.stdout
    assert result.stdout.count("device profile, one ") == 2
    rows = re.findall(r"^\| tiny \| (\d+) \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \| 3/3 \|$", result.stdout,
                      flags=re.M)
    assert rows == ["16", "80"], result.stdout[-1500:]


def test_count_launches_fused_below_unfused():
    """count_launches.py on the tiny shape: the fused norms, RoPE and SwiGLU take fewer launches than PyTorch ops."""
    script = str(ROOT / "benchmarks" / "count_launches.py")
    counts = {}
    for flag in ([], ["--unfused"]):
        result = subprocess.run([sys.executable, script, "--shape", "tiny", *flag], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        match = re.search(r"(\d+) launches per decode step \((\d+) ATen, (\d+) Triton\)", result.stdout)
        assert match, result.stdout
        counts["unfused" if flag else "fused"] = int(match[1])
    assert 0 < counts["fused"] < counts["unfused"]


def test_sweep_kernels_tiny_checks_every_setting():
    """sweep_kernels.py at the tiny shape (interpreter): every setting of every kernel ran and matched the wrapper."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep_kernels.py"), "--tiny"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny |")]
    names = ("o per-block", "o looped", "prepare w=", "prepare kkt", "conv one", "conv packed")
    count = {name: sum(f"| {name}" in row for row in rows) for name in names}
    # (in the interpreter num_warps and num_stages do not change what runs: one of each) the state pass: BV 32 (dim
    # 32), keys normalised in it or not; o: BV 32, for each of the two kernels; the fused prepare kernel once; KKT:
    # the Gram/inverse kernel at 2 BK x 3 inverses (rows, interleaved, recursive), the w/u kernel at BV 32, and the
    # pair at the defaults;
    # conv: 3 x 3 tiles, one sequence and packed
    assert count == {"o per-block": 1, "o looped": 1, "prepare w=": 1, "prepare kkt": 6 + 1 + 1, "conv one": 9,
                     "conv packed": 9}
    assert len(rows) == 2 + 2 + 1 + 8 + 18
    # every setting reproduces the wrapper run the same way exactly
    checks = {row: float(row.rstrip(" |").rsplit("|", 1)[1]) for row in rows}
    assert all(diff == 0 for diff in checks.values()), rows


def test_sweep_kernels_tiny_backward_settings():
    """sweep_kernels.py --kernels bwd at the tiny shape (interpreter): each dH-pass setting ran the whole backward and
    matched the defaults' gradients."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep_kernels.py"), "--tiny", "--kernels",
                             "bwd", "--bwd-groups", "dh"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny | 200 | bwd dh ")]
    assert len(rows) == 1  # BV 32 (the tiny heads' width); one num_warps / num_stages in the interpreter
    assert all(float(row.rstrip(" |").rsplit("|", 1)[1]) == 0 for row in rows), rows


def test_sweep_kernels_tiny_fused_output():
    """sweep_kernels.py --kernels fusedo at the tiny shape (interpreter): the unfused forward and each setting of the
    fused state pass ran the whole forward and gave the unfused o and final state."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep_kernels.py"), "--tiny", "--kernels",
                             "fusedo"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny | 200 | fused-o ")]
    # unfused, then BV 32 or 64 (one num_warps / num_stages in the interpreter), then two settings with q k^T made
    # in the pass
    assert len(rows) == 1 + 2 + 2
    assert all(float(row.rstrip(" |").rsplit("|", 1)[1]) == 0 for row in rows), rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gluon_chain_probe_refuses_without_hopper():
    """gluon_chain_probe.py times wgmma and TMA: without an sm_90 GPU it stops with a message that says so (and
    names --compile-only), after checking its arguments."""
    script = str(ROOT / "benchmarks" / "gluon_chain_probe.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "needs an sm_90 GPU" in result.stderr and "--compile-only" in result.stderr
    result = subprocess.run([sys.executable, script, "--length", "100"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "multiple of 64" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("name, model_option", [("profile_gdn_forward.py", "--models"),
                                                ("one_gdn_forward.py", "--model")])
def test_gdn_profiling_scripts_refuse_without_cuda(name, model_option):
    """profile_gdn_forward.py and one_gdn_forward.py (ncu's target) run CUDA kernels: without a GPU they stop with a
    message that says so; a model they do not know is refused by name first."""
    script = str(ROOT / "benchmarks" / name)
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "needs a CUDA GPU" in result.stderr
    result = subprocess.run([sys.executable, script, model_option, "7B"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "7B" in result.stderr


def test_sweep_decode_tiles_tiny_runs_each_rule():
    """sweep_decode_tiles.py on the CPU (tiny model): one row per rule with a number per round; a malformed rule is
    refused by name before anything is built."""
    script = str(ROOT / "benchmarks" / "sweep_decode_tiles.py")
    result = subprocess.run([sys.executable, script, "--model", "tiny", "--rules", "default", "4,8,2048,2,8",
                             "--rounds", "2", "--prompt", "16", "--new-tokens", "6"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| default") or line.startswith("| 4,8")]
    assert len(rows) == 2
    for row in rows:
        speeds = [float(cell.replace(",", "")) for cell in row.strip(" |").split("|")[1:]]
        # two rounds and the best; a rule that failed would show NaN (the value itself is CPU timing noise here:
        # at this size the difference of two runs can even come out negative on a busy machine)
        assert len(speeds) == 3 and all(s == s for s in speeds)
    bad = subprocess.run([sys.executable, script, "--model", "tiny", "--rules", "4,8,2048"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "rule '4,8,2048'" in bad.stderr


def test_bench_gdn_settings_are_checked_before_anything_runs():
    """bench_gdn.py --set MODULE.FLAG=VALUE: a kernel option changed for the whole process (and put back here);
    an unknown module or flag, a value of another type or a malformed setting stops it with a message naming it."""
    import bench_gdn

    from hybridlm.ops.triton import gdn_chunk

    old = gdn_chunk.STATE_PASS_CP
    try:
        assert bench_gdn.apply_settings([f"gdn_chunk.STATE_PASS_CP={not old}"]) == [
            f"gdn_chunk.STATE_PASS_CP={not old!r}"]
        assert gdn_chunk.STATE_PASS_CP is (not old)
        # a flag that may be None (FOLD_WU_INTO_H: None is the rule) takes a bool or None
        assert bench_gdn.apply_settings(["gdn_chunk.FOLD_WU_INTO_H=True"]) == ["gdn_chunk.FOLD_WU_INTO_H=True"]
    finally:
        gdn_chunk.STATE_PASS_CP = old
        gdn_chunk.FOLD_WU_INTO_H = None
    for setting, message in [("gdn_chunk.NOPE=1", "has no flag NOPE"), ("nomod.X=1", "no module"),
                             ("gdn_chunk.STATE_PASS_CP=1", "is a bool"), ("bad", "MODULE.FLAG=VALUE"),
                             ("gdn_chunk.STATE_PASS_CP=yes", "not a Python literal")]:
        with pytest.raises(SystemExit, match=message):
            bench_gdn.apply_settings([setting])
    assert gdn_chunk.STATE_PASS_CP is old
    # --variant: named sets of options, applied only inside settings_applied and put back after
    variants = bench_gdn.parse_variants(["fold:gdn_chunk.FOLD_WU_INTO_H=True",
                                         "both:gdn_chunk.FOLD_WU_INTO_H=True,gdn_chunk.STATE_PASS_CP=False"])
    assert list(variants) == ["fold", "both"] and len(variants["both"]) == 2
    with bench_gdn.settings_applied(variants["both"]):
        assert gdn_chunk.FOLD_WU_INTO_H is True and gdn_chunk.STATE_PASS_CP is False
    assert gdn_chunk.FOLD_WU_INTO_H is None and gdn_chunk.STATE_PASS_CP is old
    tupled = bench_gdn.parse_variants(["bv:gdn_chunk.STATE_PASS_BVS=(32, 64),gdn_chunk.STATE_PASS_CP=False"])["bv"]
    assert [(flag, value) for _, flag, value in tupled] == [("STATE_PASS_BVS", (32, 64)), ("STATE_PASS_CP", False)]
    for variant, message in [("fold", "NAME:MODULE.FLAG=VALUE"), ("x:gdn_chunk.NOPE=1", "has no flag NOPE")]:
        with pytest.raises(SystemExit, match=message):
            bench_gdn.parse_variants([variant])
    with pytest.raises(SystemExit, match="a new NAME"):
        bench_gdn.parse_variants(["a:gdn_chunk.FOLD_WU_INTO_H=True", "a:gdn_chunk.STATE_PASS_CP=True"])
    # a variant's row: its speed-up over each peer and over ours at the defaults; a failed check gets none
    rows = []
    bench_gdn.report("forward", "9B", 1, 4096, 4096, 0.05, {
        "ours": (0.2, "PASS"), "ours[fold]": (0.1, bench_gdn.variant_check(True, 1e-3)),
        "ours[bad]": (0.1, bench_gdn.variant_check(True, 0.5)), "fla": (0.4, "PASS 1e-3")}, rows)
    speedups = {row.impl: row.speedups for row in rows}
    assert speedups["ours"] == {"fla": 2.0} and speedups["ours[fold]"] == {"fla": 4.0, "ours": 2.0}
    assert speedups["ours[bad]"] == {} and speedups["fla"] == {}
    saved = gdn_chunk.CP_SEGMENT_CHUNKS  # a flag that may be None takes an int
    try:
        assert bench_gdn.apply_settings(["gdn_chunk.CP_SEGMENT_CHUNKS=8"]) == ["gdn_chunk.CP_SEGMENT_CHUNKS=8"]
    finally:
        gdn_chunk.CP_SEGMENT_CHUNKS = saved


def test_host_overhead_checks_its_shapes_and_needs_a_gpu(monkeypatch):
    """host_overhead.py: MODEL:B:T shapes parsed or refused by name; without CUDA it stops with a message."""
    import host_overhead

    assert host_overhead.parse_shape("9B:1:16384") == ("9B", 1, 16384)
    for bad in ("9X:1:4096", "9B:one:4096", "9B"):
        with pytest.raises(SystemExit, match="MODEL:B:T"):
            host_overhead.parse_shape(bad)
    if not __import__("torch").cuda.is_available():
        monkeypatch.setattr(sys, "argv", ["host_overhead.py", "--shapes", "0.8B:1:4096"])
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            host_overhead.main()


def test_gdn_fault_map_needs_a_gpu(monkeypatch):
    """gdn_fault_map.py: without CUDA it stops with a message (on a GPU it maps faulting head dims); a kernel option
    that does not exist is refused by name first."""
    import gdn_fault_map
    import torch

    assert set(gdn_fault_map.LAYOUTS) == {"B2T1", "B1T70", "packed", "step", "step-split"}
    # the decode-step layouts' runs (on the CPU under the interpreter): both kernels, the same outputs
    device = "cuda" if torch.cuda.is_available() else "cpu"
    main, split = (gdn_fault_map.run_step(32, 64, split, device=device).float() for split in (False, True))
    assert torch.isfinite(main).all() and torch.allclose(main, split, rtol=2e-2, atol=2e-2)
    # a chunk layout: the inference forward (here with the output fused into the state pass), then training twice
    from hybridlm.ops.triton import gdn_chunk

    monkeypatch.setattr(gdn_chunk, "FUSED_OUTPUT", True)
    outcome = gdn_fault_map.run_shape(32, 32, "packed", device=device)
    assert outcome.startswith("ok (") and float(outcome[4:-1]) <= 1e-2, outcome
    # a kernel that gives wrong values without faulting is reported by what is off
    from hybridlm.ops import triton as kernel_module

    right = kernel_module.chunk_gdn
    monkeypatch.setattr(kernel_module, "chunk_gdn", lambda *a, **kw: (lambda o, f: (o * 1.5, f))(*right(*a, **kw)))
    outcome = gdn_fault_map.run_shape(32, 32, "B1T70", device=device)
    assert outcome.startswith("WRONG o (inference)") and " dq " in outcome, outcome
    monkeypatch.setattr(sys, "argv", ["gdn_fault_map.py", "--set", "gdn_chunk_bwd.BWD_NO_SUCH_FLAG=1"])
    with pytest.raises(SystemExit, match="has no flag BWD_NO_SUCH_FLAG"):
        gdn_fault_map.main()
    if not torch.cuda.is_available():
        monkeypatch.setattr(sys, "argv", ["gdn_fault_map.py", "--dims", "32"])
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            gdn_fault_map.main()


def test_bench_prefill_attention_tiny_checks_each_variant():
    """bench_prefill_attention.py --tiny (interpreter): ours and a tile variant checked against SDPA at both cases;
    a setting that does not exist stops it before anything runs."""
    script = str(ROOT / "benchmarks" / "bench_prefill_attention.py")
    result = subprocess.run([sys.executable, script, "--tiny", "--variant", "n16:paged_prefill.BLOCK_N=16"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny | ")]
    checks = [row.rstrip(" |").rsplit("|", 1)[1].split() for row in rows if "sdpa" not in row]
    assert len(rows) == 6 and len(checks) == 4 and all(c[0] == "PASS" and float(c[1]) <= 1e-2 for c in checks), rows
    result = subprocess.run([sys.executable, script, "--tiny", "--variant", "bad:paged_prefill.NO_SUCH=1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "has no flag NO_SUCH" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("given", [None, "1"])
def test_bench_gdn_keeps_fla_on_its_own_kernels(monkeypatch, given):
    """load_peers sets FLA_FLASH_QLA=0 before fla loads (fla 0.6.0 would otherwise hand gates-given calls to FlashQLA,
    so its rows would time FlashQLA), unless the caller chose a value; a peer that is not installed is skipped."""
    import bench_gdn

    monkeypatch.setenv("FLA_FLASH_QLA", given or "unset")  # (recorded, so the test leaves the environment as it was)
    if given is None:
        monkeypatch.delenv("FLA_FLASH_QLA")
    peers = bench_gdn.load_peers(True)
    assert os.environ["FLA_FLASH_QLA"] == (given or "0")
    assert set(peers) <= {"fla", "fla_recurrent", "flashqla"}
    assert bench_gdn.load_peers(False) == {}


def test_bench_gdn_logs_each_timing_as_it_is_measured(capsys):
    """bench_gdn.Results: a shape's timings are printed one by one as they are stored (a run cut off by its timeout
    keeps the finished ones), and report() still reads them as a plain mapping for the table and speed-ups."""
    import bench_gdn

    results = bench_gdn.Results("train 9B B=4 T=4096")
    results["ours"] = (3.5, "PASS")
    assert capsys.readouterr().out == "  train 9B B=4 T=4096 ours: 3.5000 ms, check PASS\n"
    results["fla"] = (4.2, "PASS 4.1e-03")
    assert "fla: 4.2000 ms, check PASS 4.1e-03" in capsys.readouterr().out
    rows = []
    bench_gdn.report("train", "9B", 4, 4096, 16384, 1.0, results, rows)
    assert [r.impl for r in rows] == ["ours", "fla"] and rows[0].speedups == {"fla": pytest.approx(1.2)}


def test_train_peer_calls_reach_each_peer_with_its_inputs():
    """bench_gdn.train_peer_calls (bench_gdn.py's and profile_gdn_forward.py's training rows): fla from raw a, b with
    its in-kernel gate flags, fla and FlashQLA given g, beta; each forward's o differentiates to its leaves."""
    import bench_gdn

    from hybridlm.ops.delta_rule import gdn_gates

    seen = []

    def peer(name):
        def call(**kwargs):
            seen.append((name, kwargs))
            return kwargs["v"] * kwargs["beta"][..., None] + kwargs["q"].sum(), None
        return call

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 8, 1, 4, generator=gen), torch.randn(1, 8, 1, 4, generator=gen)
    v, a, b = torch.randn(1, 8, 2, 4, generator=gen), torch.randn(1, 8, 2, generator=gen), torch.randn(1, 8, 2)
    A_log, dt_bias = torch.zeros(2), torch.zeros(2)
    leaves = [x.requires_grad_() for x in (q, k, v, a, b, A_log, dt_bias)]
    assert bench_gdn.train_peer_calls({}, *leaves) == {}
    calls = bench_gdn.train_peer_calls({"fla": peer("fla"), "flashqla": peer("flashqla")}, *leaves)
    assert {name: (len(peer_leaves), compared) for name, (_, peer_leaves, compared) in calls.items()} == {
        "fla": (7, 6), "fla g,beta": (5, 4), "FlashQLA": (5, 4)}
    for name, (forward, peer_leaves, _) in calls.items():
        grads = torch.autograd.grad(forward(), peer_leaves, torch.ones_like(v), allow_unused=True)
        assert grads[0] is not None and grads[2] is not None, name
    (_, raw), (_, fla_given), (_, qla_given) = seen
    assert [name for name, _ in seen] == ["fla", "fla", "flashqla"]
    assert raw["g"] is a and raw["beta"] is b and raw["use_gate_in_kernel"] and raw["A_log"] is A_log
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    for given in (fla_given, qla_given):
        assert torch.equal(given["g"], g) and torch.equal(given["beta"], beta)
        assert given["use_qk_l2norm_in_kernel"] and "use_gate_in_kernel" not in given


def test_forward_peer_calls_reach_each_peer_with_its_inputs():
    """bench_gdn.forward_peer_calls (bench_gdn.py's and profile_gdn_forward.py's forward rows): fla with its own q/k
    norm; FlashQLA once with q, k normalised beforehand (the anchor's way) and once with raw q, k and its own norm
    (our call's work), and once after fla's norm kernel where fla is there; the same initial state and gates to
    each."""
    import bench_gdn

    from hybridlm.ops.delta_rule import l2norm

    seen = []

    def peer(name):
        def call(*args, **kwargs):
            seen.append((name, args, kwargs))
            return "o", "state"
        return call

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 1, 4, generator=gen).bfloat16() for _ in range(3))
    g, beta, state = torch.randn(1, 8, 1), torch.rand(1, 8, 1), torch.zeros(1, 1, 4, 4)
    assert bench_gdn.forward_peer_calls({}, q, k, v, g, beta, state) == {}
    calls = bench_gdn.forward_peer_calls({"fla": peer("fla"), "flashqla": peer("flashqla")}, q, k, v, g, beta, state)
    assert list(calls) == ["fla", "FlashQLA", "FlashQLA+norm"]
    assert all(call() == ("o", "state") for call in calls.values())
    (_, _, fla), (_, pre, _), (_, raw, _) = seen
    assert fla["q"] is q and fla["g"] is g and fla["use_qk_l2norm_in_kernel"] and fla["initial_state"] is state
    assert torch.equal(pre[0], l2norm(q.float()).bfloat16()) and torch.equal(pre[1], l2norm(k.float()).bfloat16())
    assert raw[0] is q and raw[1] is k and seen[2][2]["use_qk_l2norm_in_kernel"]
    assert "use_qk_l2norm_in_kernel" not in seen[1][2] and pre[4].dtype == q.dtype
    assert all(kwargs["initial_state"] is state and kwargs["output_final_state"] for _, _, kwargs in seen[1:])

    def fla_norm(x):
        return x * 2, "rstd"

    seen.clear()
    calls = bench_gdn.forward_peer_calls({"flashqla": peer("flashqla"), "fla_l2norm": fla_norm}, q, k, v, g, beta,
                                         state)
    assert list(calls) == ["FlashQLA", "FlashQLA+norm", "FlashQLA+fla norm"]
    calls["FlashQLA+fla norm"]()
    (_, normed, kwargs), = seen
    assert torch.equal(normed[0], q * 2) and torch.equal(normed[1], k * 2) and normed[2] is v
    assert "use_qk_l2norm_in_kernel" not in kwargs and kwargs["initial_state"] is state


def test_probe_padding_tiny_agrees():
    """probe_padding.py on the tiny model (CPU, fp32): the padded forward's logits, states and KV as the eager
    step's, and the shapes-only baseline as close."""
    script = str(ROOT / "benchmarks" / "probe_padding.py")
    result = subprocess.run([sys.executable, script, "--cases", "40:64", "64:64", "--baseline", "40"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| tiny (padded \d+ -> \d+|eager 40 against row 39 of 104) \| (\S+) \| True \| .*\| (\S+) \|$",
                      result.stdout, flags=re.M)
    assert [name for name, *_ in rows] == ["padded 40 -> 64", "padded 64 -> 64", "eager 40 against row 39 of 104"]
    assert all(float(logits) < 1e-5 and float(kv) < 1e-5 for _, logits, kv in rows), result.stdout
