"""A deadline for a whole network request: connecting, the response headers and every byte of the
body.

A client's own timeouts bound one socket operation each: an endpoint that sends one byte every half
second never trips a 60-second read timeout and holds a request, and with it a run's start-up,
forever. `within_deadline` runs the request in a daemon thread and gives up on it when its deadline
passes (closing what it opened, where it can): the caller gets a TimeoutError naming the request,
and the abandoned thread cannot keep the process alive. It works with any client (botocore here,
fsspec or plain HTTP alike) because it wraps the call, not the socket."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

R = TypeVar("R")
# a body must arrive at least this fast on average (after the first timeout_s)
MIN_BYTES_PER_SECOND = 1 << 20


def _close_quietly(thing) -> None:
    with contextlib.suppress(Exception):
        thing.close()


def request_deadline(timeout_s: float, size: int = 0) -> float:
    """Seconds a request of `size` body bytes may take: `timeout_s` plus the time at
    MIN_BYTES_PER_SECOND."""
    return timeout_s + size / MIN_BYTES_PER_SECOND


def within_deadline(request: Callable[[list], R], seconds: float, what: str) -> R:
    """`request(opened)` in a daemon thread, waited for at most `seconds`.

    Args:
        request: makes the request and reads its body; it may append to `opened` what holds the
            connection (a response body with `close()`), closed when the deadline passes so that the
            thread ends sooner.
        seconds: the whole request's deadline.
        what: names the request in the error ("GET s3://bucket/shard.tar").

    Returns:
        What `request` returned; its exception is raised here. TimeoutError when the deadline
            passed.
    """
    outcome: dict[str, object] = {}
    opened: list = []

    def run() -> None:
        try:
            outcome["value"] = request(opened)
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="deadline-request", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        # close() waits for the blocked read (a buffered stream's lock): it gets a thread of its own
        for thing in opened:
            closer = threading.Thread(target=_close_quietly, args=(thing,), name="deadline-close")
            closer.daemon = True
            closer.start()
        raise TimeoutError(f"{what} did not finish within its deadline of {seconds:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
