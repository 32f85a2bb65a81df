"""Running the server: in the foreground (``llavakit serve``) or in a background thread (tests, ``llavakit webui
--model``, benchmarks), both on uvicorn."""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

import uvicorn

from llavakit.serving.app import create_app
from llavakit.serving.config import LOOPBACK, ServeConfig
from llavakit.serving.pool import ModelPool

logger = logging.getLogger(__name__)


def serve(config: ServeConfig, log_level: str = "info") -> None:
    """Load the models and serve until interrupted (Ctrl-C)."""
    pool = ModelPool(config)
    if config.host not in (LOOPBACK, "localhost", "::1") and config.api_key is None:
        logger.warning(
            "serving on %s without --api-key: anyone who can reach this address can use it", config.host
        )
    try:
        uvicorn.run(create_app(pool, config), host=config.host, port=config.port, log_level=log_level)
    finally:
        pool.close()


class BackgroundServer:
    """A server on a thread of this process; ``port=0`` picks a free port.

        >>> with BackgroundServer(ServeConfig(models=(ModelSpec("tiny", "runs/demo/final"),), port=0)) as server:
        ...     client = openai.OpenAI(base_url=server.base_url, api_key="unused")

    Args:
        config: the server configuration.
        startup_timeout_s: how long to wait for the server to accept connections.
    """

    def __init__(self, config: ServeConfig, startup_timeout_s: float = 120.0) -> None:
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self.pool: ModelPool | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = config.port

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ``http://HOST:PORT/v1``."""
        return f"http://{self.config.host}:{self.port}/v1"

    def start(self) -> BackgroundServer:
        """Load the models, start uvicorn and wait until it listens."""
        self.pool = ModelPool(self.config)
        settings = uvicorn.Config(
            create_app(self.pool, self.config),
            host=self.config.host,
            port=self.config.port,
            log_level="warning",
        )
        self._server = uvicorn.Server(settings)
        self._thread = threading.Thread(target=self._server.run, name="llavakit-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start on {self.config.host}:{self.config.port}")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop uvicorn and the engines."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()
