"""An interrupted transfer resumes: the agent restarts mid-download and asks only for what it lacks.

The server is held (inside its own chunk sender) after the first half of the chunks; the device
is then restarted through the target's hook (local process control, or e.g. `ssh pi sudo
systemctl restart edgeguide-agent`). On its way back the agent must request exactly the chunks it
never received, and the deployment must finish without re-sending the others.
"""

from __future__ import annotations

import math
import threading

import pytest

CHUNK = 8 * 1024


class ChunkGate:
    """A server chunk transform that holds the first send of chunk `hold_at` until released."""

    def __init__(self, hold_at: int, timeout: float = 300.0) -> None:
        self.hold_at = hold_at
        self.timeout = timeout
        self.reached = threading.Event()
        self.released = threading.Event()
        self.deployment_id: str | None = None

    def __call__(self, deployment_id: str, index: int, data: bytes) -> bytes:
        if index == self.hold_at and not self.reached.is_set():
            self.deployment_id = deployment_id
            self.reached.set()
            self.released.wait(self.timeout)
        return data


@pytest.mark.hil_restart
def test_interrupted_transfer_resumes_after_restart(hil, hil_record) -> None:
    hil.ensure_incumbent()
    record = hil.register("float")
    total = math.ceil(record.size / CHUNK)
    half = total // 2
    assert half >= 2, f"artifact of {record.size} bytes gives only {total} chunks of {CHUNK}"
    gate = ChunkGate(hold_at=half)
    hil.server.deployer.chunk_transform = gate
    try:
        dep = hil.start_deploy(record, chunk_size=CHUNK)
        assert gate.reached.wait(60), f"the server never got to chunk {half}\n{hil.diagnostics(dep.deployment_id)}"
        assert gate.deployment_id == dep.deployment_id
        # Chunks 0..half-1 are on the wire. A command published after them is handled after them
        # by the agent's single worker, so its answer proves they are on the device's disk.
        mark = hil.watch.mark()
        hil.server.deployer.send_command(hil.device_id, "report_state")
        hil.watch.wait_state("online", start=mark, timeout=60)

        restarted = hil.watch.mark()
        hil.restart_device()
        need = hil.watch.wait_for("event", lambda e: e.get("type") == "need_chunks"
                                  and e.get("deployment_id") == dep.deployment_id, start=restarted, timeout=60)
        hil_record.figure("chunks", f"{total} of {CHUNK} B; held at {half}; asked again after restart: "
                                    f"{need.body['missing']}")
        assert need.body["missing"] == list(range(half, total)), need.body
    finally:
        gate.released.set()
        hil.server.deployer.chunk_transform = None

    final = hil.wait(dep.deployment_id)
    hil_record.deployment(final)
    assert final.status == "promoted", f"{final.status}: {final.reason}\n{hil.diagnostics(dep.deployment_id)}"
    resent = {int(i): n for i, n in final.resends.items() if n > 0}
    assert all(i >= half for i in resent), f"chunks received before the restart were sent again: {resent}"
    assert hil.wait_active(record.version).active_version == record.version
    if hil.http is not None:
        assert hil.http.model()["version"] == record.version
    evidence = hil.target.tensorflow_evidence()  # includes the module list of the agent that was stopped
    assert not evidence, f"an agent process loaded TensorFlow: {evidence}"
