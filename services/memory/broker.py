"""An in-process broker that routes as RabbitMQ does, for MemoryBus (no sockets, no threads of its own).

It keeps exchanges (direct, topic, fanout, and the default exchange "" that routes by queue
name), queues with their arguments, and bindings. A message's ``CC`` header adds routing keys
the way RabbitMQ's sender-selected distribution does, and is removed from what is delivered.
A message rejected without requeue, or expired, goes to its queue's ``x-dead-letter-exchange``
with an ``x-death`` record. Direct reply-to is a pseudo-queue per waiting request.

Every structure is guarded by one lock; ``changed`` (a condition on that lock) is notified
whenever a queue gains a message or a bus gets work, so buses wait on it instead of polling.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from sagmq.wire.errors import BrokerRefused, SagmqError
from sagmq.wire.topology import DIRECT, FANOUT, TOPIC, Topology

REPLY_TO = "amq.rabbitmq.reply-to"
DLX = "x-dead-letter-exchange"
DLX_KEY = "x-dead-letter-routing-key"


@dataclass(slots=True)
class Envelope:
    """A message as the broker holds it: body and the AMQP properties sagmq uses."""

    exchange: str
    routing_key: str
    body: bytes
    msg_type: str
    headers: dict[str, Any]
    user_id: str | None
    message_id: str | None
    correlation_id: str | None = None
    reply_to: str | None = None
    expires_at: float | None = None  # monotonic time, from the expiration property
    persistent: bool = True
    redelivered: bool = False


@dataclass(slots=True)
class _Queue:
    name: str
    arguments: dict[str, Any]
    messages: deque[Envelope] = field(default_factory=deque)


@functools.lru_cache(maxsize=1024)
def topic_matches(pattern: str, key: str) -> bool:
    """Whether a topic binding pattern matches a routing key ('*' one word, '#' zero or more)."""
    return _match(tuple(pattern.split(".")), tuple(key.split(".")))


def _match(pat: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pat:
        return not words
    head, rest = pat[0], pat[1:]
    if head == "#":
        # '#' takes zero words, or one more word and stays
        return _match(rest, words) or (bool(words) and _match(pat, words[1:]))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])


def _cc_keys(headers: dict[str, Any]) -> list[str]:
    keys = []
    for name in ("CC", "BCC"):
        value = headers.get(name) or []
        for k in value if isinstance(value, list | tuple) else [value]:
            keys.append(k.decode() if isinstance(k, bytes) else str(k))
    return keys


class MemoryBroker:
    """Exchanges, queues and bindings shared by every MemoryBus of a test (thread-safe, one lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.exchanges: dict[str, str] = {}  # name -> type
        self.queues: dict[str, _Queue] = {}
        self.bindings: dict[str, list[tuple[str, str]]] = {}  # exchange -> [(queue, routing key)]

    # --- topology (RabbitMQ refuses a redeclaration that differs: so does this) ------------

    def declare(self, topo: Topology) -> None:
        """Declare a topology's exchanges, queues and bindings (idempotent)."""
        with self.lock:
            for ex in topo.exchanges:
                if ex.type not in (DIRECT, TOPIC, FANOUT):
                    raise BrokerRefused(f"exchange type {ex.type!r} is not supported by the memory broker")
                if self.exchanges.setdefault(ex.name, ex.type) != ex.type:
                    raise BrokerRefused(f"PRECONDITION_FAILED - exchange {ex.name!r} exists with type "
                                        f"{self.exchanges[ex.name]!r}, not {ex.type!r}")
                self.bindings.setdefault(ex.name, [])
            for q in topo.queues:
                have = self.queues.setdefault(q.name, _Queue(q.name, dict(q.arguments)))
                if have.arguments != q.arguments:
                    raise BrokerRefused(f"PRECONDITION_FAILED - queue {q.name!r} exists with arguments "
                                        f"{have.arguments}, not {q.arguments}")
            for b in topo.bindings:
                if b.exchange not in self.exchanges or b.queue not in self.queues:
                    raise BrokerRefused(f"NOT_FOUND - cannot bind {b.queue!r} to {b.exchange!r}")
                if (b.queue, b.routing_key) not in self.bindings[b.exchange]:
                    self.bindings[b.exchange].append((b.queue, b.routing_key))

    def delete(self, topo: Topology) -> None:
        """Delete a topology's queues (with their bindings and messages) and exchanges."""
        with self.lock:
            gone = {q.name for q in topo.queues}
            for name in gone:
                self.queues.pop(name, None)
            for ex in topo.exchanges:
                self.exchanges.pop(ex.name, None)
                self.bindings.pop(ex.name, None)
            for ex_name, binds in self.bindings.items():
                self.bindings[ex_name] = [b for b in binds if b[0] not in gone]

    # --- publishing -------------------------------------------------------------------

    def publish(self, env: Envelope, mandatory: bool = True) -> int:
        """Route a message to every matching queue; return how many took it.

        Raises BrokerRefused for a missing exchange and SagmqError for an unroutable mandatory message.
        """
        with self.lock:
            if env.exchange and env.exchange not in self.exchanges:
                raise BrokerRefused(f"NOT_FOUND - no exchange {env.exchange!r}")
            targets = self._route(env.exchange, [env.routing_key, *_cc_keys(env.headers)])
            if not targets and mandatory:
                raise SagmqError(f"message to {env.exchange!r} with key {env.routing_key!r} was unroutable")
            headers = {k: v for k, v in env.headers.items() if k not in ("CC", "BCC")}
            for q in targets:
                q.messages.append(replace(env, headers=dict(headers)))
            if targets:
                self.changed.notify_all()
            return len(targets)

    def _route(self, exchange: str, keys: list[str]) -> list[_Queue]:
        """The queues a message with these routing keys goes to, each once (lock held)."""
        names: list[str] = []
        if exchange == "":
            names = [k for k in keys if k in self.queues]
        else:
            kind = self.exchanges[exchange]
            for queue, bound in self.bindings[exchange]:
                if kind == FANOUT or any(bound == k if kind == DIRECT else topic_matches(bound, k) for k in keys):
                    names.append(queue)
        return [self.queues[n] for n in dict.fromkeys(names)]

    # --- consuming (buses call these; acks are the bus's own bookkeeping) -------------------

    def pop(self, queue: str) -> Envelope | None:
        """The next live message of a queue (expired ones are dead-lettered on the way), or None."""
        with self.lock:
            q = self._queue(queue)
            now = time.monotonic()
            while q.messages:
                env = q.messages.popleft()
                if env.expires_at is None or env.expires_at > now:
                    return env
                self._dead_letter(q, env, "expired")
            return None

    def ready(self, queue: str) -> bool:
        """Whether a queue holds a message (call with the lock held: wait predicates use it)."""
        q = self.queues.get(queue)
        return q is not None and bool(q.messages)

    def requeue(self, queue: str, envs: list[Envelope]) -> None:
        """Put messages back at the head of their queue, in order, marked redelivered."""
        with self.lock:
            q = self.queues.get(queue)
            if q is None:
                return  # deleted meanwhile: the messages go with it
            for env in reversed(envs):
                env.redelivered = True
                q.messages.appendleft(env)
            self.changed.notify_all()

    def reject(self, queue: str, env: Envelope) -> None:
        """Reject without requeue: the message goes to the queue's dead-letter exchange, if it has one."""
        with self.lock:
            q = self.queues.get(queue)
            if q is not None:
                self._dead_letter(q, env, "rejected")

    def _dead_letter(self, q: _Queue, env: Envelope, reason: str) -> None:
        """RabbitMQ's dead-lettering: to x-dead-letter-exchange, with an x-death record (lock held)."""
        dlx = q.arguments.get(DLX)
        if dlx is None or dlx not in self.exchanges:
            return  # dropped, as RabbitMQ drops it
        death = {"queue": q.name, "reason": reason, "count": 1, "exchange": env.exchange,
                 "routing-keys": [env.routing_key], "time": int(time.time())}
        headers = {**env.headers, "x-death": [death, *env.headers.get("x-death", [])]}
        key = q.arguments.get(DLX_KEY, env.routing_key)
        for target in self._route(dlx, [key]):
            target.messages.append(replace(env, exchange=dlx, routing_key=key, headers=dict(headers),
                                           expires_at=None, redelivered=False))
        self.changed.notify_all()

    def _queue(self, name: str) -> _Queue:
        q = self.queues.get(name)
        if q is None:
            raise BrokerRefused(f"NOT_FOUND - no queue {name!r}")
        return q

    def has_queue(self, name: str) -> bool:
        """Whether a queue exists."""
        with self.lock:
            return name in self.queues

    # --- direct reply-to and inspection ---------------------------------------------------

    def open_reply_queue(self) -> str:
        """A pseudo-queue for one requester's replies (RabbitMQ's amq.rabbitmq.reply-to.<token>)."""
        name = f"{REPLY_TO}.{uuid.uuid4().hex}"
        with self.lock:
            self.queues[name] = _Queue(name, {})
        return name

    def close_reply_queue(self, name: str) -> None:
        """Drop a reply pseudo-queue: later replies to it are unroutable (and dropped)."""
        with self.lock:
            self.queues.pop(name, None)

    def peek(self, queue: str, limit: int = 1000) -> list[Envelope]:
        """Up to limit messages of a queue, left in place (marked redelivered, as a browse does)."""
        with self.lock:
            out = list(self._queue(queue).messages)[:limit]
            for env in out:
                env.redelivered = True
            return [replace(env, headers=dict(env.headers)) for env in out]

    def depth(self, queue: str) -> int:
        """How many messages wait in a queue (ready, not delivered)."""
        with self.lock:
            return len(self._queue(queue).messages)

    def wake(self) -> None:
        """Wake every bus waiting for work (say, after a test set a service's stop event)."""
        with self.lock:
            self.changed.notify_all()
