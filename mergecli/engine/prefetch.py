"""Read-ahead: while the current jobs merge, the kernel reads the next jobs' inputs.

Inputs are read with positioned reads, one tensor (or block) at a time; a cold read would
leave the cores idle while the disk works. As each job starts, the byte ranges of the
inputs of the jobs after it (up to PREFETCH_BYTES ahead) are advised to the kernel
(`posix_fadvise(WILLNEED)`), from a thread of its own, so the disk reads them meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from mergecli.engine.blocks import block_numel
from mergecli.engine.inputs import input_refs
from mergecli.engine.jobs import Job
from mergecli.io.dtypes import ITEMSIZE
from mergecli.io.reader import TensorReader
from mergecli.plan.types import MergePlan

PREFETCH_BYTES = 256 << 20


class Prefetcher:
    """Advises the inputs of the jobs ahead of each started one, each job once."""

    def __init__(self, plan: MergePlan, reader: TensorReader, jobs: Sequence[Job]) -> None:
        self.plan, self.reader, self.jobs = plan, reader, jobs
        self.position = {(job.index, job.rows): k for k, job in enumerate(jobs)}
        self.advised = 0  # jobs before this position have been advised
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")

    def started(self, job: Job) -> None:
        """Job `job` starts: advise the inputs of the jobs within PREFETCH_BYTES after it."""
        k = self.position[(job.index, job.rows)]
        with self.lock:
            start, stop, ahead = max(self.advised, k + 1), k + 1, 0
            while stop < len(self.jobs):
                ahead += self._bytes(self.jobs[stop])
                if ahead > PREFETCH_BYTES:
                    break
                stop += 1
            if stop <= start:
                return
            self.advised = stop
        self.pool.submit(self._advise, self.jobs[start:stop])

    def _bytes(self, job: Job) -> int:
        refs = input_refs(job.tensor)
        sizes = (ITEMSIZE[self.plan.models[r.model].tensors[r.name].dtype] for r in refs)
        return block_numel(job.tensor, job.rows) * sum(sizes)

    def _advise(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            if job.tensor.vocab_names is not None:
                continue  # re-indexed rows: not worth a guess
            for ref in input_refs(job.tensor):
                self.reader.prefetch(self.plan.models[ref.model], ref.name, job.rows)

    def close(self) -> None:
        """Stop advising (advice not yet given is dropped)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
