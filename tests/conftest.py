"""Session fixtures: a real mosquitto broker on a free port, unique topic prefixes per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from protocol.mqtt import MqttLink  # noqa: E402
from server.db import Database, open_database  # noqa: E402
from server.mosquitto import MosquittoBroker, free_port  # noqa: E402
from server.registry import Registry  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One real mosquitto per test session (anonymous, loopback only)."""
    broker = MosquittoBroker(workdir=tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real artifacts of ONE tiny model trained once per session: float, int8, dynamic, opversion (unloadable)."""
    from test_agent_support import build_artifacts

    return build_artifacts(str(tmp_path_factory.getbasetemp() / "agent-artifacts"))


@pytest.fixture(scope="session")
def tiny_artifact(tiny_artifacts: dict[str, Path]) -> Path:
    """A tiny float32 artifact folder (real TFLite model trained on a data slice)."""
    return tiny_artifacts["float"]


@pytest.fixture(scope="session")
def tiny_artifact_int8(tiny_artifacts: dict[str, Path]) -> Path:
    """The same tiny model, full-integer int8."""
    return tiny_artifacts["int8"]


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix unique to one test, so tests sharing the broker never see each other."""
    return f"eg-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def device_link(mosquitto, topic_prefix: str) -> Iterator[MqttLink]:
    """A raw MQTT client standing where a device would (no agent: these tests speak the protocol by hand)."""
    link = MqttLink(mosquitto.url, f"dev-{topic_prefix}", clean_start=True)
    link.start()
    yield link
    link.stop()


@pytest.fixture(scope="session")
def tiny_reference_weights() -> tuple[list, object]:
    """Weights of a tiny reference (dim 16) fine-tuned once per session on 150 customers, and that dataset."""
    import tf_keras as keras

    from compression.data import DERIVED_DIR, load_dataset
    from compression.model import build_reference
    from compression.techniques.common import fine_tune

    dataset = load_dataset(str(DERIVED_DIR), max_customers=150)  # the derived copy loads in ~0.3 s
    keras.utils.set_random_seed(11)  # unseeded, the QAT agreement test failed on about 1 init in 3
    model = build_reference(dataset.num_items, window=20, dim=16, hidden=32)
    fine_tune(model, dataset, epochs=1.0)
    return model.get_weights(), dataset


@pytest.fixture(scope="module")
def tiny(tiny_reference_weights: tuple[list, object]) -> tuple[object, object]:
    """A fresh copy of the tiny reference per test module: techniques may change the model they get."""
    from compression.model import build_reference

    weights, dataset = tiny_reference_weights
    model = build_reference(dataset.num_items, window=20, dim=16, hidden=32)
    model.set_weights(weights)
    return model, dataset


PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(*cmd: str) -> subprocess.CompletedProcess:
    """Run a PostgreSQL tool; as root it must run as the `postgres` user (initdb refuses root)."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster: initdb + pg_ctl start on a free port; yields its URL.

    CI installs the `postgresql` Debian package; without it the tests using this FAIL with the fix, never skip.
    """
    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing): apt-get install -y postgresql")
    # Not under pytest's basetemp: that is private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="edgeguide-pg-"))
    data = root / "data"
    data.mkdir(mode=0o700)
    if _is_root():
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
    done = _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    assert done.returncode == 0, f"initdb failed:\n{done.stdout}\n{done.stderr}"
    port = free_port()
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    done = _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(data / "server.log"),
                        "-w", "start")
    assert done.returncode == 0, f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}"
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _is_root() -> bool:
    return os.geteuid() == 0


def reset_postgres(db: Database) -> None:
    """Drop everything in the session database's public schema: the next registry starts from nothing."""
    db.execute("DROP SCHEMA public CASCADE")
    db.execute("CREATE SCHEMA public")


@pytest.fixture
def pg_registry(postgres_url: str, tmp_path: Path) -> Iterator[Registry]:
    """A registry on the session's PostgreSQL, fresh schema (every table and the schema version dropped)."""
    db = open_database(postgres_url)
    reset_postgres(db)
    registry = Registry(tmp_path / "data", db=db)
    yield registry
    registry.close()
