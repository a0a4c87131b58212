"""Prometheus metrics of one server (its own ``CollectorRegistry``; nothing global).

Engine state (running/waiting requests, KV pool bytes and blocks, compression factor, token and
preemption counters) is read at scrape time from the worker's latest ``EngineStats`` snapshot, so a
scrape never takes the engine's lock. Latency histograms (TTFT, TPOT, E2E) are observed by the HTTP
handlers with the server's clock; TPOT = (E2E − TTFT) / (output tokens − 1), as in bench/metrics.py.
The engine step histogram is observed by the worker thread around each ``engine.step()``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "kvshrink"
_LAT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                 0.5, 0.75, 1.0, 2.5)


class _EngineCollector:
    def __init__(self, get_stats, model_name: str, method: str):
        self.get_stats = get_stats
        self.labels = {"model_name": model_name, "method": method}

    def describe(self):
        return []

    def collect(self):
        st = self.get_stats()
        if st is None:
            return
        names = list(self.labels)
        vals = list(self.labels.values())

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=names)
            g.add_metric(vals, float(value))
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=names)
            c.add_metric(vals, float(value))
            return c

        yield gauge("num_requests_running", "Requests in the engine's running batch", st.running)
        yield gauge("num_requests_waiting", "Requests waiting in the engine's queue", st.waiting)
        yield gauge("kv_bytes_used", "KV pool bytes in use", st.kv_bytes_used)
        yield gauge("kv_bytes_total", "KV pool size in bytes", st.kv_bytes_total)
        yield gauge("kv_blocks_used", "KV pool blocks in use", st.blocks_used)
        yield gauge("kv_blocks_free", "KV pool blocks free", st.blocks_free)
        yield gauge("kv_usage_ratio", "Fraction of the KV pool in use",
                    (st.kv_bytes_used / st.kv_bytes_total) if st.kv_bytes_total else 0.0)
        yield gauge("compression_factor", "Full-precision KV bytes / stored KV bytes", st.compression or 1.0)
        yield counter("prompt_tokens", "Prompt tokens processed", st.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated", st.generation_tokens)
        yield counter("num_preemptions", "Requests preempted by the scheduler", st.preemptions)


class ServerMetrics:
    def __init__(self, get_stats, model_name: str = "", method: str = ""):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(get_stats, model_name, method))
        r = self.registry
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time to first token (server side)",
                              buckets=_LAT_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                              "Time per output token after the first (server side)", buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Request latency (server side)",
                             buckets=_LAT_BUCKETS, registry=r)
        self.requests = Counter(f"{PREFIX}_requests", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter(f"{PREFIX}_requests_rejected", "Requests refused by status code",
                                ["status"], registry=r)
        # a step's wall time in the worker thread: what a simulator's step cost predicts, apart from the
        # time a token then takes to reach the client (the event loop, the network)
        self.step = Histogram(f"{PREFIX}_engine_step_seconds", "Wall time of one engine step (worker thread)",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.step_errors = Counter(f"{PREFIX}_engine_step_errors", "Engine steps that raised", registry=r)

    def observe(self, ttft: float | None, e2e: float, output_tokens: int, finish_reason: str | None) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
            if output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (output_tokens - 1))
        self.e2e.observe(e2e)
        self.requests.labels(finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
