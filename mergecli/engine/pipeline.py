"""The thread pipeline: compute jobs at once under a memory budget, store results in order."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from mergecli.engine.compute import Computed
from mergecli.engine.jobs import Job
from mergecli.engine.memory import Budget, admits

LOOKAHEAD = 2


def run_pipeline(
    jobs: list[Job],
    compute: Callable[[Job], Computed],
    store: Callable[[Job, Computed], None],
    budget: Budget,
) -> None:
    """Compute up to `budget.workers` jobs at once (reading overlaps math) while their
    estimated working memory stays under `budget.job_bytes`; store results in plan order.
    A job larger than the budget runs alone."""
    pending: deque[tuple[Job, Future[Computed]]] = deque()
    in_flight = 0
    with ThreadPoolExecutor(max_workers=budget.workers) as pool:
        try:
            for job in jobs:
                while not admits(budget, len(pending), in_flight, job.working_bytes, LOOKAHEAD):
                    done_job, future = pending.popleft()
                    store(done_job, future.result())
                    in_flight -= done_job.working_bytes
                pending.append((job, pool.submit(compute, job)))
                in_flight += job.working_bytes
            while pending:
                done_job, future = pending.popleft()
                store(done_job, future.result())
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise
