"""The artifacts table and the files behind it: register a folder, look versions up, withdraw one.

An artifact's folder and packed blob are written before its row, so a row always names files
that were complete when it was inserted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from protocol import chunking, names
from protocol.artifact import ARTIFACT_FILES, MODEL_FILE, pack_artifact, read_golden, read_items, read_metrics
from protocol.errors import ProtocolError
from protocol.files import atomic_write, fsync_dir
from protocol.limits import DEFAULT_LIMITS
from server.registry.events import EventLog
from server.registry.records import ArtifactRecord, RegistryError, chunk_digests_path
from server.registry.records import to_json as _json

_LOGGER = logging.getLogger(__name__)

_VISIBLE = "id NOT IN (SELECT id FROM withdrawn_artifacts)"


class ArtifactTables(EventLog):
    """`artifacts` and `withdrawn_artifacts`, and the copied folders under `artifacts_dir`."""

    artifacts_dir: Path

    def register(self, folder: Path, model_id: str | None = None) -> ArtifactRecord:
        """Validate an exported artifact folder, copy it into the data dir and give it the next version."""
        folder = Path(folder)
        if not folder.is_dir():
            raise RegistryError(f"artifact folder {folder} does not exist")
        try:
            metrics = read_metrics(folder)
            read_items(folder)
            read_golden(folder)
        except ProtocolError as exc:
            raise RegistryError(f"artifact {folder} is invalid: {exc}") from exc
        model_file = folder / MODEL_FILE
        if not model_file.is_file() or model_file.stat().st_size == 0:
            raise RegistryError(f"artifact {folder} has no (or an empty) {MODEL_FILE}")
        try:
            model_id = names.model_id(model_id or metrics.get("model_id"))
        except ProtocolError as exc:
            raise RegistryError(f"artifact {folder}: {exc} (set model_id in metrics.json or pass one)") from exc
        packed = pack_artifact(folder)
        digest = hashlib.sha256(packed).hexdigest()
        # What a manifest needs, hashed once here instead of again when the first deployment starts.
        chunk_size = DEFAULT_LIMITS.default_chunk_bytes
        chunk_digests = {"chunk_size": chunk_size, "sha256": chunking.digests(packed, chunk_size)}
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        with self.db.transaction():
            row = self.db.query("SELECT COALESCE(MAX(version), 0) AS v FROM artifacts")
            version = int(row[0]["v"]) + 1
            dest = self.artifacts_dir / model_id / f"v{version}"
            packed_path = self.artifacts_dir / model_id / f"v{version}.tar.gz"
            self._copy_artifact(folder, dest, packed_path, packed)
            atomic_write(chunk_digests_path(packed_path), json.dumps(chunk_digests).encode())
            record = ArtifactRecord(f"{model_id}@{version}", model_id, version, dest, packed_path, digest,
                                    len(packed), metrics, time.time())
            self.db.execute(
                "INSERT INTO artifacts (id, model_id, version, path, packed_path, sha256, size, metrics, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.id, model_id, version, str(dest), str(packed_path), digest, len(packed), _json(metrics),
                 record.created))
        self.log_event("registered", detail=f"{record.id} sha256={digest} size={len(packed)}")
        _LOGGER.info("registered %s (%d bytes packed) from %s", record.id, len(packed), folder)
        return record

    @staticmethod
    def _copy_artifact(src: Path, dest: Path, packed_path: Path, packed: bytes) -> None:
        """Copy exactly the artifact files, then the packed blob; a leftover from a crash is replaced."""
        if dest.exists():
            shutil.rmtree(dest)
        tmp = dest.with_name(dest.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name in ARTIFACT_FILES:
            shutil.copy2(src / name, tmp / name)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        atomic_write(packed_path, packed)

    @staticmethod
    def chunk_digests(artifact: ArtifactRecord, chunk_size: int) -> list[str] | None:
        """Per-chunk SHA-256 recorded at registration for `chunk_size`; None for another size or no record."""
        try:
            recorded = json.loads(chunk_digests_path(artifact.packed_path).read_text())
        except (OSError, ValueError) as exc:
            _LOGGER.debug("no chunk digests for %s: %s", artifact.id, exc)
            return None
        if not isinstance(recorded, dict) or recorded.get("chunk_size") != chunk_size:
            return None
        digests = recorded.get("sha256")
        if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
            return None
        return digests

    def artifact(self, model_id: str, version: int | None = None) -> ArtifactRecord:
        """The artifact `model_id` at `version`, or its latest version."""
        if version is None:
            rows = self.db.query(f"SELECT * FROM artifacts WHERE model_id = ? AND {_VISIBLE}"
                                 " ORDER BY version DESC LIMIT 1", (model_id,))
        else:
            rows = self.db.query(f"SELECT * FROM artifacts WHERE model_id = ? AND version = ? AND {_VISIBLE}",
                                 (model_id, version))
        if not rows:
            known = sorted({a.id for a in self.artifacts()})
            what = model_id if version is None else f"{model_id}@{version}"
            raise RegistryError(f"no registered artifact {what!r}; registered: {known or 'none'}")
        return ArtifactRecord.from_row(rows[0])

    def artifact_by_id(self, artifact_id: str) -> ArtifactRecord:
        rows = self.db.query("SELECT * FROM artifacts WHERE id = ?", (artifact_id,))
        if not rows:
            raise RegistryError(f"no registered artifact with id {artifact_id!r}")
        return ArtifactRecord.from_row(rows[0])

    def artifacts(self) -> list[ArtifactRecord]:
        return [ArtifactRecord.from_row(r)
                for r in self.db.query(f"SELECT * FROM artifacts WHERE {_VISIBLE} ORDER BY version")]

    def withdraw_artifact(self, artifact: ArtifactRecord) -> None:
        """Hide `artifact` from lookups (its row stays for past deployments) and delete its files."""
        self.db.execute("INSERT INTO withdrawn_artifacts (id, ts) VALUES (?, ?)", (artifact.id, time.time()))
        shutil.rmtree(artifact.path, ignore_errors=True)
        for path in (artifact.packed_path, chunk_digests_path(artifact.packed_path)):
            path.unlink(missing_ok=True)
