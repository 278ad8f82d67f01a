"""`askmesh serve web`: the OpenAI-compatible API and the chat page, served by uvicorn.

SIGTERM (uvicorn's own handling): the port closes at once, so Envoy's health check takes the
replica out; requests in flight, answer streams included, get `grace_period_s` to finish.
"""

from __future__ import annotations

import uvicorn

from askmesh.runtime import metrics
from askmesh.runtime.auth import AuthSettings
from askmesh.runtime.config import TelemetrySettings
from askmesh.runtime.server import configure_logging
from askmesh.runtime.telemetry import setup_telemetry
from services.web.app import WebTier
from services.web.config import WebSettings


def main() -> None:
    settings = WebSettings()
    # The web tier checks no key itself (the tiers behind it do); AuthSettings only says whether
    # every log line must warn that authentication is off.
    configure_logging(settings.log_level, AuthSettings())
    setup_telemetry("web", TelemetrySettings())  # traces go on into the gateway's
    if settings.metrics_port:
        metrics.start_metrics_server("web", settings.host, settings.metrics_port)
    config = uvicorn.Config(
        WebTier(settings).app(),
        host=settings.host,
        port=settings.port,
        log_config=None,  # askmesh's logging, configured above
        lifespan="on",
        timeout_graceful_shutdown=int(settings.grace_period_s),
        server_header=False,
        # Envoy is the edge: it sets the caller's address (use_remote_address).
        proxy_headers=False,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
