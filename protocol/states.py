"""Every named state and wire vocabulary of EdgeGuide, with the transitions each state may make.

The values are the strings on the wire and in the registry today (a `StrEnum` member *is* that
string: it compares, hashes, formats and JSON-encodes as it), so adopting these names changes no
byte. The transition tables live here, next to the states, so the agent's controller and the
server's registry check a change against one table instead of a from-set spread over call sites.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, Generic, TypeVar


class DeploymentStatus(StrEnum):
    """A deployment's status in the server's registry."""

    PENDING = "pending"  # created, manifest not sent yet
    TRANSFERRING = "transferring"  # manifest sent, chunks flowing
    MEASURING = "measuring"  # the device has the whole artifact and measures it
    PASSED = "passed"  # gated: PASS verdict sent, waiting for the device to promote
    FAILED = "failed"  # gated: FAIL verdict sent, waiting for the device to roll back
    REJECTED = "rejected"  # refused before or during transfer (by the server or the device)
    PROMOTED = "promoted"  # the device serves the new version
    ROLLED_BACK = "rolled_back"  # the device discarded the candidate and kept its model
    TIMEOUT = "timeout"  # no outcome within the deadline, or the device stayed offline
    CANCELLED = "cancelled"  # an operator ended it


class AgentPhase(StrEnum):
    """Where the agent's one deployment stands; IDLE is "no deployment in progress" (never sent)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    MEASURING = "measuring"
    AWAITING_VERDICT = "awaiting_verdict"


class RolloutStatus(StrEnum):
    """A staged rollout's status in the server's registry."""

    RUNNING = "running"
    ROLLING_BACK = "rolling_back"
    ABORTED = "aborted"
    COMPLETED = "completed"


class DeviceStatus(StrEnum):
    """A device's retained presence (DeviceState.status)."""

    ONLINE = "online"
    OFFLINE = "offline"


class EventType(StrEnum):
    """Event.type: one step of a deployment as the device saw it."""

    MANIFEST_ACCEPTED = "manifest_accepted"
    MANIFEST_REJECTED = "manifest_rejected"
    NEED_CHUNKS = "need_chunks"
    CHUNK_REJECTED = "chunk_rejected"
    DOWNLOAD_COMPLETE = "download_complete"
    VERIFY_FAILED = "verify_failed"
    LOAD_FAILED = "load_failed"
    MEASURING = "measuring"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    VERDICT_REJECTED = "verdict_rejected"
    COMMAND_REJECTED = "command_rejected"
    ERROR = "error"


class NeedChunksReason(StrEnum):
    """Event.reason of a `need_chunks` event: why the device names the chunks it still misses.

    The server's delivery window (server/window.py) re-sends chunks in flight only after STALLED or
    CHUNK_REJECTED; PROGRESS only moves the window on, RECONNECTED finds them queued at the broker."""

    PROGRESS = "progress"
    STALLED = "stalled"
    CHUNK_REJECTED = "chunk rejected"
    RECONNECTED = "reconnected"


class ErrorKind(StrEnum):
    """Report.error_kind: why a candidate could not be measured."""

    OP_VERSION = "op_version"
    LOAD_ERROR = "load_error"
    VERIFY_ERROR = "verify_error"
    TIMEOUT = "timeout"
    DISK_FULL = "disk_full"
    MEASURE_ERROR = "measure_error"


class VerdictOutcome(StrEnum):
    """Verdict.verdict."""

    PASS = "PASS"
    FAIL = "FAIL"


class CommandName(StrEnum):
    """Command.command: a name from a fixed set, never code."""

    REPORT_STATE = "report_state"
    ROLLBACK = "rollback"
    CANCEL = "cancel"


class MeasureMode(StrEnum):
    """Report.mode: the quick rules (tests, demos) or the production ones."""

    QUICK = "quick"
    FULL = "full"


S = TypeVar("S", bound=StrEnum)


def wire_values(states: type[StrEnum]) -> frozenset[str]:
    """The plain strings of a vocabulary: an error listing them prints 'error', not <EventType.ERROR: 'error'>."""
    return frozenset(s.value for s in states)


class TransitionError(ValueError):
    """A state change the table does not allow; names the machine, both states and what is allowed."""

    def __init__(self, machine: str, old: str, new: str, allowed: Iterable[str]) -> None:
        self.machine = machine
        self.old = old
        self.new = new
        options = ", ".join(sorted(allowed)) or "nothing (final state)"
        super().__init__(f"{machine}: {old} -> {new} is not allowed; from {old} only: {options}")


