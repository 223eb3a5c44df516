"""Acceptance policy: which device-measured figures a candidate model must meet, read from TOML.

Two spellings are accepted, flat (`[limits] max_p90_ms = 50`) and one table per check
(`[limits.p90_ms] max = 50, required = true`). `required` (alias `required_when_unavailable`) says
whether a figure the device could not measure fails the gate or is skipped: energy is often
unmeasurable on a device without a power sensor, latency never is.
"""

from __future__ import annotations

import logging
import math
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_LOGGER = logging.getLogger(__name__)

DEFAULT_POLICY_FILE = Path(__file__).with_name("policies") / "default.toml"


class PolicyError(ValueError):
    """A policy file names an unknown check, a wrong bound direction, a non-numeric or out-of-range limit."""


@dataclass(frozen=True)
class CheckSpec:
    """A figure the gate knows how to read from a report."""

    figure: str
    op: str  # "max": figure <= limit passes; "min": figure >= limit passes
    unit: str
    required: bool
    section: str = "limits"


# Every check the gate can evaluate; `figure` is the dotted Report key (docs/design.md).
CATALOG: dict[str, CheckSpec] = {
    "p50_ms": CheckSpec("latency_ms.p50", "max", "ms", True),
    "p90_ms": CheckSpec("latency_ms.p90", "max", "ms", True),
    "p99_ms": CheckSpec("latency_ms.p99", "max", "ms", True),
    "cold_start_ms": CheckSpec("latency_ms.cold_start_ms", "max", "ms", False),
    "peak_rss_mib": CheckSpec("memory.peak_rss_mib", "max", "MiB", True),
    "load_delta_mib": CheckSpec("memory.load_delta_mib", "max", "MiB", False),
    "agreement_at_k": CheckSpec("quality.agreement_at_k", "min", "", True),
    "ndcg_vs_reference": CheckSpec("quality.ndcg_vs_reference", "min", "", False),
    "model_bytes": CheckSpec("model_bytes", "max", "B", True),
    "energy_mj_per_inference": CheckSpec("energy.net_mj_per_inference", "max", "mJ", False),
    # Relative to the incumbent measured interleaved on the same device (report.paired):
    # (median of per-pair latency ratios - 1) * 100.
    "p90_regression_pct": CheckSpec("paired.median_ratio_p50", "max", "%", False, section="relative"),
}


@dataclass(frozen=True)
class Limit:
    """One bound of a policy."""

    name: str
    op: str
    value: float
    required: bool

    @property
    def spec(self) -> CheckSpec:
        return CATALOG[self.name]


@dataclass(frozen=True)
class Policy:
    """A named set of limits; `to_dict`/`from_dict` round-trip it (a deployment stores its policy)."""

    name: str
    limits: tuple[Limit, ...]

    def limit(self, name: str) -> Limit | None:
        return next((lim for lim in self.limits if lim.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "limits": [asdict(lim) for lim in self.limits]}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Policy:
        try:
            limits = tuple(_make_limit(d["name"], d["op"], d["value"], d["required"]) for d in obj["limits"])
            return cls(str(obj["name"]), limits)
        except (KeyError, TypeError) as exc:
            raise PolicyError(f"stored policy is malformed ({exc!r}): {obj!r:.300}") from exc


def _make_limit(name: str, op: str, value: Any, required: Any) -> Limit:
    spec = CATALOG.get(name)
    if spec is None:
        raise PolicyError(f"unknown check {name!r}; known checks: {sorted(CATALOG)}")
    if op != spec.op:
        raise PolicyError(f"check {name!r} takes a {spec.op!r} bound, got {op!r}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PolicyError(f"check {name!r}: limit must be a finite number, got {value!r}")
    if not isinstance(required, bool):
        raise PolicyError(f"check {name!r}: required must be true or false, got {required!r}")
    _check_range(name, spec, float(value))
    return Limit(name, op, float(value), required)


def _check_range(name: str, spec: CheckSpec, value: float) -> None:
    """Refuse limits no figure can sensibly meet: a share above 1 (90 meant as 90 %), a negative size or time."""
    if spec.unit == "":  # agreement and NDCG ratios are shares in 0..1
        if not 0.0 <= value <= 1.0:
            hint = f"; for {value:g} % write {value / 100:.2f}" if 1.0 < value <= 100.0 else ""
            raise PolicyError(f"check {name!r}: {spec.op} must be a share within 0..1, got {value:g}{hint}")
    elif spec.unit == "%":
        if value <= -100.0:
            raise PolicyError(f"check {name!r}: a change in percent must be above -100, got {value:g}")
    elif value < 0:
        raise PolicyError(f"check {name!r}: a {spec.unit} limit cannot be negative, got {value:g}")


def _parse_section(section: str, body: Any) -> list[Limit]:
    if not isinstance(body, dict):
        raise PolicyError(f"[{section}] must be a table, got {body!r:.80}")
    limits = []
    for key, value in body.items():
        if isinstance(value, dict):  # [limits.p90_ms] max = 50, required = true
            name = key
            bounds = [b for b in ("max", "min") if b in value]
            unknown = set(value) - {"max", "min", "required", "required_when_unavailable"}
            if unknown or len(bounds) != 1:
                raise PolicyError(f"[{section}.{key}] needs exactly one of max/min and optionally required, "
                                  f"got keys {sorted(value)}")
            op = bounds[0]
            required = value.get("required", value.get("required_when_unavailable"))
            raw = value[op]
        else:  # [limits] max_p90_ms = 50
            op, _, name = key.partition("_")
            if op not in {"max", "min"} or not name:
                raise PolicyError(f"[{section}] key {key!r} must look like max_<check> or min_<check>")
            required, raw = None, value
        spec = CATALOG.get(name)
        if spec is None:
            raise PolicyError(f"[{section}] unknown check {name!r}; known checks: {sorted(CATALOG)}")
        if spec.section != section:
            raise PolicyError(f"check {name!r} belongs in [{spec.section}], not [{section}]")
        limits.append(_make_limit(name, op, raw, spec.required if required is None else required))
    return limits


def parse_policy(text: str, name: str = "policy") -> Policy:
    """Parse policy TOML text; every error names the offending key and value."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{name}: invalid TOML: {exc}") from exc
    unknown = set(doc) - {"name", "limits", "relative"}
    if unknown:
        raise PolicyError(f"{name}: unknown top-level keys {sorted(unknown)}; expected name, [limits], [relative]")
    limits = [*_parse_section("limits", doc.get("limits", {})), *_parse_section("relative", doc.get("relative", {}))]
    seen: set[str] = set()
    for lim in limits:
        if lim.name in seen:
            raise PolicyError(f"{name}: check {lim.name!r} is given twice")
        seen.add(lim.name)
    if not limits:
        raise PolicyError(f"{name}: the policy sets no limits; a gate that checks nothing would pass anything")
    return Policy(str(doc.get("name", name)), tuple(limits))


def load_policy(path: Path | None = None) -> Policy:
    """Load a policy file; None means the shipped default (server/policies/default.toml)."""
    path = Path(path) if path is not None else DEFAULT_POLICY_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc}") from exc
    policy = parse_policy(text, name=path.stem)
    _LOGGER.debug("loaded policy %s from %s: %d limits", policy.name, path, len(policy.limits))
    return policy
