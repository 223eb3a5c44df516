"""One owner for an MQTT connection, shared by the server and the agent.

A thin layer over paho-mqtt 2.x that adds what both ends need: URL parsing, persistent QoS 1
sessions, MQTT 5 with a 3.1.1 fallback, re-subscription after every reconnect, handlers whose
exceptions are logged with the topic and payload and never kill the network loop, and clear
errors for a broker that is unreachable or refuses our credentials.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.redact import redact_url

_LOGGER = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]
ConnectListener = Callable[[], None]

SESSION_EXPIRY_S = 7 * 24 * 3600
_AUTH_FAILURES = {"Not authorized", "Bad user name or password", "Banned"}


class ConnectError(ConnectionError):
    """The broker could not be reached or refused the connection."""

    def __init__(self, endpoint: str, reason: str = "") -> None:
        self.endpoint = endpoint
        self.reason = reason
        super().__init__(f"Not connected to {endpoint}" + (f": {reason}" if reason else ""))

    @property
    def refused_credentials(self) -> bool:
        """The broker rejected who we are: retrying with the same credentials cannot help."""
        return self.reason in _AUTH_FAILURES


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is: parsed from mqtt://[user:pass@]host:port or mqtts://..."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in {"mqtt", "mqtts", "tcp", "ssl"} or not parts.hostname:
            raise ValueError(f"broker URL {redact_url(url)!r} must look like mqtt://HOST:PORT or mqtts://HOST:PORT")
        tls = parts.scheme in {"mqtts", "ssl"}
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class Publication:
    """One queued message: wait for the broker's acknowledgement without touching paho's types.

    QoS 0 counts as published once written to the socket; QoS 1 once the PUBACK arrived.
    """

    __slots__ = ("_info",)

    def __init__(self, info: paho.MQTTMessageInfo) -> None:
        self._info = info

    @property
    def published(self) -> bool:
        return bool(self._info.is_published())

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` s for the acknowledgement; True once published.

        False (never an exception) when it did not arrive in time or the message cannot be sent
        any more (the client's queue refused it or the link is stopping).
        """
        try:
            self._info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            _LOGGER.debug("publish not confirmed (mid=%s): %s", self._info.mid, exc)
            return False
        return self.published


