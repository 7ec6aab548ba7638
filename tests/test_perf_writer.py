"""The training callback's background metric writer, cancel flag and Redis news (no wall-clock asserts)."""

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, select
from transformers import TrainerControl, TrainerState, TrainingArguments

from app.core.db import get_engine
from app.core.models import Job, MetricPoint
from tests.factories import create_dataset, create_job, sst2_bytes


def _job(session: Session) -> Job:
    dataset = create_dataset(session, sst2_bytes(20))
    return create_job(session, dataset_id=dataset.id, method="lora")


def _point(step: int) -> dict[str, Any]:
    return {"point": {"step": step, "epoch": None, "split": "train", "values": {"loss": 1.0 / step}}}


def _points(job_id: int) -> list[MetricPoint]:
    with Session(get_engine()) as session:
        query = select(MetricPoint).where(MetricPoint.job_id == job_id).order_by(col(MetricPoint.id))
        return list(session.exec(query).all())


def test_writer_writes_every_point_in_order(studio_settings: Path) -> None:
    from worker.reporting import MetricWriter

    with Session(get_engine()) as session:
        job_id = _job(session).id
    assert job_id is not None
    # A tiny queue and batch: the producer has to wait for the writer, and batches split many times.
    writer = MetricWriter(job_id, cancel_poll=0.05, capacity=4, batch=7)
    for step in range(1, 301):
        writer.put(_point(step))
        if step % 50 == 0:
            writer.put({"progress": {"current_step": step, "total_steps": 300, "progress": step / 300}})
    writer.close()
    points = _points(job_id)
    assert [p.step for p in points] == list(range(1, 301))
    assert writer.written == 300
    with Session(get_engine()) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.current_step == 300 and job.progress == 1.0
    # After close, a late point (e.g. the trainer's summary) is still written, in the caller's thread.
    writer.put(_point(301))
    assert [p.step for p in _points(job_id)][-1] == 301


def test_cancel_is_seen_by_the_writer_and_nothing_is_lost(studio_settings: Path) -> None:
    from worker.reporting import StudioCallback

    with Session(get_engine()) as session:
        job_id = _job(session).id
    assert job_id is not None
    callback = StudioCallback(job_id, batch_size=8)
    args = TrainingArguments(output_dir=str(studio_settings / "out"), report_to="none", use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    state.max_steps = 100
    for step in range(1, 11):
        state.global_step = step
        callback.on_log(args, state, control, logs={"loss": 0.5, "epoch": step / 100})
        callback.on_step_end(args, state, control)
    assert not control.should_training_stop
    with Session(get_engine()) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.cancel_requested = True
        session.add(job)
        session.commit()
    assert callback.writer.cancel_requested.wait(30)
    state.global_step = 11
    callback.on_log(args, state, control, logs={"loss": 0.4, "epoch": 0.11})
    callback.on_step_end(args, state, control)
    assert control.should_training_stop and callback.cancelled
    callback.on_train_end(args, state, control)
    points = _points(job_id)
    assert [p.step for p in points] == list(range(1, 12))
    assert all("samples_per_second" in p.values for p in points[1:])


def test_redis_news_arrive_in_order(studio_settings: Path, redis_url: str, monkeypatch: Any) -> None:
    from app.core.events import Subscription
    from app.core.settings import get_settings
    from worker.reporting import MetricWriter

    with Session(get_engine()) as session:
        job_id = _job(session).id
    assert job_id is not None
    monkeypatch.setenv("PEFT_STUDIO_BROKER_URL", redis_url)
    get_settings.cache_clear()

    async def listen() -> list[int]:
        received: list[int] = []
        async with Subscription(job_id) as news:
            assert news.live
            assert news._pubsub is not None
            writer = MetricWriter(job_id, cancel_poll=5.0, capacity=100, batch=1)
            for step in range(1, 21):
                writer.put(_point(step))
            await asyncio.to_thread(writer.close)
            for _ in range(200):  # None also stands for the (ignored) subscribe confirmation
                message = await news._pubsub.get_message(timeout=0.5)
                if message is not None:
                    received.append(json.loads(message["data"])["last_id"])
                if len(received) == 20:
                    break
        return received

    last_ids = asyncio.run(listen())
    ids = [p.id for p in _points(job_id)]
    assert last_ids == ids  # one notification per batch of one, in database order


def test_without_redis_nothing_is_published(studio_settings: Path) -> None:
    from app.core.events import Subscription, publish, redis_url

    assert redis_url() is None
    assert publish(1, 5) is False

    async def wait() -> bool:
        async with Subscription(1) as news:
            assert not news.live
            return await news.wait(0.01)

    assert asyncio.run(wait()) is False


@pytest.mark.parametrize("broken", ["redis://127.0.0.1:1/0"])
def test_unreachable_redis_falls_back_to_polling(
    studio_settings: Path, monkeypatch: Any, broken: str
) -> None:
    from app.core.events import Subscription, publish
    from app.core.settings import get_settings

    monkeypatch.setenv("PEFT_STUDIO_BROKER_URL", broken)
    get_settings.cache_clear()
    assert publish(1, 5) is False

    async def wait() -> bool:
        async with Subscription(1) as news:
            return await news.wait(0.01)

    assert asyncio.run(wait()) is False
