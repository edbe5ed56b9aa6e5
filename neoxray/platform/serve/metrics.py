"""Serving metrics as Ray metrics (`ray.util.metrics`, names `neoxray_serve_*`): they show in the Ray
dashboard's metrics view and on each node's Prometheus export port (with Ray's `ray_` prefix). Recorded in each
model replica of the Serve application, where the engine runs (`neoxray.platform.serve.app.NeoxrayModel`)."""

from __future__ import annotations

from neoxray.platform.inference.request import Output
from neoxray.platform.serve.client import ServeObserver

LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
"""Histogram bucket edges in seconds."""

METRICS = {
    "neoxray_serve_time_to_first_token_s": "seconds from a request's arrival to its first new token",
    "neoxray_serve_inter_token_latency_s": "seconds between consecutive outputs of a request",
    "neoxray_serve_request_latency_s": "seconds from a request's arrival to its end",
    "neoxray_serve_prompt_tokens": "prompt tokens of finished requests",
    "neoxray_serve_generation_tokens": "tokens generated",
    "neoxray_serve_requests_finished": "requests finished, by finish_reason",
    "neoxray_serve_running_requests": "requests in the decode batch",
    "neoxray_serve_waiting_requests": "requests waiting for a batch row or cache room",
    "neoxray_serve_kv_cache_usage": "share of the KV cache's blocks in use (0..1)",
}


class RayServeMetrics(ServeObserver):
    def __init__(self, model_name: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        keys = ("model",)
        self.tags = {"model": model_name}
        hist = lambda n: Histogram(n, description=METRICS[n], boundaries=LATENCY_BOUNDS, tag_keys=keys)
        self.ttft = hist("neoxray_serve_time_to_first_token_s")
        self.itl = hist("neoxray_serve_inter_token_latency_s")
        self.latency = hist("neoxray_serve_request_latency_s")
        self.prompt_tokens = Counter(
            "neoxray_serve_prompt_tokens", description=METRICS["neoxray_serve_prompt_tokens"], tag_keys=keys
        )
        self.generation_tokens = Counter(
            "neoxray_serve_generation_tokens", description=METRICS["neoxray_serve_generation_tokens"], tag_keys=keys
        )
        self.finished = Counter(
            "neoxray_serve_requests_finished",
            description=METRICS["neoxray_serve_requests_finished"],
            tag_keys=("model", "finish_reason"),
        )
        self.gauges = {
            k: Gauge(f"neoxray_serve_{k}", description=METRICS[f"neoxray_serve_{k}"], tag_keys=keys)
            for k in ("running_requests", "waiting_requests", "kv_cache_usage")
        }

    def on_output(self, out: Output, since_previous_s: float | None) -> None:
        if out.time_to_first_token_s is not None:
            self.ttft.observe(out.time_to_first_token_s, tags=self.tags)
        elif since_previous_s is not None and out.token_ids:
            self.itl.observe(since_previous_s, tags=self.tags)
        if out.token_ids:
            self.generation_tokens.inc(len(out.token_ids), tags=self.tags)
        if out.finish_reason is not None:
            self.prompt_tokens.inc(out.prompt_tokens, tags=self.tags)
            self.finished.inc(1, tags={**self.tags, "finish_reason": out.finish_reason})
            if out.latency_s is not None:
                self.latency.observe(out.latency_s, tags=self.tags)

    def on_stats(self, stats: dict) -> None:
        self.gauges["running_requests"].set(stats["running"], tags=self.tags)
        self.gauges["waiting_requests"].set(stats["waiting"], tags=self.tags)
        self.gauges["kv_cache_usage"].set(stats["kv_cache_usage"], tags=self.tags)
