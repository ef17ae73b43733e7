"""Dropping a request's queued work when its client goes away, for every transport.

    submitted = CancelOnEnd()               # pass as `submitted=` to DataPlane.infer / classify
    ...                                     # the transport learns that the client left:
    submitted.end()                         # queued work (batching.Pending) is cancelled: never run

The gRPC servicers call end() from the RPC's termination callback; the HTTP app calls it when
its ASGI receive channel says http.disconnect. Work added after end() (the client left while the
request was still being decoded) is cancelled as it is added. end() may run on another thread than
the one adding work: appending before checking `ended`, and setting `ended` before copying the
list, means every item is cancelled by one side or the other.
"""

from __future__ import annotations


class CancelOnEnd(list):
    """A request's queued work (batching.Pending); after end() nothing of it still queued runs."""

    def __init__(self):
        super().__init__()
        self.ended = False

    def end(self) -> None:
        self.ended = True
        for pending in list(self):
            if not pending.done():
                pending.cancel()

    def append(self, pending) -> None:
        super().append(pending)
        if self.ended:
            pending.cancel()

    def extend(self, items) -> None:
        for pending in items:
            self.append(pending)


__all__ = ["CancelOnEnd"]
