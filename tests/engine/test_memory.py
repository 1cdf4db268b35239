"""Memory budget: --max-memory sizes row blocks and admission; the plan predicts the peak."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from typer.testing import CliRunner

from conftest import invoke, write
from mergecli.cli._common import plan_recipe
from mergecli.engine.jobs import plan_jobs
from mergecli.engine.memory import RUNTIME_BYTES, Budget, budget_for, predict_peak


def ties_recipe(family: dict[str, Path], tmp_path: Path) -> Path:
    return write(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 0.6, density: 0.4}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 0.4, density: 0.6}}\n",
    )


def test_max_memory_gives_smaller_blocks_and_the_same_bytes(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = ties_recipe(family, tmp_path)
    plan = plan_recipe(recipe)
    tight = budget_for(plan, RUNTIME_BYTES + 40_000)
    assert tight.job_bytes == 40_000 and tight.workers == 2
    assert 1 <= tight.block_elements < 1024  # the 32 x 32 embedding is cut into row blocks
    assert any(job.rows is not None for job in plan_jobs(plan, frozenset(), tight.block_elements))
    outs = []
    for name, extra in (("default", []), ("tight", ["--max-memory", str(RUNTIME_BYTES + 40_000)])):
        out = tmp_path / name
        code, _, err = invoke(
            runner, "run", str(recipe), "-o", str(out), "--reproducible", "-q", *extra
        )
        assert code == 0, err
        outs.append(out)
    for path in sorted(p.name for p in outs[0].iterdir()):
        assert (outs[0] / path).read_bytes() == (outs[1] / path).read_bytes(), path


def test_max_memory_below_the_runtime_is_a_usage_error(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = ties_recipe(family, tmp_path)
    code, _, err = invoke(
        runner, "run", str(recipe), "-o", str(tmp_path / "o"), "--max-memory", "100MB"
    )
    assert code == 2
    assert "--max-memory 100000000 bytes is below the runtime's own 250 MB" in err
    code, _, err = invoke(
        runner, "run", str(recipe), "-o", str(tmp_path / "o"), "--max-memory", "lots"
    )
    assert code == 2 and "--max-memory: cannot read 'lots' as a size" in err


def test_predicted_peak_follows_the_pipeline_admission(
    family: dict[str, Path], tmp_path: Path
) -> None:
    plan = plan_recipe(ties_recipe(family, tmp_path))
    sizes = [job.working_bytes for job in plan_jobs(plan, frozenset(), Budget().block_elements)]
    assert predict_peak(plan, Budget(workers=1)) == RUNTIME_BYTES + max(sizes)
    pairs = max(a + b for a, b in itertools.pairwise(sizes))
    assert predict_peak(plan, Budget(workers=2)) == RUNTIME_BYTES + pairs
    # a budget below two jobs admits one at a time
    assert predict_peak(plan, Budget(workers=2, job_bytes=max(sizes))) == RUNTIME_BYTES + max(sizes)


def test_plan_json_shows_the_predicted_peak(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = ties_recipe(family, tmp_path)
    code, out, err = invoke(runner, "plan", str(recipe), "--json")
    assert code == 0, err
    assert json.loads(out)["predicted_peak_bytes"] == predict_peak(plan_recipe(recipe), Budget())


def test_a_budget_that_cannot_be_met_is_warned_about(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    limit = str(RUNTIME_BYTES + 1000)
    code, _, err = invoke(
        runner,
        "run",
        str(ties_recipe(family, tmp_path)),
        "-o",
        str(tmp_path / "t"),
        "--max-memory",
        limit,
    )
    assert code == 0, err
    assert "is above --max-memory 250.00 MB: rows of some tensors are too big for it" in err
    della = write(
        tmp_path / "d.yaml",
        f"merge_method: tsv\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['a']}\n  - model: {family['b']}\n",
    )
    code, _, err = invoke(
        runner, "run", str(della), "-o", str(tmp_path / "d"), "--max-memory", limit
    )
    assert code == 0, err
    assert "`tsv` needs some tensors whole (it does not run in row blocks)" in err


def test_what_dare_holds_between_passes_is_predicted(
    family: dict[str, Path], tmp_path: Path
) -> None:
    from mergecli.engine.blocks import row_blocks
    from mergecli.engine.memory import held_between_passes, input_cache_bytes, kept_bits

    dare = ties_recipe(family, tmp_path).read_text().replace("ties", "dare_ties")
    plan = plan_recipe(write(tmp_path / "dare.yaml", dare))
    ties = plan_recipe(ties_recipe(family, tmp_path))
    block = 100
    blocked = [t for t in plan.tensors if len(row_blocks(plan, t, block)) > 1]
    assert len(blocked) >= 2
    for tensor in plan.tensors:  # two models: a bit per entry of each, rounded up to bytes;
        # the three inputs (two models and the base) in float32 while they fit
        n = tensor.numel if tensor in blocked else 0
        assert kept_bits(plan, tensor, block) == 2 * ((n + 7) // 8)
        assert input_cache_bytes(plan, tensor, block) == 3 * 4 * n
        assert kept_bits(ties, tensor, block) == 0  # TIES keeps thresholds, not bits
        assert input_cache_bytes(ties, tensor, block) == 0  # nor inputs (no sums pass)
    held = sorted(2 * ((t.numel + 7) // 8) + 12 * t.numel for t in blocked)
    assert held_between_passes(plan, block) == sum(held[-2:])
    budget = Budget(block_elements=block)
    sizes = [job.working_bytes for job in plan_jobs(plan, frozenset(), block)]
    pairs = max(a + b for a, b in itertools.pairwise(sizes))
    assert predict_peak(plan, budget) == RUNTIME_BYTES + pairs + sum(held[-2:])
