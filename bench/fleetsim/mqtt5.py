"""A minimal MQTT 5 client over asyncio streams: what a simulated device needs, nothing more.

CONNECT (clean start or a persistent session with an expiry, a Last Will), SUBSCRIBE, PUBLISH at
QoS 0/1 in both directions (incoming QoS 1 acknowledged after the handler ran), PINGREQ and a
normal DISCONNECT. A lost connection is reconnected with jittered backoff; unacknowledged QoS 1
publishes go out again with DUP set, so nothing a device sent is lost to a broker restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

_LOGGER = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
PROP_SESSION_EXPIRY = 0x11

Handler = Callable[[str, bytes], Awaitable[None] | None]


class MqttError(ConnectionError):
    """The broker refused us or broke the protocol; the message names the client and the code."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(raw)) + raw


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([(kind << 4) | flags]) + _varint(len(body)) + body


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def connect_packet(client_id: str, *, keepalive: int, clean_start: bool, session_expiry: int,
                   will: Will | None) -> bytes:
    flags = 0x02 if clean_start else 0
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    props = bytes([PROP_SESSION_EXPIRY]) + struct.pack("!I", session_expiry) if session_expiry else b""
    body = _str("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive) + _varint(len(props)) + props
    body += _str(client_id)
    if will is not None:
        body += _varint(0) + _str(will.topic) + _str(will.payload)
    return _packet(CONNECT, 0, body)


def publish_packet(topic: str, payload: bytes, qos: int, retain: bool, packet_id: int, dup: bool = False) -> bytes:
    flags = (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + b"\x00" + payload
    return _packet(PUBLISH, flags, body)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """(type, flags, body) of the next packet; IncompleteReadError at EOF."""
    first = await reader.readexactly(1)
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    body = await reader.readexactly(length) if length else b""
    return first[0] >> 4, first[0] & 0x0F, body


class Client:
    """One device's MQTT 5 session. `on_message(topic, payload)` may be a coroutine function."""

    def __init__(self, host: str, port: int, client_id: str, on_message: Handler, *, keepalive: int = 300,
                 clean_start: bool = False, session_expiry: int = 3600, will: Will | None = None,
                 on_connect: Callable[[bool], Awaitable[None]] | None = None) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.on_message = on_message
        self.on_connect = on_connect
        self.keepalive = keepalive
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.will = will
        self.subscriptions: list[tuple[str, int]] = []
        self.reconnects = 0
        self.closed = False
        self._writer: asyncio.StreamWriter | None = None
        self._next_id = 0
        self._unacked: dict[int, tuple[bytes, asyncio.Future]] = {}  # packet id -> (PUBLISH, its PUBACK)
        self._suback: dict[int, asyncio.Future] = {}
        self._connected = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.last_io = 0.0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _packet_id(self) -> int:
        while True:
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._unacked and self._next_id not in self._suback:
                return self._next_id

    async def start(self, timeout: float = 60.0) -> None:
        """Connect (retrying) and keep the session up in the background."""
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def _open(self) -> bool:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(connect_packet(self.client_id, keepalive=self.keepalive,
                                    clean_start=self.clean_start and self.reconnects == 0,
                                    session_expiry=self.session_expiry, will=self.will))
        kind, _flags, body = await asyncio.wait_for(read_packet(reader), 30)
        if kind != CONNACK or body[1] != 0:
            writer.close()
            raise MqttError(f"{self.client_id}: CONNACK type {kind} reason {body[1] if len(body) > 1 else '?'}")
        self._reader, self._writer = reader, writer
        return bool(body[0] & 1)

    async def _run(self) -> None:
        delay = 0.5
        while not self.closed:
            try:
                session_present = await self._open()
            except (TimeoutError, OSError, asyncio.IncompleteReadError, MqttError) as exc:
                _LOGGER.debug("%s: connect failed: %s", self.client_id, exc)
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(10.0, delay * 2)
                continue
            delay = 0.5
            self.last_io = asyncio.get_running_loop().time()
            # Unacknowledged publishes go out again (DUP) before anything new, as MQTT requires.
            for _pid, (packet, _fut) in sorted(self._unacked.items()):
                self._writer.write(bytes([packet[0] | 0x08]) + packet[1:])
            reader_task = asyncio.create_task(self._read_loop(self._reader))
            if not session_present and self.subscriptions:
                await self._send_subscribe(self.subscriptions, wait=False)
            self._connected.set()
            if self.on_connect is not None:
                asyncio.create_task(self._guard(self.on_connect(session_present)))
            with contextlib.suppress(Exception):
                await reader_task
            self._connected.clear()
            if not self.closed:
                self.reconnects += 1

    async def _guard(self, coro: Awaitable[None]) -> None:
        try:
            await coro
        except Exception:
            _LOGGER.exception("%s: handler failed", self.client_id)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                kind, flags, body = await read_packet(reader)
                self.last_io = loop.time()
                if kind == PUBLISH:
                    await self._on_publish(flags, body)
                elif kind == PUBACK:
                    pid = struct.unpack_from("!H", body)[0]
                    entry = self._unacked.pop(pid, None)
                    if entry is not None and not entry[1].done():
                        entry[1].set_result(None)
                elif kind == SUBACK:
                    fut = self._suback.pop(struct.unpack_from("!H", body)[0], None)
                    if fut is not None and not fut.done():
                        fut.set_result(body)
                elif kind == DISCONNECT:
                    return
        finally:
            writer = self._writer
            if writer is not None:
                writer.transport.abort()

    async def _on_publish(self, flags: int, body: bytes) -> None:
        qos = (flags >> 1) & 3
        tlen = struct.unpack_from("!H", body)[0]
        topic = body[2:2 + tlen].decode()
        pos = 2 + tlen
        pid = 0
        if qos:
            pid = struct.unpack_from("!H", body, pos)[0]
            pos += 2
        plen, pos = _read_varint(body, pos)
        payload = body[pos + plen:]
        result = self.on_message(topic, payload)
        if asyncio.iscoroutine(result):
            await result
        if qos == 1 and self._writer is not None:
            self._writer.write(_packet(PUBACK, 0, struct.pack("!H", pid)))

    async def _send_subscribe(self, filters: list[tuple[str, int]], wait: bool) -> None:
        pid = self._packet_id()
        body = struct.pack("!H", pid) + b"\x00" + b"".join(_str(t) + bytes([q]) for t, q in filters)
        fut = asyncio.get_running_loop().create_future()
        self._suback[pid] = fut
        self._writer.write(_packet(SUBSCRIBE, 2, body))
        if wait:
            await asyncio.wait_for(fut, 60)

    async def subscribe(self, filters: list[tuple[str, int]]) -> None:
        """Subscribe now and after every reconnect that lost the session."""
        self.subscriptions.extend(filters)
        await self._connected.wait()
        await self._send_subscribe(filters, wait=True)

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish; at QoS 1 return once the broker acknowledged it (across reconnects)."""
        if qos == 0:
            if self._writer is not None and self.connected:
                self._writer.write(publish_packet(topic, payload, 0, retain, 0))
            return
        pid = self._packet_id()
        packet = publish_packet(topic, payload, 1, retain, pid)
        fut = asyncio.get_running_loop().create_future()
        self._unacked[pid] = (packet, fut)
        if self.connected and self._writer is not None:
            self._writer.write(packet)
        await fut

    def ping_if_idle(self, now: float) -> None:
        if self.connected and self._writer is not None and now - self.last_io > self.keepalive / 2:
            self._writer.write(_packet(PINGREQ, 0, b""))
            self.last_io = now

    async def close(self) -> None:
        """Normal DISCONNECT (the broker keeps the session, drops the Will) and stop reconnecting."""
        self.closed = True
        if self._writer is not None and self.connected:
            with contextlib.suppress(OSError):
                self._writer.write(_packet(DISCONNECT, 0, b""))
                await self._writer.drain()
            self._writer.transport.abort()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
