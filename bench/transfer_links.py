"""Delivery over emulated device links (hil_tests/netlink): raw QoS 1 vs a real deployment, per profile.

For each profile, on the same link (the agent's namespace behind tbf and the delay-line relay):
- raw: the artifact's chunk frames published QoS 1 from this process to the loopback broker and
  received by a plain paho subscriber inside the device namespace (median of `repeats`);
- deploy: the bench's real server deploying the artifact to a real agent process in the device
  namespace, deploy() to the server receiving download_complete (median of `repeats`, one new
  version each). A profile with a cut drops the link once half the artifact has gone down.
`resent_chunks` counts chunk publications beyond the first of each chunk (the deployment's
re-send record); `resumed` says a cut happened, the agent reconnected and the deployment still
finished with the model promoted.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from hil_tests.netlink import netns
from hil_tests.netlink.agent import NamespacedAgent
from hil_tests.netlink.netns import EmulatedLink
from hil_tests.netlink.profiles import LinkProfile, profile
from server import window

_LOGGER = logging.getLogger("bench.transfer_links")
MIB = 1024 * 1024

_SUBSCRIBER = r"""
import json, sys, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
host, port, topic, ready, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[5], sys.argv[6]
n = int(sys.argv[4])
got = {"n": 0}
c = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-" + topic.rsplit("/", 1)[-1], protocol=paho.MQTTv311)
def on_connect(cl, *_a):
    cl.subscribe(topic, qos=1)
def on_subscribe(*_a):
    open(ready, "w").write("1")
def on_message(cl, _u, msg):
    got["n"] += 1
    if got["n"] == n:
        open(out, "w").write(json.dumps({"done": time.time()}))
        cl.disconnect()
