"""Local serving of the active model to the shopper's app on the same device.

`RecommendService` is the in-process API (stock codes in, products out) whose model can be
hot-swapped under load; `agent.serving.http.start_http_server` exposes the same semantics as
HTTP/JSON on 127.0.0.1. Neither imports TensorFlow.
"""

from agent.serving.service import NoModelError, RecommendService, RequestError, ServingError

__all__ = ["NoModelError", "RecommendService", "RequestError", "ServingError"]
