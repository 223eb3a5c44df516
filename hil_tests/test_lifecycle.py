"""The deployment lifecycle on a device: deploy -> measure -> gate -> promote, and a gate failure.

Everything is observed the way an operator would: the server's registry (deployment status, the
device's report and the signed verdict), the device's retained state, and its recommendation API.
"""

from __future__ import annotations

from server.policy import parse_policy

STEPS = ("status:transferring", "device:manifest_accepted", "device:download_complete", "status:measuring",
         "status:passed", "device:promoted", "status:promoted")
MIN_RUNS = {"quick": 200, "full": 1024}  # agent/measure QUICK and FULL presets
IMPOSSIBLE = parse_policy("name = 'hil-impossible-p90'\n[limits.p90_ms]\nmax = 0.000001\nrequired = true\n")


def test_deploy_measure_gate_promote(hil, hil_record) -> None:
    record = hil.register("float")
    final = hil.deploy(record, chunk_size=32 * 1024)  # several chunks even for a tiny model
    summary = hil_record.deployment(final)
    assert final.status == "promoted", f"{final.status}: {final.reason}\n{hil.diagnostics(final.deployment_id)}"
    assert final.verdict["verdict"] == "PASS", final.verdict["reason"]
    kinds = hil.event_kinds(final.deployment_id, until="status:promoted")
    assert [k for k in kinds if k in STEPS] == list(STEPS), kinds

    report = final.report
    assert report["load_ok"] is True and report.get("error_kind") is None
    if hil.target.kind == "local":
        assert report["mode"] == hil.settings.mode, report["mode"]
    elif report["mode"] != hil.settings.mode:
        hil_record.note(f"the device measured in {report['mode']} mode (its measure_mode setting), the run asked "
                        f"for {hil.settings.mode}")
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"], latency
    assert latency["n"] >= MIN_RUNS[report["mode"]], latency
    assert report["memory"]["peak_rss_mib"] > 0 and report["model_bytes"] > 0
    assert report["quality"]["agreement_at_k"] >= 0.9, report["quality"]
    assert report["energy"]["source"], report["energy"]  # measured, or says why it is unavailable
    if hil.expected_threads is not None:
        assert report["context"]["threads"] == hil.expected_threads, report["context"]
    hil_record.figure("threads", report["context"]["threads"])

    # The runtime the report names is the one the device announced, and the one its profile promises.
    device = hil.wait_active(record.version)
    assert report["runtime"] == device.runtime, (report["runtime"], device.runtime)
    expected = hil.expected_runtime
    if expected is not None:
        assert summary["runtime"] == expected, f"report says {summary['runtime']}, profile expects {expected}"

    if hil.http is not None:
        history = hil.artifacts.history_codes(1)[0]
        answer = hil.http.recommend(history, k=5)
        assert answer["model"] == {"model_id": record.model_id, "version": record.version}
        assert len(answer["items"]) == 5 and all(item["stock_code"] for item in answer["items"]), answer
    else:
        hil_record.note(f"{hil.http_note}: serving judged by golden agreement and the device's state")

    evidence = hil.target.tensorflow_evidence()
    if evidence is None:
        hil_record.note("TensorFlow-freedom is not observable on a remote device")
    else:
        assert evidence == [], f"the agent process loaded TensorFlow: {evidence}"


def test_gate_failure_rolls_back_and_old_model_keeps_serving(hil, hil_record) -> None:
    incumbent = hil.ensure_incumbent()
    mark = hil.watch.mark()
    final = hil.deploy(hil.register("float"), policy=IMPOSSIBLE)
    hil_record.deployment(final)
    assert final.status == "rolled_back", f"{final.status}: {final.reason}\n{hil.diagnostics(final.deployment_id)}"
    assert final.report["load_ok"] is True  # it measured fine; the policy refused it
    assert final.verdict["verdict"] == "FAIL"
    p90 = next(c for c in final.verdict["checks"] if c["name"] == "p90_ms")
    assert p90["outcome"] == "fail" and p90["figure"] == final.report["latency_ms"]["p90"] > p90["limit"], p90
    assert "p90_ms" in final.verdict["reason"]
    assert final.policy["name"] == "hil-impossible-p90"

    rolled = hil.watch.wait_for("event", lambda e: e.get("type") == "rolled_back"
                                and e.get("deployment_id") == final.deployment_id, start=mark)
    assert "verdict FAIL" in rolled.body["reason"]
    assert hil.wait_active(incumbent).active_version == incumbent
    if hil.http is not None:
        assert hil.http.model()["version"] == incumbent
        answer = hil.http.recommend(hil.artifacts.history_codes(2)[1], k=3)
        assert answer["model"]["version"] == incumbent and len(answer["items"]) == 3
    else:
        hil_record.note(f"{hil.http_note}: the old model is judged by the device's state")

