"""A model the device's runtime cannot load: refused by the server before sending, and by the agent.

On tflite-runtime 2.14 devices (the legacy profile, an arm64 board) this is the real case from the
field: TF 2.21's dynamic-range export uses FULLY_CONNECTED version 12, which tflite-runtime 2.14
lacks. LiteRT loads that model, so on LiteRT devices the model is one whose FULLY_CONNECTED claims
version 99. Either way the
export-time check in metrics.json and the device's own load attempt must name the same op.
"""

from __future__ import annotations

import re

import pytest

from compression.runtimes import LEGACY_NAME
from server.deployer import IncompatibleRuntimeError

# compression/runtimes.py keeps the runtime's own text; agent/runtime.py rephrases it (and may quote it).
SERVER_OP = re.compile(r"builtin opcode '(?P<op>[A-Z_0-9]+)' version '(?P<version>\d+)'")
AGENT_OP = re.compile(r"builtin op (?P<op>[A-Z_0-9]+) version (?P<version>\d+)")


def test_unloadable_model_is_refused_by_server_and_by_agent(hil, hil_record) -> None:
    incumbent = hil.ensure_incumbent()
    key = hil.runtime_key()
    bad = hil.artifacts.unloadable_for(key)
    hil_record.figure("unloadable_model", f"{bad.name} ({'inferred' if bad.inferred else 'checked'} on {key})")
    server_op = SERVER_OP.search(bad.error)
    assert server_op, f"export-time check of {bad.name} on {key} gives no op-version error: {bad.error!r}"
    if key == LEGACY_NAME:  # the legacy profile, or a real board on tflite-runtime 2.14 (checked here too)
        assert bad.name == "dynamic" and (server_op["op"], server_op["version"]) == ("FULLY_CONNECTED", "12"), bad
    record = hil.register(bad.folder)
    mark = hil.watch.mark()

    # 1. The server's compatibility check refuses before anything is sent, and records why.
    with pytest.raises(IncompatibleRuntimeError, match=rf"does not load on {re.escape(key)}"):
        hil.start_deploy(record)
    refused = hil.registry.deployments(device_id=hil.device_id, limit=1)[0]
    hil_record.deployment(refused)
    assert (refused.version, refused.status) == (record.version, "rejected"), refused
    assert refused.reason.startswith("op_version:") and server_op["op"] in refused.reason, refused.reason

    # 2. Forced past the check, the device tries, cannot load it, and says why: an op-version error.
    forced = hil.deploy(record, force=True)
    hil_record.deployment(forced)
    report = forced.report
    assert forced.status == "rolled_back", f"{forced.status}: {forced.reason}\n{hil.diagnostics(forced.deployment_id)}"
    assert report["load_ok"] is False and report["error_kind"] == "op_version", report
    agent_op = AGENT_OP.search(report["error"]) or SERVER_OP.search(report["error"])
    assert agent_op and agent_op.groupdict() == server_op.groupdict(), (report["error"], bad.error)
    assert report["runtime"] == hil.device().runtime  # refused by the runtime the device announced
    assert forced.verdict["verdict"] == "FAIL" and forced.verdict["checks"][0]["name"] == "load"
    assert "op_version" in forced.verdict["reason"]

    # Nothing of the refused deployment ever reached the device; the incumbent never stopped serving.
    assert not [m for m in hil.watch.messages(start=mark) if m.body.get("deployment_id") == refused.deployment_id]
    assert hil.wait_active(incumbent).active_version == incumbent
    if hil.http is not None:
        assert hil.http.recommend(hil.artifacts.history_codes(1)[0], k=3)["model"]["version"] == incumbent
