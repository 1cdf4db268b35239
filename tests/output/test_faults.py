"""Faults: interrupts, a full disk, a crashing method; reruns are byte-identical; no token leaks."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import hub_cache_model, invoke, run_subprocess, write
from mergecli import methods


@pytest.fixture(scope="session")
def big_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two 120-layer models of 1 MB tensors: slow enough to interrupt mid-merge."""
    root = tmp_path_factory.mktemp("big")
    folders = []
    for seed in (1, 2):
        folder = root / f"m{seed}"
        folder.mkdir()
        (folder / "config.json").write_text(
            json.dumps({"model_type": "toy", "num_hidden_layers": 120})
        )
        tensors = {
            f"model.layers.{i}.w": torch.full((1024, 256), float(seed + i)) for i in range(120)
        }
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    return folders[0], folders[1]


def big_recipe(tmp_path: Path, pair: tuple[Path, Path]) -> Path:
    return write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {pair[0]}\n    parameters: {{weight: 1}}\n"
        f"  - model: {pair[1]}\n    parameters: {{weight: 1}}\n",
    )


def start(args: list[str], **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mergecli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,  # type: ignore[call-overload]
    )


SLOW_MERGE = """
import pathlib, sys, time
import mergecli.engine.run as run
from mergecli.cli import main

marker, delay = pathlib.Path(sys.argv.pop(1)), float(sys.argv.pop(1))
compute = run.compute_tensor

def slow(*args, **kwargs):
    done = compute(*args, **kwargs)
    marker.touch()  # a tensor is merged: the run is under way, far from its end
    time.sleep(delay)
    return done

run.compute_tensor = slow
sys.argv[0] = "mergecli"
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_merge_leaves_nothing(
    big_pair: tuple[Path, Path], tmp_path: Path, signum: int
) -> None:
    # each tensor takes 0.2 s more, so 120 tensors take 12 s at least (at most 2 at once):
    # the signal, sent once the first tensor is merged, always lands mid-merge
    out, marker = tmp_path / "out", tmp_path / "merging"
    recipe = big_recipe(tmp_path, big_pair)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, str(marker), "0.2", "run", str(recipe), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert (tmp_path / "out.partial").is_dir() and proc.poll() is None
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; no output folder was left behind" in err
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (5_000_000, 5_000_000))


def test_disk_full_is_exit_5_and_cleans_up(big_pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = start(
        ["run", str(big_recipe(tmp_path, big_pair)), "-o", str(out)], preexec_fn=_limit_file_size
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err
    assert "disk full while writing the output" in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_crashing_method_is_exit_1_and_cleans_up(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(args: object) -> torch.Tensor:
        raise RuntimeError("boom")

    monkeypatch.setitem(
        methods.REGISTRY, "linear", dataclasses.replace(methods.REGISTRY["linear"], fn=boom)
    )
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n",
    )
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 1
    assert "internal error: RuntimeError: boom" in err and "please report it" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    code, _, err = invoke(runner, "-v", "run", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 1 and "Traceback" in err


def test_reproducible_reruns_are_byte_identical(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: dare_ties\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 1, density: 0.5}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 1, density: 0.5}}\n",
    )
    contents = []
    for i, threads in enumerate(("1", "2")):
        out = tmp_path / f"o{i}"
        assert (
            invoke(
                runner, "run", str(recipe), "-o", str(out), "--reproducible", "--threads", threads
            )[0]
            == 0
        )
        contents.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert contents[0] == contents[1]
    assert "wall_seconds" not in json.loads(contents[0]["mergecli_manifest.json"])


def test_no_token_is_printed_or_written(family: dict[str, Path], tmp_path: Path) -> None:
    token = "hf_TopSecretToken0123456789"
    cache = tmp_path / "cache"
    hub_cache_model(cache, "org/tiny-a", family["a"], "ab" * 20)
    recipe = write(
        tmp_path / "r.yaml",
        "merge_method: linear\nmodels:\n  - model: org/tiny-a\n    parameters: {weight: 1}\n",
    )
    args = ("run", str(recipe), "-o", str(tmp_path / "out"), "--json")
    done = run_subprocess(*args, HF_HUB_CACHE=str(cache), HF_TOKEN=token)
    assert done.returncode == 0, done.stderr
    assert token not in done.stdout + done.stderr
    for path in (tmp_path / "out").iterdir():
        assert token.encode() not in path.read_bytes()


def test_output_under_a_file_is_exit_5(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    (tmp_path / "afile").write_text("x")
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n",
    )
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "afile" / "out"))
    assert code == 5 and "cannot create" in err


def test_kill_and_resume_is_byte_identical(big_pair: tuple[Path, Path], tmp_path: Path) -> None:
    recipe = str(big_recipe(tmp_path, big_pair))
    common = ["--shard-size", "20MB", "--reproducible"]
    reference = start(["run", recipe, "-o", str(tmp_path / "ref"), *common])
    assert reference.wait(timeout=120) == 0
    out = tmp_path / "out"
    proc = start(["run", recipe, "-o", str(out), *common])
    progress = tmp_path / "out.partial" / ".mergecli-progress.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if progress.exists() and len(json.loads(progress.read_text())["shards"]) >= 2:
            break
        time.sleep(0.005)
    proc.kill()
    proc.communicate(timeout=30)
    assert not out.exists() and (tmp_path / "out.partial").exists()
    resumed = start(["run", recipe, "-o", str(out), *common, "--resume"])
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    reused = int(err.split("resumed: reused ")[1].split(" of ")[0])
    assert 2 <= reused < 7 and "of 7 shards" in err
    ref_files = {p.name: p.read_bytes() for p in sorted((tmp_path / "ref").iterdir())}
    out_files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert ref_files == out_files
    assert not (tmp_path / "out.partial").exists()


def test_resume_recomputes_a_damaged_shard(big_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from mergecli.output import resume as progress_file
    from mergecli.output.folder import MARKER

    recipe = str(big_recipe(tmp_path, big_pair))
    common = ["--shard-size", "20MB", "--reproducible"]
    assert start(["run", recipe, "-o", str(tmp_path / "ref"), *common]).wait(timeout=120) == 0
    # a fake interrupted run: two shards recorded, the second one damaged afterwards
    work = tmp_path / "out.partial"
    work.mkdir()
    (work / MARKER).write_text("")
    shards = sorted(p.name for p in (tmp_path / "ref").glob("model-*.safetensors"))
    for name in shards[:2]:
        (work / name).write_bytes((tmp_path / "ref" / name).read_bytes())
    from mergecli.cli._common import plan_recipe

    plan = plan_recipe(Path(recipe), "20MB")
    text = Path(recipe).read_text()
    fingerprint = progress_file.fingerprint(plan, text, progress_file.input_files(plan))
    recorded = {name: progress_file.sha256_file(work / name) for name in shards[:2]}
    progress_file.record(work, fingerprint, recorded)
    with (work / shards[1]).open("r+b") as handle:
        handle.seek(1000)
        handle.write(b"\xff" * 8)
    resumed = start(["run", recipe, "-o", str(tmp_path / "out"), *common, "--resume"])
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert "resumed: reused 1 of 7 shards" in err
    for name in shards:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
