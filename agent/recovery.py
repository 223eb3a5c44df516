"""Startup recovery from the state directory: which model to serve, which download to continue.

Functions, not a class: they run once at start (on the caller's thread before the worker starts,
or as the worker's first job) and own no state between calls; the controller owns the results.
"""

from __future__ import annotations

import logging
from typing import Protocol

from agent.config import AgentConfig
from agent.model import LoadedModel, open_model
from agent.runtime import ModelLoadError
from agent.store import ModelStore, SlotRef, StoreError
from agent.transfer import Receiver
from protocol.errors import ProtocolError
from protocol.states import EventType

_LOGGER = logging.getLogger(__name__)


class EventSink(Protocol):
    def event(self, type_: str, *, deployment_id: str | None = None, reason: str | None = None,
              missing: list[int] | None = None, version: int | None = None, durable: bool = False) -> None: ...


def open_slot(store: ModelStore, ref: SlotRef, config: AgentConfig) -> LoadedModel:
    """Load the model a pointer names, refusing a slot that holds something else."""
    held = store.slot_contents(ref.slot)
    if held is None or (held.model_id, held.version) != (ref.model_id, ref.version):
        raise StoreError(f"slot {ref.slot} holds {held}, pointer says {ref.model_id} v{ref.version}")
    return open_model(store.model_dir(ref), model_id=ref.model_id, version=ref.version,
                      threads=config.threads, runtime=config.runtime)


def open_active(store: ModelStore, config: AgentConfig) -> tuple[LoadedModel | None, str | None]:
    """The model to serve and the error to report: the active slot, else the previous model, loudly."""
    pointer = store.active()
    if pointer is None:
        _LOGGER.info("no_active_model device=%s: serving nothing until a model is promoted", config.device_id)
        return None, None
    try:
        return open_slot(store, pointer.current, config), None
    except (ModelLoadError, StoreError) as exc:
        error = f"active model unusable: {exc}"
        _LOGGER.error("ACTIVE_MODEL_CORRUPT slot=%s model_id=%s version=%s error=%s", pointer.current.slot,
                      pointer.current.model_id, pointer.current.version, exc)
    if pointer.previous is None:
        _LOGGER.error("no_previous_model: serving nothing until a new model is promoted")
        return None, error
    try:
        model = open_slot(store, pointer.previous, config)
        store.rollback()
        _LOGGER.error("FELL_BACK_TO_PREVIOUS model_id=%s version=%s", model.model_id, model.version)
        return model, error
    except (ModelLoadError, StoreError) as exc:
        _LOGGER.error("previous_model_unusable error=%s: serving nothing", exc)
        return None, error


def resume_staging(store: ModelStore, events: EventSink) -> Receiver | None:
    """After a restart: the newest unfinished download to continue (older leftovers are dropped).

    A promotion killed before its bookkeeping is completed here and reported (durably): the
    server would otherwise wait for it forever.
    """
    finished = set(store.finished())
    staged = store.staged_deployments()
    for dep_id in staged:
        if dep_id in finished:
            store.remove_staging(dep_id)
    pointer = store.active()
    if pointer is not None and pointer.current.deployment_id is not None and \
            pointer.current.deployment_id not in finished:
        dep_id = pointer.current.deployment_id
        store.remove_staging(dep_id)
        store.mark_finished(dep_id)
        finished.add(dep_id)
        events.event(EventType.PROMOTED, deployment_id=dep_id, version=pointer.current.version,
                     reason="promotion completed before a restart", durable=True)
    pending = [d for d in staged if d not in finished]
    for dep_id in pending[:-1]:
        _LOGGER.warning("staging_dropped deployment=%s reason=superseded", dep_id)
        store.remove_staging(dep_id)
    if not pending:
        return None
    try:
        return Receiver.resume(store, pending[-1])
    except (OSError, ValueError, ProtocolError, StoreError) as exc:
        _LOGGER.error("staging_unusable deployment=%s error=%s: dropped", pending[-1], exc)
        store.remove_staging(pending[-1])
        return None
