"""Run GPU tests one per process, several at once: a CUDA fault (an illegal address) poisons every later test
of its process, so one bad kernel no longer fails the whole run, and each failure names its own kernel.

    python3 benchmarks/gpu_tests.py [tests/cuda tests/ops ...] [-j 8] [-k EXPRESSION] [--no-launch-blocking]

Collects the test ids with pytest, runs each in its own `python -m pytest` with CUDA_LAUNCH_BLOCKING=1 (the
faulting launch then raises at its own call), prints PASS/FAIL per test as each finishes (a run cut off by
`timeout` keeps what it printed, and SIGTERM kills the running tests too) with the last Triton kernel named in a
failure's traceback and its last error line, then the failures again, and writes the first failures' full logs
to $OUT (or /tmp).
Exit status 1 if anything failed. On the device machine compute-sanitizer sits in /usr/local/cuda-*/bin:
`compute-sanitizer --print-limit 4 python3 -m pytest -x ID` names the faulting kernel line.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import re
import signal
import subprocess
import sys
import time


def collect(paths: list[str], keyword: str | None = None) -> list[str]:
    selection = ["-k", keyword] if keyword else []
    result = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", *selection, *paths], capture_output=True,
                            text=True)
    ids = [line for line in result.stdout.split() if "::" in line]
    if not ids:
        raise SystemExit(f"no tests collected from {paths}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return ids


RUNNING: set[subprocess.Popen] = set()


def run_one(test_id: str, env: dict[str, str], timeout: int) -> tuple[str, int, str, str, str]:
    process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_id],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    RUNNING.add(process)
    try:
        text, _ = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        process.kill()
        text, code = f"timed out after {timeout} s\n" + (process.communicate()[0] or ""), -1
    finally:
        RUNNING.discard(process)
    kernels = re.findall(r"(\w+_kernel)\[", text)
    errors = [line for line in text.splitlines() if re.match(r"E\s|\w*(Error|Exception|OutOfResources)\b", line)]
    return test_id, code, kernels[-1] if kernels else "", errors[-1][:200] if errors else "", text


def stop_children(signum, frame) -> None:
    """Killed from outside (a `timeout`): take the running tests down too, so none keeps the GPU busy."""
    for process in list(RUNNING):
        process.kill()
    print(f"stopped by signal {signum}; the results above are complete, the rest did not run", flush=True)
    os._exit(2)  # at once: queued tests must not start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["tests/cuda", "tests/ops"])
    parser.add_argument("-j", "--jobs", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per test")
    parser.add_argument("--no-launch-blocking", action="store_true")
    parser.add_argument("--logs", type=int, default=3, help="full logs kept for the first N failures")
    parser.add_argument("-k", dest="keyword", help="only the tests pytest's -k expression selects")
    args = parser.parse_args()
    env = dict(os.environ)
    if not args.no_launch_blocking:
        env["CUDA_LAUNCH_BLOCKING"] = "1"
    out = os.environ.get("OUT", "/tmp")
    ids = collect(args.paths, args.keyword)
    signal.signal(signal.SIGTERM, stop_children)
    start, results, kept = time.time(), [], 0
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, i, env, args.timeout) for i in ids]
        for future in cf.as_completed(futures):  # each result printed as it comes: a cut-off run keeps them
            test_id, code, kernel, error, text = future.result()
            results.append((test_id, code, kernel, error))
            print(("PASS " if code == 0 else "FAIL ") + test_id + (f"  [{kernel}] {error}" if code else ""), flush=True)
            if code and kept < args.logs:
                kept += 1
                name = re.sub(r"[^\w.-]", "_", test_id)[-90:]
                with open(os.path.join(out, f"fail_{name}.log"), "w") as f:
                    f.write(text)
    failed = [r for r in results if r[1]]
    for test_id, code, kernel, error in failed:
        print(f"FAILED {test_id}  [{kernel}] {error}")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed, {time.time() - start:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
