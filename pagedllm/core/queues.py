"""The scheduler's waiting queue and the order of its running list, per scheduling policy.

fcfs: arrivals queue at the back, preempted requests go back to the front; requests run in the order admitted.
priority: the same within each priority (lower runs first), so equal priorities behave exactly as fcfs: the waiting
queue is ordered by (priority, position), where an arrival takes the next position at the back and a preempted
request the next one at the front, and the running list by (priority, admission): the last running request, the one
preempted first when the pool runs dry, is the newest of the worst priority."""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from typing import Iterator, Protocol

from pagedllm.engine.request import Request

POLICIES = ("fcfs", "priority")


class WaitingQueue(Protocol):
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Request]: ...
    def __getitem__(self, index: int) -> Request: ...
    def append(self, request: Request) -> None: ...
    def appendleft(self, request: Request) -> None: ...
    def popleft(self) -> Request: ...
    def extendleft(self, requests: Iterator[Request]) -> None: ...
    def remove(self, request: Request) -> None: ...


class PriorityQueue:
    """Waiting requests by (priority, position). A request keeps its key while it waits, so one popped and put back
    (`extendleft`: a grammar still compiling, an adapter over max_loras) returns to the same place."""

    def __init__(self) -> None:
        self._keys: list[tuple[int, int]] = []
        self._requests: list[Request] = []
        self._back, self._front = itertools.count(), itertools.count(-1, -1)

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    def __getitem__(self, index: int) -> Request:
        return self._requests[index]

    def _insert(self, request: Request, key: tuple[int, int]) -> None:
        request.queue_key = key
        i = bisect.bisect(self._keys, key)
        self._keys.insert(i, key)
        self._requests.insert(i, request)

    def append(self, request: Request) -> None:
        self._insert(request, (request.priority, next(self._back)))

    def appendleft(self, request: Request) -> None:
        self._insert(request, (request.priority, next(self._front)))

    def extendleft(self, requests: Iterator[Request]) -> None:
        for request in requests:
            self._insert(request, request.queue_key)

    def popleft(self) -> Request:
        del self._keys[0]
        return self._requests.pop(0)

    def remove(self, request: Request) -> None:
        i = bisect.bisect_left(self._keys, request.queue_key)
        assert self._requests[i] is request
        del self._keys[i], self._requests[i]


def waiting_queue(policy: str) -> WaitingQueue:
    if policy not in POLICIES:
        raise ValueError(f"scheduling_policy must be one of {', '.join(POLICIES)}; got {policy!r}.")
    return PriorityQueue() if policy == "priority" else deque()  # type: ignore[return-value]