c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.connect(host, port, keepalive=60)
c.loop_forever()
"""


def raw_over_link(link: EmulatedLink, broker_url: str, frames: list[bytes], work: Path, timeout: float) -> float:
    """Seconds from the first QoS 1 publish to the namespaced subscriber holding every frame."""
    from protocol.mqtt import MqttLink

    tag = uuid.uuid4().hex[:8]
    topic = f"eg-bench/rawlink/{tag}"
    ready, out = work / f"raw-{tag}.ready", work / f"raw-{tag}.json"
    sub = link.device_popen([sys.executable, "-c", _SUBSCRIBER, link.core_addr, str(netns.RELAY_PORT), topic,
                             str(len(frames)), str(ready), str(out)],
                            stdout=subprocess.DEVNULL, stderr=open(work / f"raw-{tag}.log", "wb"))  # noqa: SIM115
    pub = MqttLink(broker_url, f"raw-pub-{tag}", clean_start=True)
    pub.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if sub.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"raw subscriber in the device namespace did not subscribe (exit {sub.poll()})")
            time.sleep(0.05)
        start = time.time()
        for frame in frames:
            pub.publish(topic, frame, qos=1)
        sub.wait(timeout)
        return json.loads(out.read_text())["done"] - start
    finally:
        pub.stop()
        if sub.poll() is None:
            sub.kill()
            sub.wait(5)


def deploy_over_link(bench: Any, link: EmulatedLink, artifact_dir: Path, work: Path, repeats: int) -> list[dict]:
    """`repeats` consecutive versions deployed to one namespaced agent; one dict per run."""
    agent = NamespacedAgent(link, f"link-{link.profile.name}-{uuid.uuid4().hex[:4]}", work / "agent",
                            bench.pub_key, topic_prefix="eg-bench", log_path=work / "agent.log")
    agent.start(timeout=120)
    runs = []
    try:
        bench.wait_seen([agent.device_id])
        for _ in range(repeats):
            record = bench.registry.register(artifact_dir)
            start = time.time()
            dep = bench.server.deploy(record.model_id, agent.device_id, version=record.version)
            final = bench.server.wait(dep.deployment_id, timeout=900)
            complete = bench.event_ts(dep.deployment_id, "device:download_complete")
            if complete is None:
                raise RuntimeError(f"{dep.deployment_id} over {link.profile.name} ended {final.status} without a "
                                   f"download: {final.reason}\n{agent.log_tail()}")
            events = [e["kind"] + ":" + (e["detail"] or "") for e in bench.registry.events(
                deployment_id=dep.deployment_id)]
            runs.append({"version": record.version, "status": final.status, "bytes": record.size,
                         "seconds": complete - start, "end_to_end_s": time.time() - start,
                         "resent_chunks": sum(n for n in final.resends.values() if n > 0),
                         "chunks_sent_once": len(final.resends),
                         "reconnected": "device:need_chunks:reconnected" in events})
            bench.server.deployer.wait_reports()
    finally:
        agent.stop()
    return runs


def run_profile(bench: Any, name: str, artifact_dir: Path, frames: list[bytes], root: Path, repeats: int,
                cut_s: float | None) -> dict[str, Any]:
    """raw and deploy over one profile's link; the figures the JSON's links.<name> holds."""
    base: LinkProfile = profile(name)
    port = int(bench.broker.url.rsplit(":", 1)[1])
    total = sum(len(f) for f in frames)
    work = root / f"link-{name}"
    work.mkdir(parents=True, exist_ok=True)
    raw_runs = []
    with EmulatedLink(base.without_cut(), port, workdir=work / "raw") as link:
        for _ in range(repeats):
            raw_runs.append(raw_over_link(link, bench.broker.url, frames, work, timeout=600))
    raw_s = statistics.median(raw_runs)
    link_profile = base
    if base.has_cut:  # in the middle of the transfer being measured
        link_profile = base.with_cut(total // 2, cut_s if cut_s is not None else base.cut_s)
    deploy_repeats = 1 if base.has_cut else repeats
    with EmulatedLink(link_profile, port, workdir=work / "deploy") as link:
        runs = deploy_over_link(bench, link, artifact_dir, work, deploy_repeats)
    stats = link.stats
    size = runs[0]["bytes"]
    deploy_s = statistics.median(r["seconds"] for r in runs)
    raw_mib_s, deploy_mib_s = total / MIB / raw_s, size / MIB / deploy_s
    cut = bool(stats.get("cuts"))
    in_window = window.window_chunks(bench.server.deployer.config.window_bytes, bench.chunk_bytes)
    result = {
        "raw_mib_s": round(raw_mib_s, 3), "deploy_mib_s": round(deploy_mib_s, 3),
        "ratio": round(deploy_mib_s / raw_mib_s, 3), "seconds": round(deploy_s, 2),
        "raw_seconds": round(raw_s, 2),
        "resent_chunks": max(r["resent_chunks"] for r in runs),
        "resumed": bool(cut and all(r["status"] == "promoted" and r["reconnected"] for r in runs)),
        "all_promoted": all(r["status"] == "promoted" for r in runs),
        "window_chunks": in_window,
        "profile": link_profile.to_dict(), "runs": runs, "raw_runs_s": [round(x, 3) for x in raw_runs],
        "relay": stats,
    }
    _LOGGER.info("link %s: raw %.3f MiB/s, deploy %.3f MiB/s, ratio %.3f, resent %d, resumed %s", name,
                 raw_mib_s, deploy_mib_s, result["ratio"], result["resent_chunks"], result["resumed"])
    return result


def run_links(bench: Any, names: list[str], artifact_dir: Path, frames: list[bytes], root: Path, repeats: int,
              cut_s: float | None = None) -> dict[str, Any]:
    """links.<profile> for every name; {"skipped": why} when this machine cannot build links."""
    why = netns.available()
    if why:
        return {"skipped": why}
    out: dict[str, Any] = {}
    for name in names:
        out[name] = run_profile(bench, name, artifact_dir, frames, root, repeats, cut_s)
    return out
