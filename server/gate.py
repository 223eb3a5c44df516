"""The acceptance gate: turn a device's Report into PASS/FAIL with one line per check.

Every limit of the policy yields a check carrying the figure, the limit and its outcome
(pass / fail / unavailable-skipped / unavailable-failed), so a verdict explains itself. A model
that did not load is a FAIL naming the error kind (an op-version mismatch is the usual one).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from protocol.messages import Report
from server.policy import Limit, Policy

_LOGGER = logging.getLogger(__name__)

PASS, FAIL = "pass", "fail"
SKIPPED, UNAVAILABLE_FAILED = "unavailable-skipped", "unavailable-failed"


@dataclass(frozen=True)
class GateResult:
    """The gate's decision: `verdict` is "PASS" or "FAIL"; `checks` go into the signed Verdict."""

    verdict: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"


def _lookup(report: dict[str, Any], path: str) -> Any:
    value: Any = report
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def finite_number(value: Any) -> float | None:
    """A report figure as a float, or None when it is not a finite number (reports are untrusted)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _figure(report: dict[str, Any], limit: Limit) -> tuple[float | None, str]:
    """The figure a limit is compared with, and a note when it is unavailable."""
    spec = limit.spec
    if limit.name == "energy_mj_per_inference":
        found = report.get("energy")
        energy: dict[str, Any] = found if isinstance(found, dict) else {}
        if energy.get("available") is False:
            return None, f"energy not measured: {energy.get('reason') or energy.get('source') or 'no source'}"
    raw = _lookup(report, spec.figure)
    if raw is None:
        if limit.name == "p90_regression_pct":
            return None, "no paired comparison with an incumbent"
        return None, f"report has no {spec.figure}"
    value = finite_number(raw)
    if value is None:
        return None, f"{spec.figure} is not a finite number: {raw!r:.40}"
    if limit.name == "p90_regression_pct":
        if value <= 0:
            return None, f"paired median ratio {value!r} is not positive"
        value = (value - 1.0) * 100.0
        if not math.isfinite(value):  # a finite ratio near the float maximum overflows as a percentage
            return None, f"paired median ratio {raw!r:.40} is out of range"
    return value, ""


def _check(report: dict[str, Any], limit: Limit) -> dict[str, Any]:
    figure, note = _figure(report, limit)
    op = "<=" if limit.op == "max" else ">="
    check: dict[str, Any] = {"name": limit.name, "source": limit.spec.figure, "figure": figure,
                             "op": op, "limit": limit.value, "unit": limit.spec.unit, "required": limit.required}
    if figure is None:
        check["outcome"] = UNAVAILABLE_FAILED if limit.required else SKIPPED
        check["note"] = note
    else:
        ok = figure <= limit.value if limit.op == "max" else figure >= limit.value
        check["outcome"] = PASS if ok else FAIL
    return check


def format_figure(value: Any, unit: str = "") -> str:
    """A figure for people: 4 significant digits, thousands separators for big numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a" if value is None else str(value)
    text = f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    return f"{text} {unit}" if unit else text


def _describe(check: dict[str, Any]) -> str:
    if check["outcome"] == UNAVAILABLE_FAILED:
        return f"{check['name']} unavailable but required ({check.get('note', '')})"
    bad_op = ">" if check["op"] == "<=" else "<"
    return (f"{check['name']} {format_figure(check['figure'], check['unit'])} {bad_op} "
            f"{format_figure(check['limit'], check['unit'])}")


def evaluate(report: Report | dict[str, Any], policy: Policy) -> GateResult:
    """Gate one report against `policy`."""
    body = report.to_dict() if isinstance(report, Report) else dict(report)
    if not body.get("load_ok", False):
        kind = body.get("error_kind") or "load_error"
        error = str(body.get("error") or "no error text")
        check = {"name": "load", "source": "load_ok", "figure": kind, "op": "==", "limit": "loaded",
                 "unit": "", "required": True, "outcome": FAIL, "note": error[:500]}
        reason = f"model did not load on the device ({kind}): {error[:300]}"
        _LOGGER.info("gate FAIL for %s: %s", body.get("deployment_id"), reason)
        return GateResult("FAIL", [check], reason)
    checks = [_check(body, limit) for limit in policy.limits]
    failed = [c for c in checks if c["outcome"] in {FAIL, UNAVAILABLE_FAILED}]
    if failed:
        reason = "; ".join(_describe(c) for c in failed)
        result = GateResult("FAIL", checks, reason)
    else:
        skipped = [c["name"] for c in checks if c["outcome"] == SKIPPED]
        note = f" ({len(skipped)} unavailable and optional: {', '.join(skipped)})" if skipped else ""
        result = GateResult("PASS", checks, f"all {len(checks) - len(skipped)} checks passed{note}")
    _LOGGER.info("gate %s for %s under %s: %s", result.verdict, body.get("deployment_id"), policy.name,
                 result.reason)
    return result
