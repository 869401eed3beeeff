"""The persistor on a memory bus: model.load answered with the initial model, a saved round on disk."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from sagmq.memory import MemoryBroker
from sagmq.persistor.main import PersistorService
from sagmq.wire.codec import DXO, WEIGHTS
from sagmq.wire.messages import AdminReply, AdminRequest, ModelLoad, ModelLoaded, ModelSave, ModelSaved
from sagmq.wire.settings import Settings
from sagmq.wire.topology import RK_ADMIN_PERSISTOR, RK_MODEL_LOAD, RK_MODEL_SAVE
from tests.unit.choreography.harness import Probe, running, service_bus

JOB = "b" * 32
INITIAL = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)


@pytest.fixture
def probe(broker: MemoryBroker, settings: Settings) -> Iterator[Probe]:
    """A probe, with the persistor running."""
    p = Probe(broker, settings)
    with running(broker, lambda b: PersistorService(settings, b), service_bus(broker, settings, "persistor")):
        yield p


def test_model_load_is_answered_with_the_initial_model(probe: Probe) -> None:
    probe.bus.publish(probe.names.events, RK_MODEL_LOAD, ModelLoad(JOB), headers={"job_id": JOB})
    loaded = probe.first(ModelLoaded)
    assert loaded.job_id == JOB and not loaded.error and loaded.next_round == -1
    assert loaded.dxo is not None and loaded.dxo.kind == WEIGHTS
    (w,) = loaded.dxo.data.values()
    assert w.dtype == np.float32 and np.array_equal(w, INITIAL)


def test_a_saved_round_is_written_to_the_workspace(probe: Probe, settings: Settings) -> None:
    model = DXO(WEIGHTS, {"numpy_key": INITIAL + 3})
    save = ModelSave(JOB, 2, model, history=[{"round": 2, "accepted": ["site-1"]}], final=True)
    probe.bus.publish(probe.names.events, RK_MODEL_SAVE, save, headers={"job_id": JOB, "round": 2})
    saved = probe.first(ModelSaved)
    assert saved.round == 2
    path = settings.workspace / "persistor" / "jobs" / JOB / "models" / "server.npy"
    assert path.is_file() and np.array_equal(np.load(path), INITIAL + 3)
    reply = probe.bus.rpc(probe.names.admin, RK_ADMIN_PERSISTOR, AdminRequest("download", {"job_id": JOB}), 5.0)
    files = reply.message(AdminReply, 2**27).files
    assert "models/server.npy" in files