class Transitions(Generic[S]):
    """An allowed-transition table of one state machine (a state absent from the table is final)."""

    def __init__(self, machine: str, states: type[S], table: Mapping[S, Iterable[S]]) -> None:
        self.machine = machine
        self.states = states
        self._table: dict[S, frozenset[S]] = {s: frozenset() for s in states}
        for old, news in table.items():
            self._table[states(old)] = frozenset(states(n) for n in news)

    def targets(self, old: S | str) -> frozenset[S]:
        """States `old` may move to."""
        return self._table[self.states(old)]

    def sources(self, new: S | str) -> frozenset[S]:
        """States that may move to `new`: the from-set of a compare-and-set UPDATE."""
        target = self.states(new)
        return frozenset(old for old, news in self._table.items() if target in news)

    def final(self) -> frozenset[S]:
        """States nothing leaves."""
        return frozenset(s for s, news in self._table.items() if not news)

    def allowed(self, old: S | str, new: S | str) -> bool:
        return self.states(new) in self.targets(old)

    def check(self, old: S | str, new: S | str) -> S:
        """Return `new` as a member if `old -> new` is allowed, else raise TransitionError."""
        target = self.states(new)
        if target not in self.targets(old):
            raise TransitionError(self.machine, str(old), str(new), self.targets(old))
        return target


_D = DeploymentStatus
# Any deployment still in progress may be refused, time out, be cancelled, or end as the device
# reports (a promotion or rollback can arrive before the verdict is recorded: at-least-once delivery).
_ENDINGS = (_D.REJECTED, _D.TIMEOUT, _D.CANCELLED, _D.PROMOTED, _D.ROLLED_BACK)
DEPLOYMENT_TRANSITIONS: Transitions[DeploymentStatus] = Transitions("deployment", DeploymentStatus, {
    _D.PENDING: (_D.TRANSFERRING, _D.MEASURING, _D.PASSED, _D.FAILED, *_ENDINGS),
    _D.TRANSFERRING: (_D.MEASURING, _D.PASSED, _D.FAILED, *_ENDINGS),
    _D.MEASURING: (_D.PASSED, _D.FAILED, *_ENDINGS),
    _D.PASSED: _ENDINGS,
    _D.FAILED: _ENDINGS,
    # The device's outcome still counts after the server gave up waiting (it was only late).
    _D.TIMEOUT: (_D.PROMOTED, _D.ROLLED_BACK),
})
# Ended deployments: the server acts on them no more (TIMEOUT is ended, yet a late device outcome
# may still overwrite it, see the table). ACTIVE is the rest: what the server's tick watches.
DEPLOYMENT_TERMINAL: frozenset[DeploymentStatus] = frozenset(
    {_D.REJECTED, _D.PROMOTED, _D.ROLLED_BACK, _D.TIMEOUT, _D.CANCELLED})
DEPLOYMENT_ACTIVE: frozenset[DeploymentStatus] = frozenset(DeploymentStatus) - DEPLOYMENT_TERMINAL

_A = AgentPhase
AGENT_TRANSITIONS: Transitions[AgentPhase] = Transitions("agent deployment", AgentPhase, {
    _A.IDLE: (_A.DOWNLOADING,),
    # Every phase may end (finished, failed, superseded, cancelled, timed out) back to IDLE.
    _A.DOWNLOADING: (_A.MEASURING, _A.IDLE),
    _A.MEASURING: (_A.AWAITING_VERDICT, _A.IDLE),
    _A.AWAITING_VERDICT: (_A.IDLE,),
})

_R = RolloutStatus
ROLLOUT_TRANSITIONS: Transitions[RolloutStatus] = Transitions("rollout", RolloutStatus, {
    _R.RUNNING: (_R.RUNNING, _R.ROLLING_BACK, _R.COMPLETED),  # RUNNING -> RUNNING: the next stage
    _R.ROLLING_BACK: (_R.ABORTED,),
})

_TABLES: dict[type[StrEnum], Transitions[Any]] = {
    DeploymentStatus: DEPLOYMENT_TRANSITIONS,
    AgentPhase: AGENT_TRANSITIONS,
    RolloutStatus: ROLLOUT_TRANSITIONS,
}


def check_transition(old: S | str, new: S) -> S:
    """Check `old -> new` against the table of `new`'s state machine; return `new` or raise TransitionError."""
    table = _TABLES.get(type(new))
    if table is None:
        raise TypeError(f"no transition table for {type(new).__name__}")
    table.check(old, new)
    return new
