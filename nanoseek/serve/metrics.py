"""Prometheus metrics of the API server, in a registry of its own (one per app, so tests can run many).

    metrics = ServeMetrics(llm_engine)           # gauges read the engine when scraped
    metrics.request_done("/v1/chat/completions", 200, prompt=12, cached=8, output=30,
                         ttft_s=0.05, tpot_s=0.01)
    body, content_type = metrics.render()        # what GET /metrics answers

Names follow vLLM's where one exists (`nanoseek:` prefix instead of `vllm:`) so existing
dashboards need only the prefix changed. The engine gauges read plain ints the engine thread
updates; a scrape may see a step half-way, which a gauge tolerates.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# time to first token: from ~10 ms (a cache hit on a GPU) to a minute (a long queue on a CPU)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    def __init__(self, engine=None):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("nanoseek:num_requests_running", "sequences running in the engine", registry=r)
        self.waiting = Gauge("nanoseek:num_requests_waiting", "sequences waiting for a slot", registry=r)
        self.kv_usage = Gauge("nanoseek:kv_cache_usage_perc", "fraction of KV blocks in use (0..1)",
                              registry=r)
        if engine is not None:
            self.running.set_function(lambda: engine.scheduler.num_running)
            self.waiting.set_function(lambda: engine.scheduler.num_waiting)
            self.kv_usage.set_function(lambda: engine.block_manager.usage)
        self.prompt_tokens = Counter("nanoseek:prompt_tokens", "prompt tokens of finished requests",
                                     registry=r)
        self.generation_tokens = Counter("nanoseek:generation_tokens", "output tokens produced", registry=r)
        self.prefix_hit_tokens = Counter("nanoseek:prefix_cache_hits",
                                         "prompt tokens served from the prefix/disk cache", registry=r)
        self.prefix_query_tokens = Counter("nanoseek:prefix_cache_queries",
                                           "prompt tokens looked up in the prefix cache", registry=r)
        self.ttft = Histogram("nanoseek:time_to_first_token_seconds", "arrival to first output token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("nanoseek:time_per_output_token_seconds",
                              "mean time between output tokens of a request", buckets=TPOT_BUCKETS, registry=r)
        self.requests = Counter("nanoseek:http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)

    def request_done(self, route: str, status: int, prompt: int = 0, cached: int = 0, output: int = 0,
                     ttft_s: float | None = None, tpot_s: float | None = None) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.prompt_tokens.inc(prompt)
        self.prefix_query_tokens.inc(prompt)
        self.prefix_hit_tokens.inc(cached)
        self.generation_tokens.inc(output)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