def _strip_share(topic_filter: str) -> str:
    """The filter a shared subscription matches against ($share/GROUP/filter -> filter)."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


class MqttLink:
    """A persistent MQTT session with routed, exception-safe handlers."""

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        clean_start: bool = False,
        will: tuple[str, bytes, int, bool] | None = None,
        protocol: str = "auto",
        max_inflight: int = 200,
        keepalive: int = 30,
    ) -> None:
        if protocol not in {"auto", "5", "3.1.1"}:
            raise ValueError(f"protocol must be auto, 5 or 3.1.1, got {protocol!r}")
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self._username = username or self.address.username
        self._password = password or self.address.password
        self._tls = (tls_ca, tls_cert, tls_key) if (tls_ca or self.address.tls) else None
        self._clean_start = clean_start
        self._will = will
        self._protocol = protocol
        self._max_inflight = max_inflight
        self._keepalive = keepalive
        self._subs: dict[str, tuple[Handler, int]] = {}
        self._listeners: list[ConnectListener] = []
        self._lock = threading.RLock()
        self._connected = threading.Event()
        # SUBSCRIBE packet ids the broker has not acknowledged yet, and SUBACKs that beat their bookkeeping.
        self._subacks = threading.Condition()
        self._sub_pending: set[int] = set()
        self._sub_early: set[int] = set()
        self._refused: str | None = None
        self._connecting = False
        self._client: paho.Client | None = None
        self.is_v5 = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Connect (MQTT 5 first unless told otherwise) and start the network thread."""
        versions = {"auto": ["5", "3.1.1"], "5": ["5"], "3.1.1": ["3.1.1"]}[self._protocol]
        last = ""
        for i, version in enumerate(versions):
            wait = timeout if i == len(versions) - 1 else min(timeout, 5.0)
            try:
                self._start_version(version, wait)
                return
            except ConnectError as exc:
                last = exc.reason
                if exc.refused_credentials:
                    raise
                _LOGGER.info("MQTT %s connect to %s failed (%s)%s", version, self.address, exc.reason,
                             "; trying 3.1.1" if i < len(versions) - 1 else "")
        raise ConnectError(str(self.address), last)

    def _start_version(self, version: str, timeout: float) -> None:
        self._teardown()
        v5 = version == "5"
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else self._clean_start,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        )
        client.suppress_exceptions = True
        client.max_inflight_messages_set(self._max_inflight)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        if self._username:
            client.username_pw_set(self._username, self._password)
        if self._tls:
            ca, cert, key = self._tls
            client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
        if self._will:
            topic, payload, qos, retain = self._will
            client.will_set(topic, payload, qos, retain)
        client.on_socket_open = _no_delay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client
        self.is_v5 = v5
        self._refused = None
        self._connected.clear()
        self._connecting = True
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0 if self._clean_start else SESSION_EXPIRY_S
        try:
            if v5:
                client.connect(self.address.host, self.address.port, self._keepalive,
                               clean_start=self._clean_start, properties=props)
            else:
                client.connect(self.address.host, self.address.port, self._keepalive)
        except OSError as exc:
            self._teardown()
            raise ConnectError(str(self.address), str(exc)) from exc
        client.loop_start()
        if not self._connected.wait(timeout) or self._refused:
            reason = self._refused or f"no CONNACK within {timeout:.0f} s"
            self._connecting = False
            self._teardown()
            raise ConnectError(str(self.address), reason)

    def _teardown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            finally:
                client.loop_stop()

    def stop(self) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread."""
        self._teardown()
        self._connected.clear()

    def __enter__(self) -> MqttLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state -----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set() and not self._refused

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def add_connect_listener(self, listener: ConnectListener) -> None:
        """Run `listener` after every (re)connect, e.g. to republish state or ask for missing chunks."""
        with self._lock:
            self._listeners.append(listener)

    # -- pub/sub ---------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> Callable[[], None]:
        """Route messages matching `topic_filter` to `handler`; kept across reconnects."""
        with self._lock:
            self._subs[topic_filter] = (handler, qos)
            client = self._client
        if client is not None and self._connected.is_set():
            self._track(client.subscribe(topic_filter, qos))

        def unsubscribe() -> None:
            with self._lock:
                self._subs.pop(topic_filter, None)
                current = self._client
            if current is not None:
                current.unsubscribe(topic_filter)

        return unsubscribe

    def wait_subscribed(self, timeout: float) -> bool:
        """Block until the broker acknowledged every subscription sent so far (False after `timeout`).

        Until then a message published to a matching topic may be routed to nobody."""
        with self._subacks:
            return self._subacks.wait_for(lambda: not self._sub_pending, timeout=timeout)

    def _track(self, result: tuple[int, int | None]) -> None:
        """Remember a SUBSCRIBE's packet id until its SUBACK (not sent when the client is offline)."""
        rc, mid = result
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            return
        with self._subacks:
            if mid in self._sub_early:
                self._sub_early.discard(mid)
            else:
                self._sub_pending.add(mid)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> Publication:
        """Queue a message; QoS 1 messages are resent by paho after a reconnect.

        Raises ConnectError once the link is stopped; `Publication.wait` tells whether it arrived.
        """
        client = self._client
        if client is None:
            raise ConnectError(str(self.address), "link is stopped")
        return Publication(client.publish(topic, payload, qos=qos, retain=retain))

    # -- paho callbacks (network thread) -----------------------------------------------------
    def _on_connect(self, client: paho.Client, _userdata: object, _flags: object, reason: object,
                    _props: object) -> None:
        self._connecting = False
        if getattr(reason, "is_failure", False):
            text = str(reason)
            _LOGGER.warning("broker %s refused connection: %s", self.address, text)
            self._refused = text
            if text in _AUTH_FAILURES:
                client.disconnect()  # bad credentials never get better by retrying
            self._connected.set()
            return
        self._refused = None
        with self._lock:
            subs = list(self._subs.items())
            listeners = list(self._listeners)
        with self._subacks:  # packets of an earlier connection are never acknowledged
            self._sub_pending.clear()
            self._sub_early.clear()
        for topic_filter, (_handler, qos) in subs:
            self._track(client.subscribe(topic_filter, qos))
        self._connected.set()
        _LOGGER.info("connected to %s as %s (MQTT %s)", self.address, self.client_id, "5" if self.is_v5 else "3.1.1")
        for listener in listeners:
            try:
                listener()
            except Exception:
                _LOGGER.exception("connect listener %s failed", getattr(listener, "__name__", listener))

    def _on_subscribe(self, _client: paho.Client, _userdata: object, mid: int, _reasons: object,
                      _props: object) -> None:
        with self._subacks:
            if mid in self._sub_pending:
                self._sub_pending.discard(mid)
                self._subacks.notify_all()
            else:
                self._sub_early.add(mid)

    def _on_disconnect(self, _client: paho.Client, _userdata: object, _flags: object, reason: object,
                       _props: object) -> None:
        if self._connecting:
            # Closed before any CONNACK (e.g. an MQTT 3.1.1-only broker facing an MQTT 5 CONNECT):
            # fail the attempt now instead of waiting out the timeout.
            self._refused = f"connection closed before CONNACK ({reason})"
            self._connecting = False
            self._connected.set()
            return
        self._connected.clear()
        _LOGGER.info("disconnected from %s: %s", self.address, reason)

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            routes = [h for f, (h, _q) in self._subs.items() if paho.topic_matches_sub(_strip_share(f), msg.topic)]
        for handler in routes:
            try:
                handler(msg.topic, msg.payload)  # type: ignore[arg-type]  # paho hands bytes to on_message
            except Exception:
                _LOGGER.exception("exception in %s when handling msg on %r: %r",
                                  getattr(handler, "__name__", handler), msg.topic, msg.payload[:200])


def _no_delay(_client: paho.Client, _userdata: object, sock: object) -> None:
    """Disable Nagle's algorithm: a small message (a device event, a chunk request) otherwise waits
    for the ACK of the previous one, which the peer delays by up to 40 ms, on every round trip."""
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is None:
        return
    try:
        setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not a TCP socket (unix transport): nothing to tune
        _LOGGER.debug("TCP_NODELAY not set: %s", exc)
