"""The seed-003 worker node, rebuilt from the seed's own code listing: the baseline of
``benchmarks/task_throughput.py``.

    SEED003_VARIANT=as-written .venv/bin/uvicorn benchmarks.seed003_worker:app --port 5000

The seed's ``worker_api.py`` ("Complete API Implementation"): a FastAPI app with the tasks in a
dict, a ``queue.PriorityQueue`` and a ``ThreadPoolExecutor(max_workers=4)``, a background loop
started on startup, served by uvicorn (the seed's Dockerfile runs ``uvicorn worker_api:app``).
Handlers, models and the loop are the listing's, line for line; the changes are type
annotations (mypy strict) and ``SEED003_VARIANT``:

- ``as-written`` (default): the listing's loop, which sleeps 0.1 s after every task (it takes
  at most one task per 0.1 s, 10 tasks/s), and runs ``execute_task`` in the event loop (the
  executor is created but never used, as in the listing).
- ``no-idle-sleep``: the same loop, but it sleeps 0.1 s only when the queue is empty and
  yields (``sleep(0)``) between tasks: the seed's design at its best, so the comparison is not
  only against its 10 tasks/s cap.

``execute_task`` is the listing's no-op (``{"status": "success"}``): the benchmark's tasks are
no-ops on both sides.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from queue import PriorityQueue
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in the dev group
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

__all__ = ("VARIANT", "app")

#: ``as-written`` or ``no-idle-sleep`` (see the module's docstring); read once, at import.
VARIANT = os.environ.get("SEED003_VARIANT", "as-written")
if VARIANT not in ("as-written", "no-idle-sleep"):
    raise SystemExit(f"SEED003_VARIANT must be as-written or no-idle-sleep, not {VARIANT!r}")

app = FastAPI(title="Vera Worker Node")

# Task storage
tasks: dict[str, dict[str, Any]] = {}  # task_id -> task_data
task_queue: PriorityQueue[tuple[int, str]] = PriorityQueue()
executor = ThreadPoolExecutor(max_workers=4)


class TaskRequest(BaseModel):
    """Task submission request"""

    task_id: str | None = None
    payload: dict[str, Any]
    priority: str = "normal"  # low, normal, high, critical


class TaskResponse(BaseModel):
    """Task status response"""

    task_id: str
    status: str
    result: Any | None = None
    error: str | None = None
    started_at: str | None = None
    completed_at: str | None = None


@app.post("/task/submit")
async def submit_task(task: TaskRequest) -> dict[str, Any]:
    """Submit task to worker"""
    task_id = task.task_id or str(uuid.uuid4())

    # Priority mapping
    priority_map = {"low": 3, "normal": 2, "high": 1, "critical": 0}

    # Create task record
    task_data: dict[str, Any] = {
        "task_id": task_id,
        "payload": task.payload,
        "status": "queued",
        "queued_at": datetime.utcnow().isoformat(),
        "started_at": None,
        "completed_at": None,
        "result": None,
        "error": None,
    }

    tasks[task_id] = task_data

    # Add to queue
    task_queue.put((priority_map.get(task.priority, 2), task_id))

    return {"status": "queued", "task_id": task_id, "position": task_queue.qsize()}


@app.get("/task/{task_id}")
async def get_task_status(task_id: str) -> dict[str, Any]:
    """Get task status"""
    if task_id not in tasks:
        raise HTTPException(status_code=404, detail="Task not found")

    return tasks[task_id]


@app.get("/health")
async def health_check() -> dict[str, Any]:
    """Health check endpoint"""
    cpu_percent = psutil.cpu_percent(interval=0.1)
    memory = psutil.virtual_memory()

    active_tasks = sum(1 for t in tasks.values() if t["status"] == "running")

    return {
        "status": "healthy",
        "active_tasks": active_tasks,
        "queue_size": task_queue.qsize(),
        "cpu_percent": cpu_percent,
        "memory_percent": memory.percent,
        "timestamp": datetime.utcnow().isoformat(),
    }


@app.get("/metrics")
async def get_metrics() -> dict[str, Any]:
    """Get worker metrics"""
    completed = sum(1 for t in tasks.values() if t["status"] == "completed")
    failed = sum(1 for t in tasks.values() if t["status"] == "failed")

    # Calculate average execution time
    execution_times = []
    for task in tasks.values():
        if task["completed_at"] and task["started_at"]:
            start = datetime.fromisoformat(task["started_at"])
            end = datetime.fromisoformat(task["completed_at"])
            execution_times.append((end - start).total_seconds())

    avg_time = sum(execution_times) / len(execution_times) if execution_times else 0

    return {
        "tasks_completed": completed,
        "tasks_failed": failed,
        "tasks_queued": task_queue.qsize(),
        "average_execution_time": avg_time,
        "cpu_cores": psutil.cpu_count(),
        "memory_total_gb": psutil.virtual_memory().total / (1024**3),
    }


# Background task processor
async def process_tasks() -> None:
    """Background task processing loop"""
    while True:
        if not task_queue.empty():
            _priority, task_id = task_queue.get()
            task_data = tasks[task_id]

            # Update status
            task_data["status"] = "running"
            task_data["started_at"] = datetime.utcnow().isoformat()

            try:
                # Execute task
                result = await execute_task(task_data["payload"])

                # Update result
                task_data["status"] = "completed"
                task_data["result"] = result
                task_data["completed_at"] = datetime.utcnow().isoformat()

            except Exception as e:
                # Update error
                task_data["status"] = "failed"
                task_data["error"] = str(e)
                task_data["completed_at"] = datetime.utcnow().isoformat()

            if VARIANT == "no-idle-sleep":  # not in the listing: see the module's docstring
                await asyncio.sleep(0)
                continue

        await asyncio.sleep(0.1)


async def execute_task(payload: dict[str, Any]) -> dict[str, Any]:
    """Execute task payload"""
    # Task execution logic here
    # This would call the appropriate function with args/kwargs
    _function_name = payload.get("function")
    _args = payload.get("args", [])
    _kwargs = payload.get("kwargs", {})

    # Execute
    # result = function_registry[function_name](*args, **kwargs)

    return {"status": "success"}


#: The background loop (the listing drops create_task's result; kept here so it is not
#: collected while it runs).
_background: set[asyncio.Task[None]] = set()


@app.on_event("startup")
async def startup() -> None:
    """Start background task processor"""
    t = asyncio.create_task(process_tasks())
    _background.add(t)
