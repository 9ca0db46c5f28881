"""Live events fanned out to subscribers (the API's Server-Sent Events stream), without ever blocking the
daemon: each subscriber has a bounded queue, and a subscriber that falls behind loses its oldest events
(its stream says so) rather than holding the link or the pipeline up."""

from __future__ import annotations

import itertools
import queue
import threading
import time


class EventHub:
    def __init__(self, backlog: int = 1000):
        self.backlog = backlog
        self._subs: list[queue.Queue] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def publish(self, kind: str, data: dict) -> None:
        event = {"id": next(self._ids), "kind": kind, "at": time.time(), "data": data}
        with self._lock:
            subs = list(self._subs)
        for q in subs:
            try:
                q.put_nowait(event)
            except queue.Full:
                try:
                    q.get_nowait()  # drop the oldest for this slow subscriber
                    q.put_nowait({"id": event["id"], "kind": "dropped", "at": event["at"], "data": {}})
                except (queue.Empty, queue.Full):
                    pass

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(maxsize=self.backlog)
        with self._lock:
            self._subs.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._subs:
                self._subs.remove(q)
