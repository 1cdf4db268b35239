"""Hostile and clumsy use of the output: concurrent runs, folders that are not ours,
links, signals in every phase, failures after the shards, the open-files limit."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_faults import SLOW_MERGE, big_pair, big_recipe
from typer.testing import CliRunner

from conftest import invoke, write

__all__ = ["big_pair"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def slow_run(marker: Path, delay: float, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, str(marker), str(delay), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def wait_for(marker: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert marker.exists() and proc.poll() is None


def matches_manifest(out: Path) -> bool:
    manifest = json.loads((out / "mergecli_manifest.json").read_text())
    files = {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in out.rglob("*")
        if p.is_file() and p.name != "mergecli_manifest.json"
    }
    return bool(manifest["outputs"] == files)


def small_recipe(family: dict[str, Path], tmp_path: Path) -> Path:
    return write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 1}}\n",
    )


@pytest.mark.slow
@pytest.mark.parametrize("second", [[], ["--overwrite"], ["--resume"], ["--overwrite-any"]])
def test_a_second_run_into_a_live_output_is_refused(
    big_pair: tuple[Path, Path], tmp_path: Path, runner: CliRunner, second: list[str]
) -> None:
    out, marker = tmp_path / "out", tmp_path / "merging"
    recipe = big_recipe(tmp_path, big_pair)
    first = slow_run(marker, 0.02, "run", str(recipe), "-o", str(out), "--reproducible")
    wait_for(marker, first)
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(out), *second)
    assert code == 5, err
    assert "another run is writing this output" in err and f"process {first.pid}" in err
    assert (tmp_path / "out.partial").is_dir()
    _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert matches_manifest(out) and not (tmp_path / "out.partial").exists()


def test_overwrite_replaces_only_mergecli_outputs(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe, out = small_recipe(family, tmp_path), tmp_path / "mine"
    out.mkdir()
    for i in range(10):
        (out / f"thesis-{i}.tex").write_text("years of work")
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(out), "--overwrite")
    assert code == 5
    assert "is not a mergecli output (no mergecli_manifest.json); it holds: thesis-0.tex" in err
    assert "and 2 more" in err and "--overwrite-any" in err
    assert sorted(p.name for p in out.iterdir()) == [f"thesis-{i}.tex" for i in range(10)]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert invoke(runner, "run", str(recipe), "-o", str(empty))[0] == 0
    assert invoke(runner, "run", str(recipe), "-o", str(empty), "--overwrite")[0] == 0
    assert matches_manifest(empty)
    assert invoke(runner, "run", str(recipe), "-o", str(out), "--overwrite-any")[0] == 0
    assert matches_manifest(out) and not (out / "thesis-0.tex").exists()


@pytest.mark.parametrize("spelling", [".", "sub/..", "./sub/../"])
def test_dot_paths_name_the_real_folder_and_keep_its_files(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, chdir_tmp: Path, spelling: str
) -> None:
    (chdir_tmp / "sub").mkdir()
    (chdir_tmp / "notes.txt").write_text("mine")
    recipe = small_recipe(family, chdir_tmp)
    for extra in ([], ["--overwrite"]):
        code, _, err = invoke(runner, "run", str(recipe), "-o", spelling, *extra)
        assert code == 5, err
        assert "Traceback" not in err and "internal error" not in err
    assert (chdir_tmp / "notes.txt").read_text() == "mine"
    assert not list(chdir_tmp.parent.glob("*.partial"))


@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--overwrite-any"]])
def test_an_output_that_is_a_link_is_refused(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, extra: list[str]
) -> None:
    target = tmp_path / "real"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    code, _, err = invoke(
        runner, "run", str(small_recipe(family, tmp_path)), "-o", str(link), *extra
    )
    assert code == 5 and "is a symbolic link" in err, err
    assert link.is_symlink() and (target / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_an_output_that_is_a_file_is_exit_5(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, extra: list[str]
) -> None:
    file = tmp_path / "out"
    file.write_text("data")
    code, _, err = invoke(
        runner, "run", str(small_recipe(family, tmp_path)), "-o", str(file), *extra
    )
    assert code == 5 and "exists and is a file" in err
    assert file.read_text() == "data"


def test_a_partial_folder_not_made_by_mergecli_is_kept(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "mine.txt").write_text("mine")
    code, _, err = invoke(
        runner, "run", str(small_recipe(family, tmp_path)), "-o", str(tmp_path / "out")
    )
    assert code == 5 and "exists and was not made by mergecli" in err
    assert (partial / "mine.txt").read_text() == "mine"


def test_a_stale_partial_folder_of_a_dead_run_is_replaced(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / ".mergecli-partial").write_text(
        "mergecli work folder of process 1; safe to delete\n"
    )
    (partial / "junk.safetensors").write_text("x")
    code, _, err = invoke(
        runner, "run", str(small_recipe(family, tmp_path)), "-o", str(tmp_path / "out")
    )
    assert code == 0, err
    assert matches_manifest(tmp_path / "out") and not partial.exists()


@pytest.mark.parametrize("fail", [errno.ENOSPC, errno.EACCES, errno.EIO])
def test_failures_after_the_shards_are_output_errors(
    family: dict[str, Path],
    tmp_path: Path,
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
    fail: int,
) -> None:
    import mergecli.engine.run as run

    def broken(*args: object) -> None:
        raise OSError(fail, os.strerror(fail), "README.md")

    monkeypatch.setattr(run, "write_side_files", broken)
    out = tmp_path / "out"
    code, _, err = invoke(runner, "run", str(small_recipe(family, tmp_path)), "-o", str(out))
    assert code == 5, err
    assert ("disk full" if fail == errno.ENOSPC else "cannot write the output") in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def _few_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))


@pytest.mark.slow
def test_more_shards_than_the_open_files_limit(big_pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mergecli",
            "run",
            str(big_recipe(tmp_path, big_pair)),
            "-o",
            str(out),
            "--shard-size",
            "1KB",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        preexec_fn=_few_files,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    shards = list(out.glob("model-*.safetensors"))
    assert len(shards) > 48 and matches_manifest(out)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_starting_is_quiet(tmp_path: Path, signum: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergecli", "methods"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    time.sleep(0.3)  # the imports take over a second
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted while starting; nothing was written" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_repeated_signals_do_not_interrupt_the_cleanup(
    big_pair: tuple[Path, Path], tmp_path: Path, signum: int
) -> None:
    out, marker = tmp_path / "out", tmp_path / "merging"
    proc = slow_run(marker, 0.2, "run", str(big_recipe(tmp_path, big_pair)), "-o", str(out))
    wait_for(marker, proc)
    for _ in range(3):
        proc.send_signal(signum)
        time.sleep(0.05)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; no output folder was left behind" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.slow
def test_verify_resume_trusts_no_size_and_mtime(
    big_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """A recorded shard whose input changed in place (same size, same mtime) is reused by a
    plain resume but recomputed by `--resume --verify`, which hashes the inputs."""
    import shutil

    from mergecli.cli._common import plan_recipe
    from mergecli.output import resume as progress_file
    from mergecli.output.folder import MARKER

    pair = (tmp_path / "m1", tmp_path / "m2")
    for source, dest in zip(big_pair, pair):
        shutil.copytree(source, dest)
    recipe = big_recipe(tmp_path, pair)
    common = ["--shard-size", "20MB", "--reproducible", "--verify"]
    run = [sys.executable, "-m", "mergecli", "run", str(recipe)]
    assert subprocess.run([*run, "-o", str(tmp_path / "old"), *common], env=ENV).returncode == 0
    work = tmp_path / "out.partial"
    work.mkdir()
    (work / MARKER).write_text("")
    shards = sorted(p.name for p in (tmp_path / "old").glob("model-*.safetensors"))
    for name in shards[:3]:
        shutil.copy(tmp_path / "old" / name, work / name)
    plan = plan_recipe(recipe, "20MB")
    inputs = progress_file.input_files(plan, hashed=True)
    recorded = {name: progress_file.sha256_file(work / name) for name in shards[:3]}
    progress_file.record(
        work, progress_file.fingerprint(plan, recipe.read_text(), inputs), recorded
    )
    weights = pair[1] / "model.safetensors"
    stat = weights.stat()
    with weights.open("r+b") as handle:  # the first tensor's data: same size, new bytes
        handle.seek(weights.stat().st_size - 4 * 1024 * 256 * 120)
        handle.write(b"\x00\x00\x80\x3f" * 1024)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    resumed = subprocess.run(
        [*run, "-o", str(tmp_path / "out"), *common, "--resume"],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" not in resumed.stderr
    fresh = subprocess.run([*run, "-o", str(tmp_path / "fresh"), *common], env=ENV)
    assert fresh.returncode == 0
    for name in shards:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    assert (tmp_path / "out" / shards[0]).read_bytes() != (
        tmp_path / "old" / shards[0]
    ).read_bytes()
