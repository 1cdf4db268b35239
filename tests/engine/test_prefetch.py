"""Read-ahead: the inputs of the jobs after a started one are advised to the kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import write
from mergecli.cli._common import plan_recipe
from mergecli.engine import prefetch
from mergecli.engine.jobs import plan_jobs
from mergecli.engine.run import run_plan
from mergecli.io.header import read_header


def _recipe(family: dict[str, Path], tmp_path: Path) -> Path:
    return write(
        tmp_path / "r.yaml",
        f"merge_method: task_arithmetic\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 0.5}}\n",
    )


def test_every_later_jobs_input_bytes_are_advised_once_and_output_is_unchanged(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipe(family, tmp_path)
    plan = plan_recipe(recipe)
    text = recipe.read_text()
    plain = run_plan(plan, tmp_path / "plain", text, reproducible=True, block_elements=100)
    advised: list[tuple[str, int, int]] = []

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))

    monkeypatch.setattr(prefetch, "PREFETCH_BYTES", 1 << 30)  # everything after the first job
    monkeypatch.setattr(os, "posix_fadvise", record)
    ahead = run_plan(plan, tmp_path / "ahead", text, reproducible=True, block_elements=100)
    assert ahead.files == plain.files
    jobs = plan_jobs(plan, frozenset(), 100)
    expected = []
    for job in jobs[1:]:
        for ref in [*job.tensor.inputs, job.tensor.base]:
            assert ref is not None
            model = plan.models[ref.model]
            path = model.source.local(model.tensors[ref.name].file)
            header = read_header(path)
            entry = header.entries[ref.name]
            begin, end = entry.begin, entry.end
            if job.rows is not None:
                row = (end - begin) // entry.shape[0]
                begin, end = begin + job.rows[0] * row, begin + job.rows[1] * row
            expected.append((str(path.resolve()), header.data_start + begin, end - begin))
    assert sorted(advised) == sorted(expected)
    assert any(job.rows is not None for job in jobs[1:])  # blocks are advised as blocks


def test_read_ahead_stops_at_its_byte_limit(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = plan_recipe(_recipe(family, tmp_path))
    calls: list[int] = []
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, offset, length, advice: calls.append(length)
    )
    jobs = plan_jobs(plan, frozenset(), 1 << 30)
    from mergecli.io.reader import TensorReader

    reader = TensorReader()
    ahead = prefetch.Prefetcher(plan, reader, jobs)
    limit = ahead._bytes(jobs[1]) + ahead._bytes(jobs[2])
    monkeypatch.setattr(prefetch, "PREFETCH_BYTES", limit)
    ahead.started(jobs[0])
    ahead.close()
    reader.close()
    assert sum(calls) == limit  # jobs 1 and 2, not job 3
