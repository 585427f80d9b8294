"""Connection limits uvicorn does not have: a deadline for a request's headers, and a cap on open connections.

uvicorn resets its keep-alive timer on every byte a client sends, and has no timer while headers arrive, so a
client that sends one header byte every few seconds (slowloris), or opens connections and sends nothing, holds a
socket forever; a few hundred of them exhaust the file descriptors and even /health stops answering. Here:
- every connection that is waiting for a request's headers has a deadline (`header_timeout`, counted from the
  connection's start or from the end of the previous response plus the keep-alive time); when it passes, the
  connection is closed, however many bytes dribbled in;
- at most `max_connections` are open at once; a new connection beyond that closes the one that has waited
  longest for its headers, or, when every connection is busy with a request, is answered 503 and closed.
"""
from __future__ import annotations

import time

from uvicorn.protocols.http.h11_impl import H11Protocol

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
         b"retry-after: 1\r\ncontent-length: 64\r\n\r\n"
         b'{"error": "too many open connections; retry later (llamaforge)"}')


def guarded_protocol(header_timeout: float, max_connections: int) -> type:
    """An H11Protocol class enforcing the header deadline and the connection cap (pass as uvicorn `http=`)."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = None
            self._waiting_since = time.monotonic()
            if len(self.connections) > max_connections and not self._evict_one():
                transport.write(_BUSY)
                transport.close()
                return
            self._arm(header_timeout)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # the headers are in: the request is being served

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._waiting_since = time.monotonic()
                self._arm(self.timeout_keep_alive + header_timeout)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        # -- helpers
        @property
        def awaiting_headers(self) -> bool:
            return self._deadline is not None

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            d = getattr(self, "_deadline", None)
            if d is not None:
                d.cancel()
            self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

        def _evict_one(self) -> bool:
            waiting = [c for c in self.connections if c is not self and getattr(c, "awaiting_headers", False)]
            if not waiting:
                return False
            oldest = min(waiting, key=lambda c: c._waiting_since)
            oldest._disarm()
            oldest.transport.close()
            return True

    return GuardedH11Protocol
