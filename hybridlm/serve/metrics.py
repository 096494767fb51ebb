"""Prometheus text-format metrics: request counts, tokens, queue depth, prefix-cache hits, memory.

Counters live on the event loop (plain ints); engine gauges come from the worker's latest snapshot.
"""
from __future__ import annotations

import os
from collections import Counter


def resident_memory_bytes() -> int:
    """This process's resident set (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, HTTP status) -> count
        self.finished: Counter[str] = Counter()  # finish reason -> sequences
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_prompt_tokens = 0
        self.spliced_turns = 0
        self.tool_calls = 0
        self.tool_parse_warnings = 0
        self.time_to_first_token = [0.0, 0]  # sum (s), count
        self.request_latency = [0.0, 0]

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def observe(self, prompt_tokens: int, generation_tokens: int, cached_tokens: int, finish_reasons: list[str],
                ttft: float | None, latency: float) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generation_tokens
        self.cached_prompt_tokens += cached_tokens
        self.finished.update(finish_reasons)
        if ttft is not None:
            self.time_to_first_token[0] += ttft
            self.time_to_first_token[1] += 1
        self.request_latency[0] += latency
        self.request_latency[1] += 1

    def render(self, engine_stats: dict[str, int], unfinished: int, capacity: int, model: str) -> str:
        label = f'model_name="{model}"'
        lines = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{{{labels}}} {value:g}" if labels else f"{name} {value:g}")

        metric("hybridlm_http_requests_total", "counter", "HTTP requests by endpoint and status code.",
               [(f'{label},endpoint="{e}",status="{s}"', n) for (e, s), n in sorted(self.requests.items())])
        metric("hybridlm_sequences_finished_total", "counter", "Finished sequences by finish reason.",
               [(f'{label},finish_reason="{r}"', n) for r, n in sorted(self.finished.items())])
        metric("hybridlm_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               [(label, self.prompt_tokens)])
        metric("hybridlm_generation_tokens_total", "counter", "Generated tokens.", [(label, self.generation_tokens)])
        metric("hybridlm_cached_prompt_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
               [(label, self.cached_prompt_tokens)])
        metric("hybridlm_prefix_cache_queries_total", "counter", "Tokens looked up in the prefix cache.",
               [(label, engine_stats.get("prefix_cache_queries", 0))])
        metric("hybridlm_prefix_cache_hits_total", "counter", "Tokens found in the prefix cache.",
               [(label, engine_stats.get("prefix_cache_hits", 0))])
        metric("hybridlm_chat_turns_spliced_total", "counter",
               "History assistant turns reused token for token (prefix-stable rendering).", [(label, self.spliced_turns)])
        metric("hybridlm_tool_calls_total", "counter", "Tool calls returned.", [(label, self.tool_calls)])
        metric("hybridlm_tool_parser_warnings_total", "counter", "Malformed tool-call output repaired or returned as text.",
               [(label, self.tool_parse_warnings)])
        metric("hybridlm_num_requests_running", "gauge", "Sequences in the running batch.",
               [(label, engine_stats.get("running", 0))])
        metric("hybridlm_num_requests_waiting", "gauge", "Sequences waiting for a slot.",
               [(label, engine_stats.get("waiting", 0))])
        metric("hybridlm_num_sequences_unfinished", "gauge", "Admitted sequences not yet finished.", [(label, unfinished)])
        metric("hybridlm_admission_capacity", "gauge", "Unfinished sequences allowed before 429.", [(label, capacity)])
        metric("hybridlm_free_state_slots", "gauge", "Recurrent-state slots free.",
               [(label, engine_stats.get("free_state_slots", 0))])
        metric("hybridlm_state_slots", "gauge", "Recurrent-state slots in all.",
               [(label, engine_stats.get("total_state_slots", 0))])
        metric("hybridlm_free_kv_blocks", "gauge", "KV-cache blocks free.", [(label, engine_stats.get("free_blocks", 0))])
        metric("hybridlm_kv_blocks", "gauge", "KV-cache blocks in all.", [(label, engine_stats.get("total_blocks", 0))])
        for name, (total, count), help in (
            ("hybridlm_time_to_first_token_seconds", self.time_to_first_token, "Time to first token."),
            ("hybridlm_request_latency_seconds", self.request_latency, "Request latency, arrival to last token."),
        ):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} summary",
                      f"{name}_sum{{{label}}} {total:g}", f"{name}_count{{{label}}} {count:g}"]
        metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
               [("", resident_memory_bytes())])
        return "\n".join(lines) + "\n"
