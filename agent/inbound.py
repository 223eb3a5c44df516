"""Checks of the signed down messages that end or steer a deployment: verdicts and commands.

Pure functions over the decoded message and what the controller knows; the controller acts on
the outcome. Every refusal carries the text the device sends back in its rejection event.
"""

from __future__ import annotations

from typing import Any

from agent.deployment import Deployment
from protocol.errors import ProtocolError, SignatureError
from protocol.limits import DEFAULT_LIMITS
from protocol.messages import Command, Verdict
from protocol.names import peek_deployment_id
from protocol.schema import decode_object
from protocol.states import AgentPhase

LATE = "late"  # verdict_problem's answer for a verdict of a deployment already finished: ignore quietly


class Refused(Exception):
    """A down message the device will not act on; `deployment_id` when it could be read."""

    def __init__(self, reason: str, deployment_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.deployment_id = deployment_id


def decode_verdict(payload: bytes, server_key: Any) -> Verdict:
    """The verdict, decoded once and signature-checked; Refused names why (and its deployment if known)."""
    obj = None  # decoded once: a payload refused for size or JSON is never parsed again
    try:
        obj = decode_object(payload, "verdict", DEFAULT_LIMITS.max_json_bytes)
        verdict = Verdict.from_dict(obj)
        verdict.verify(server_key)
    except SignatureError as exc:
        raise Refused(f"bad signature: {exc}", peek_deployment_id(obj)) from exc
    except ProtocolError as exc:
        raise Refused(f"malformed: {exc}", peek_deployment_id(obj)) from exc
    return verdict


def verdict_problem(verdict: Verdict, device_id: str, dep: Deployment | None, finished: list[str]) -> str | None:
    """Why this (validly signed) verdict cannot end `dep`; LATE for an already finished one; None: act on it."""
    if verdict.device_id != device_id:
        return f"verdict is for device {verdict.device_id!r}"
    if dep is None or dep.deployment_id != verdict.deployment_id:
        if verdict.deployment_id in finished:
            return LATE
        return (f"no deployment {verdict.deployment_id} in progress "
                f"(current: {dep.deployment_id if dep else None})")
    if (verdict.model_id, verdict.version) != (dep.manifest.model_id, dep.manifest.version):
        return (f"verdict names {verdict.model_id} v{verdict.version}, deployment has "
                f"{dep.manifest.model_id} v{dep.manifest.version}")
    if dep.phase is not AgentPhase.AWAITING_VERDICT:
        return f"deployment {dep.deployment_id} is {dep.phase}, not awaiting a verdict"
    return None


def decode_command(payload: bytes, server_key: Any, device_id: str) -> Command:
    """The command, signature-checked and addressed to this device; else Refused."""
    try:
        command = Command.from_json(payload)
        command.verify(server_key)
        if command.device_id != device_id:
            raise ProtocolError(f"command is for device {command.device_id!r}")
    except ProtocolError as exc:
        raise Refused(str(exc)) from exc
    return command
