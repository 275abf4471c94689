"""uvicorn's h11 protocol with a deadline for the request head.

uvicorn bounds an idle keep-alive connection (5 s without a byte) but not a request head that arrives a byte at a
time, nor a new connection that sends nothing: either held a connection open forever (slowloris). Here a connection
with no request running must deliver a complete request head within ``header_timeout`` seconds of connecting or of
its previous response, else it is closed. The body has its own idle timeout (``body.read_body``)."""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def h11_protocol(header_timeout: float) -> type[H11Protocol]:
    """An ``H11Protocol`` class (uvicorn's ``Config(http=...)``) closing connections whose request head takes
    longer than ``header_timeout`` seconds."""

    class HeadTimedH11Protocol(H11Protocol):
        _head_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout, self._head_expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            waiting = self.cycle is None or self.cycle.response_complete  # no request of this connection runs
            if waiting and not self.transport.is_closing():
                if self.conn.our_state is not h11.ERROR:
                    try:
                        self.conn.send(h11.ConnectionClosed())
                    except h11.LocalProtocolError:
                        pass
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request head arrived: the body's idle timeout takes over

        def on_response_complete(self) -> None:
            self._arm()  # before: a pipelined request parsed by the base class disarms it again
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadTimedH11Protocol
