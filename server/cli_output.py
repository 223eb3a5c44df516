"""How `edgeguide-server` prints: tables for people, full text when piped, JSON for scripts.

A table on a terminal goes through rich (it may fold long cells to fit). Piped, the same rows are
printed as aligned plain columns with nothing cut, so `| grep`/`| awk` see full ids and reasons.
`--json` prints one JSON document instead; its field names are part of the command line's contract.
Text a device sent (errors, reasons, event details) is shown literally in both: no rich markup, and
control characters (ANSI escapes, bells, carriage returns) printed as `\\xNN` instead of reaching the terminal.
JSON output is exact (json escapes control characters itself).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.registry import ArtifactRecord, DeploymentRecord, DeviceRecord

_LOGGER = logging.getLogger(__name__)

_BINARY_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
# C0 (tab and newline included: one value stays on one line), DEL, C1, and the bidi and line-separator
# characters that can make a line read differently from what it holds.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def safe(text: object) -> str:
    """`text` with every control character shown as an escape (`\\x1b`), so printing it cannot drive the terminal."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", str(text))


def is_tty() -> bool:
    """True when stdout is a terminal (then tables may fold long cells)."""
    return sys.stdout.isatty()


def print_json(obj: Any) -> None:
    """One JSON document on stdout."""
    print(json.dumps(obj, indent=2, sort_keys=True, default=str), flush=True)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A rich table on a terminal; aligned, never-truncated columns otherwise.

    Cells are plain text, never rich markup (a device's `[/x]` would crash the listing), escaped by `safe`.
    """
    rows = [[safe(cell) for cell in row] for row in rows]
    if is_tty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(*headers)  # our own fixed names
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        Console().print(table)
        return
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    for row in [list(headers), *rows]:
        cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        print("  ".join(cells).rstrip())


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC time of an epoch timestamp (None stays None)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


def local_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def human_bytes(value: float) -> str:
    """1023960 -> '0.98 MiB', 16777216 -> '16 MiB', 181000 -> '177 KiB' (binary units, as the policy's limits).

    A unit is used from 1000 of the one below, so no figure prints as '1e+03'.
    """
    for unit, size in _BINARY_UNITS:
        if abs(value) >= size * 999.5 / 1024:  # what would print as 1000 of the unit below
            scaled = value / size
            return f"{scaled:.2f} {unit}" if abs(scaled) < 10 and scaled != int(scaled) else f"{scaled:.0f} {unit}"
    return f"{value:.0f} B"


def _number(value: float, unit: str) -> str:
    if unit == "B":
        return human_bytes(value)
    text = f"{value:.4g}"
    return f"{text} {unit}" if unit else text


def check_line(check: dict[str, Any]) -> str:
    """One gate check for people: `pass  model_bytes: 1000 KiB <= 16 MiB`, `energy unavailable`."""
    name, unit = check.get("name"), check.get("unit") or ""
    figure, limit = check.get("figure"), check.get("limit")
    bound = f"{check.get('op')} {_number(limit, unit)}" if isinstance(limit, int | float) else ""
    if not isinstance(figure, int | float) or (isinstance(figure, float) and not math.isfinite(figure)):
        shown = f"unavailable (limit {bound})" if bound else "unavailable"
        note = check.get("note") or check.get("detail")
        if note:
            shown += f": {note}"
    else:
        shown = f"{_number(figure, unit)} {bound}".rstrip()
    return f"{str(check.get('outcome')):20s} {name}: {shown}"


def report_dir(reports_dir: Path, deployment_id: str) -> Path | None:
    """The deployment's report folder, if the server wrote one."""
    folder = Path(reports_dir) / deployment_id
    return folder if folder.is_dir() else None


def device_dict(d: DeviceRecord) -> dict[str, Any]:
    return {"device_id": d.device_id, "status": d.status,
            "active": f"{d.active_model_id}@{d.active_version}" if d.active_model_id else None,
            "active_model_id": d.active_model_id, "active_version": d.active_version, "runtime": d.runtime_key,
            "agent_version": d.agent_version, "first_seen": iso(d.first_seen), "last_seen": iso(d.last_seen),
            "last_error": d.last_error or None}


def deployment_dict(d: DeploymentRecord, reports_dir: Path | None = None) -> dict[str, Any]:
    out = {"deployment_id": d.deployment_id, "device_id": d.device_id, "model": f"{d.model_id}@{d.version}",
           "model_id": d.model_id, "version": d.version, "status": d.status, "reason": d.reason,
           "terminal": d.terminal, "verdict": (d.verdict or {}).get("verdict"), "forced": d.forced,
           "created": iso(d.created), "updated": iso(d.updated)}
    if reports_dir is not None:
        folder = report_dir(reports_dir, d.deployment_id)
        out["report_dir"] = str(folder) if folder else None
        out["checks"] = (d.verdict or {}).get("checks", [])
    return out


def artifact_dict(a: ArtifactRecord) -> dict[str, Any]:
    m = a.metrics
    return {"id": a.id, "model_id": a.model_id, "version": a.version, "packed_bytes": a.size, "sha256": a.sha256,
            "tflite_bytes": m.get("tflite_bytes"), "hr10": m.get("hr10"), "techniques": m.get("techniques") or [],
            "created": iso(a.created)}


def rollout_dict(r: Any) -> dict[str, Any]:  # RolloutRecord (server.rollout imports this module's users)
    return {"rollout_id": r.rollout_id, "model": f"{r.model_id}@{r.version}", "model_id": r.model_id,
            "version": r.version, "status": r.status, "finished": r.finished, "stage": r.stage,
            "stage_name": r.plan.stages[r.stage].name, "stages": r.plan.to_dict()["stages"],
            "max_failure_pct": r.plan.max_failure_pct, "reason": r.reason,
            "devices": {d: {"stage": m["stage"], "deployment_id": None if m["deployment_id"] == "claiming"
                            else m["deployment_id"], "outcome": m["outcome"], "detail": m["detail"]}
                        for d, m in r.devices.items()}}
