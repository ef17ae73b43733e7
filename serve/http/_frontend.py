"""HttpFrontend: the HTTP port of a Kestrel server, create_app(plane) run on an HttpServer."""

from __future__ import annotations

from typing import Callable

from ..dataplane import DataPlane
from ..hub import ModelHub
from ._app import HttpOptions, create_app, metrics_route
from ._server import HttpLimits, HttpServer


class HttpFrontend:
    """The HTTP port of a Kestrel server: create_app(plane) on an HttpServer."""

    def __init__(self, plane: DataPlane | ModelHub, *, host: str = "127.0.0.1", port: int = 8000,
                 serving: Callable[[], bool] | None = None, options: HttpOptions | None = None,
                 limits: HttpLimits | None = None, metrics_registry=None, on_refused: Callable[[], None] | None = None,
                 authorizer=None, tls: tuple[str, str] | None = None):
        if isinstance(plane, ModelHub):
            plane = DataPlane(plane, serving) if serving is not None else DataPlane(plane)
        self.plane = plane
        self.options = options or HttpOptions()
        if metrics_registry is not None:
            self.options.extra_routes = [*self.options.extra_routes, metrics_route(metrics_registry)]
        self.app = create_app(plane, self.options, on_refused=on_refused, authorizer=authorizer)
        self.server = HttpServer(self.app, host=host, port=port, limits=limits, name="http", tls=tls)

    @property
    def port(self) -> int | None:
        return self.server.port

    @property
    def accepting(self) -> bool:
        return self.server.accepting

    def start(self) -> "HttpFrontend":
        """Bind and serve in a background thread; OSError if the address cannot be bound."""
        try:
            self.server.start()
        except BaseException:
            self.app.state.kestrel.close()
            raise
        return self

    def stop_accepting(self) -> None:
        self.server.stop_accepting()

    def wait(self, grace: float | None = 10.0) -> bool:
        done = self.server.wait(grace)
        self.app.state.kestrel.close()
        return done

    def stop(self, grace: float | None = 10.0) -> bool:
        self.stop_accepting()
        return self.wait(grace)
