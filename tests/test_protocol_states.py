"""The state vocabularies and transition tables of protocol/states.py."""

from __future__ import annotations

import json

import pytest

from protocol import messages
from protocol.states import (
    AGENT_TRANSITIONS,
    DEPLOYMENT_ACTIVE,
    DEPLOYMENT_TERMINAL,
    DEPLOYMENT_TRANSITIONS,
    ROLLOUT_TRANSITIONS,
    AgentPhase,
    CommandName,
    DeploymentStatus,
    DeviceStatus,
    ErrorKind,
    EventType,
    MeasureMode,
    RolloutStatus,
    TransitionError,
    Transitions,
    VerdictOutcome,
    check_transition,
)

D = DeploymentStatus


def test_members_are_the_wire_strings() -> None:
    """A member is its string: equal, hashed alike, formatted and JSON-encoded as the bare value."""
    assert D.ROLLED_BACK == "rolled_back"
    assert {"rolled_back": 1}[D.ROLLED_BACK] == 1
    assert f"{D.PENDING}" == "pending" and str(D.PENDING) == "pending"
    assert json.dumps({"status": D.TIMEOUT, "type": EventType.NEED_CHUNKS}) == \
        '{"status": "timeout", "type": "need_chunks"}'


def test_vocabularies_are_todays_wire_strings() -> None:
    assert {e.value for e in EventType} == {
        "manifest_accepted", "manifest_rejected", "need_chunks", "chunk_rejected", "download_complete",
        "verify_failed", "load_failed", "measuring", "promoted", "rolled_back", "verdict_rejected",
        "command_rejected", "error"}
    assert {e.value for e in ErrorKind} == {
        "op_version", "load_error", "verify_error", "timeout", "disk_full", "measure_error"}
    assert {v.value for v in VerdictOutcome} == {"PASS", "FAIL"}
    assert {c.value for c in CommandName} == {"report_state", "rollback", "cancel"}
    assert set(EventType) == messages.EVENT_TYPES
    assert set(ErrorKind) == messages.ERROR_KINDS
    assert set(VerdictOutcome) == messages.VERDICTS
    assert set(CommandName) == messages.COMMANDS
    assert {s.value for s in DeviceStatus} == {"online", "offline"}
    assert {m.value for m in MeasureMode} == {"quick", "full"}


def test_deployment_statuses_match_the_registry() -> None:
    from server import registry

    assert tuple(DeploymentStatus) == registry.STATUSES
    assert registry.TERMINAL == DEPLOYMENT_TERMINAL
    assert registry.ACTIVE == DEPLOYMENT_ACTIVE


def test_deployment_from_sets_are_the_ones_the_deployer_uses() -> None:
    """The compare-and-set UPDATEs of server/deployer.py move from exactly these statuses."""
    assert DEPLOYMENT_TRANSITIONS.sources(D.TRANSFERRING) == {D.PENDING}
    assert DEPLOYMENT_TRANSITIONS.sources(D.MEASURING) == {D.PENDING, D.TRANSFERRING}
    for gated in (D.PASSED, D.FAILED):
        assert DEPLOYMENT_TRANSITIONS.sources(gated) == {D.PENDING, D.TRANSFERRING, D.MEASURING}
    for ended in (D.REJECTED, D.TIMEOUT, D.CANCELLED):
        assert DEPLOYMENT_TRANSITIONS.sources(ended) == DEPLOYMENT_ACTIVE
    for outcome in (D.PROMOTED, D.ROLLED_BACK):  # a late device outcome overrides a timeout
        assert DEPLOYMENT_TRANSITIONS.sources(outcome) == DEPLOYMENT_ACTIVE | {D.TIMEOUT}
    assert DEPLOYMENT_TRANSITIONS.sources(D.PENDING) == frozenset()


def test_final_states_cannot_move() -> None:
    assert DEPLOYMENT_TRANSITIONS.final() == {D.REJECTED, D.PROMOTED, D.ROLLED_BACK, D.CANCELLED}
    assert ROLLOUT_TRANSITIONS.final() == {RolloutStatus.ABORTED, RolloutStatus.COMPLETED}
    assert AGENT_TRANSITIONS.final() == frozenset()  # the agent always returns to IDLE
    for status in DEPLOYMENT_TRANSITIONS.final():
        for new in DeploymentStatus:
            assert not DEPLOYMENT_TRANSITIONS.allowed(status, new)


def test_agent_phases_go_forward_or_end() -> None:
    a = AgentPhase
    path = [a.IDLE, a.DOWNLOADING, a.MEASURING, a.AWAITING_VERDICT, a.IDLE]
    for old, new in zip(path, path[1:], strict=False):
        assert check_transition(old, new) is new
    for phase in (a.DOWNLOADING, a.MEASURING, a.AWAITING_VERDICT):
        assert AGENT_TRANSITIONS.allowed(phase, a.IDLE)
    with pytest.raises(TransitionError, match="awaiting_verdict -> downloading is not allowed"):
        check_transition(a.AWAITING_VERDICT, a.DOWNLOADING)
    with pytest.raises(TransitionError):
        check_transition(a.IDLE, a.MEASURING)  # measuring needs a download first


def test_error_names_machine_states_and_options() -> None:
    with pytest.raises(TransitionError) as info:
        DEPLOYMENT_TRANSITIONS.check("promoted", "pending")
    assert str(info.value) == ("deployment: promoted -> pending is not allowed; "
                               "from promoted only: nothing (final state)")
    assert (info.value.old, info.value.new, info.value.machine) == ("promoted", "pending", "deployment")
    with pytest.raises(TransitionError, match="from passed only: cancelled, promoted, rejected, rolled_back, timeout"):
        check_transition("passed", D.MEASURING)


def test_plain_strings_are_accepted_and_unknown_ones_refused() -> None:
    assert DEPLOYMENT_TRANSITIONS.check("pending", "transferring") is D.TRANSFERRING
    with pytest.raises(ValueError, match="'sleeping' is not a valid DeploymentStatus"):
        DEPLOYMENT_TRANSITIONS.check("pending", "sleeping")
    with pytest.raises(TypeError, match="no transition table for EventType"):
        check_transition("x", EventType.ERROR)


def test_rollout_table() -> None:
    r = RolloutStatus
    assert ROLLOUT_TRANSITIONS.allowed(r.RUNNING, r.RUNNING)  # next stage
    assert ROLLOUT_TRANSITIONS.targets(r.ROLLING_BACK) == {r.ABORTED}
    assert not ROLLOUT_TRANSITIONS.allowed(r.ROLLING_BACK, r.COMPLETED)


def test_a_table_naming_a_foreign_state_is_refused() -> None:
    with pytest.raises(ValueError):
        Transitions("bad", AgentPhase, {AgentPhase.IDLE: ["pending"]})
