"""The replica's metrics: `ray.serve.metrics`, exported on Ray's metrics port as `ray_aigc_*` with
deployment, replica and application tags."""

import time

from ray.serve.metrics import Counter, Gauge, Histogram


class Metrics:
    """Requests and errors by route, tokens, latency, time to first token and between tokens, and the batcher's
    state."""

    LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
    # a decode step of a small model on a CPU takes ~1 ms, a big one on a loaded GPU ~100 ms
    INTER_TOKEN_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]

    def __init__(self):
        self.requests = Counter("aigc_requests", "HTTP requests by route and status", tag_keys=("route", "code"))
        self.errors = Counter("aigc_errors", "requests answered with an error, by type", tag_keys=("route", "type"))
        self.prompt_tokens = Counter("aigc_prompt_tokens", "prompt tokens of completions and chat requests")
        self.completion_tokens = Counter("aigc_completion_tokens", "generated tokens")
        self.latency = Histogram(
            "aigc_request_latency_s", "request latency by route", boundaries=self.LATENCY_S, tag_keys=("route",)
        )
        self.ttft = Histogram("aigc_time_to_first_token_s", "time to the first generated text", boundaries=self.LATENCY_S)
        # one observation per request (its mean gap), not per token: it keeps Ray metric calls off the
        # per-token path
        self.inter_token = Histogram(
            "aigc_inter_token_latency_s", "a request's mean time between generated tokens after the first",
            boundaries=self.INTER_TOKEN_S,
        )
        # one observation per request, like the inter-token latency: a Ray metric call per decode step cost
        # ~3% of a request's time in a replica at concurrency 1
        self.batch_size = Histogram("aigc_batch_size", "a request's mean number of requests per decode step",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self.queued = Gauge("aigc_queue_length", "requests in this replica waiting for a row in the batch")
        self.running = Gauge("aigc_running_requests", "requests in this replica decoding")

    def record(self, route: str, code: int, seconds: float, error_type: str | None = None) -> None:
        """One answered request: its status, its latency and, for an error, its type."""
        self.requests.inc(tags={"route": route, "code": str(code)})
        self.latency.observe(seconds, tags={"route": route})
        if error_type:
            self.errors.inc(tags={"route": route, "type": error_type})


class GaugeGate:
    """When an engine's (queued, running) counts are due on the gauges: when they changed, at most every EVERY_S
    while requests run (Ray exports gauges every few seconds; a set per decode step cost ~1.5% of a busy replica),
    at once when `force`d (the engine has gone idle). One per engine, aigc's or vLLM's."""

    EVERY_S = 0.1

    def __init__(self):
        self.shown: tuple[int, int] | None = None
        self.at = 0.0

    def due(self, counts: tuple[int, int], force: bool = False) -> bool:
        t = time.monotonic()
        if counts == self.shown or not (force or t - self.at >= self.EVERY_S):
            return False
        self.shown, self.at = counts, t
        return True
