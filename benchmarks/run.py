"""Time mergecli against the I/O floor on a benchmark family; print a table of ratios.

    python benchmarks/run.py [--size 0.5b] [--methods linear ties ...] [--compare-mergekit]
                             [--repeat 3]

For each recipe, in one run: the I/O floor (read every input tensor once and write one
model, `io_floor.py`), then `mergecli run` (and `mergekit-yaml` with --compare-mergekit when
it is installed), each in its own process timed by /usr/bin/time (wall seconds, peak RSS).
The page cache is warm (the floor runs first). With --repeat N the three commands run N
times, interleaved (a slow spell of a shared machine then slows all of them), and the
table shows median walls and the largest peak RSS; every wall is kept in the JSON.
Targets are those of shared/spec/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = {"linear": 1.5, "passthrough": 1.5}  # others: 3x the floor


def recipes(family: Path) -> dict[str, str]:
    """The benchmark recipes over `family` (base, ft1..ft3)."""
    base, ft = family / "base", [family / f"ft{i}" for i in (1, 2, 3)]
    config = base / "config.json"
    layers = json.loads(config.read_text())["num_hidden_layers"] if config.exists() else 24
    half = layers // 2
    three = "".join(
        f"  - model: {m}\n    parameters: {{weight: 1.0, density: {d}}}\n"
        for m, d in zip(ft, (0.5, 0.7, 0.3))
    )
    return {
        "linear": "merge_method: linear\nmodels:\n"
        + "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in ft),
        "task_arithmetic": f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        + "".join(
            f"  - model: {m}\n    parameters: {{weight: {w}}}\n"
            for m, w in zip(ft, (0.5, 0.3, 0.2))
        ),
        "ties": f"merge_method: ties\nbase_model: {base}\nmodels:\n{three}",
        "dare_ties": f"merge_method: dare_ties\nbase_model: {base}\nseed: 0\nmodels:\n{three}",
        "slerp": f"merge_method: slerp\nbase_model: {ft[0]}\nparameters: {{t: [0, 0.5, 1]}}\nmodels:\n  - model: {ft[0]}\n  - model: {ft[1]}\n",
        "passthrough": "merge_method: passthrough\nslices:\n"
        f"  - sources:\n      - model: {ft[0]}\n        layer_range: [0, {half}]\n"
        f"  - sources:\n      - model: {ft[1]}\n        layer_range: [{half}, {layers}]\n",
    }


def inputs_of(method: str, family: Path) -> list[Path]:
    """The model folders a recipe reads (for the floor)."""
    ft = [family / f"ft{i}" for i in (1, 2, 3)]
    if method in ("slerp", "passthrough"):
        return ft[:2]
    return ft if method == "linear" else [family / "base", *ft]


def ensure_family(size: str, family: Path) -> Path:
    """The benchmark family of `size` in `family`, made first when it is missing."""
    if not (family / "ft3").exists():
        subprocess.run(
            [sys.executable, str(HERE / "make_family.py"), "--size", size, "--out", str(family)],
            check=True,
        )
    return family


def timed(command: list[str]) -> tuple[float, int]:
    """Run `command` under /usr/bin/time; return (wall seconds, peak RSS bytes)."""
    done = subprocess.run(
        ["/usr/bin/time", "-f", "%e %M", *command], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr}")
    wall, rss_kb = done.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) * 1024


def summary(timings: list[tuple[float, int]]) -> tuple[float, int]:
    """(median wall seconds, largest peak RSS) of repeated timings."""
    return statistics.median(w for w, _ in timings), max(r for _, r in timings)


def main() -> None:
    """Run every recipe; print markdown rows and write results JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="0.5b")
    parser.add_argument("--methods", nargs="*", default=list(recipes(Path())))
    parser.add_argument("--work", type=Path, default=HERE / "_work")
    parser.add_argument("--compare-mergekit", action="store_true")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time each command N times, interleaved; report the median wall and the largest peak",
    )
    args = parser.parse_args()
    family = ensure_family(args.size, args.work / args.size)
    mergekit = shutil.which("mergekit-yaml") if args.compare_mergekit else None
    if args.compare_mergekit and not mergekit:
        print("mergekit-yaml not installed: no mergekit figures", file=sys.stderr)
    rows, results = [], []
    texts = recipes(family)
    for method in args.methods:
        recipe = family / f"{method}.yaml"
        recipe.write_text(texts[method])
        out = family / f"out-{method}"
        floor_file = family / "floor.safetensors"
        commands = {
            "floor": [
                sys.executable,
                str(HERE / "io_floor.py"),
                str(floor_file),
                *map(str, inputs_of(method, family)),
            ],
            "mergecli": [
                sys.executable,
                "-m",
                "mergecli",
                "run",
                str(recipe),
                "-o",
                str(out),
                "--overwrite",
                "--quiet",
            ],
        }
        if mergekit:
            commands["mergekit"] = [mergekit, str(recipe), str(family / f"mk-{method}")]
        runs: dict[str, list[tuple[float, int]]] = {key: [] for key in commands}
        for _ in range(args.repeat):  # interleaved, so a slow spell of the machine hits all
            for key, command in commands.items():
                runs[key].append(timed(command))
                floor_file.unlink(missing_ok=True)
                shutil.rmtree(family / f"mk-{method}", ignore_errors=True)
        (floor, floor_rss), (wall, rss) = summary(runs["floor"]), summary(runs["mergecli"])
        planned = subprocess.run(
            [sys.executable, "-m", "mergecli", "plan", str(recipe), "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        predicted = json.loads(planned.stdout)["predicted_peak_bytes"]
        entry = {
            "method": method,
            "predicted_rss": predicted,
            "floor_s": floor,
            "floor_rss": floor_rss,
            "mergecli_s": wall,
            "mergecli_rss": rss,
            "walls": {key: [w for w, _ in timings] for key, timings in runs.items()},
        }
        if mergekit:
            entry["mergekit_s"], entry["mergekit_rss"] = summary(runs["mergekit"])
        shutil.rmtree(out, ignore_errors=True)
        ratio = wall / floor
        target = TARGET.get(method, 3.0)
        rows.append(
            f"| {method} | {floor:.1f} | {wall:.1f} | {ratio:.2f}x (target <= {target}x: {'met' if ratio <= target else 'missed'}) "
            f"| {rss / 1e9:.2f} GB ({'met' if rss <= 1.5e9 else 'missed'}) "
            f"| {predicted / 1e9:.2f} GB ({(predicted - rss) / rss:+.0%}) |"
            + (
                f" {entry['mergekit_s']:.1f} s, {entry['mergekit_s'] / wall:.1f}x |"
                if mergekit
                else " - |"
            )
        )
        results.append(entry)
        print(rows[-1], flush=True)
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    (args.work / f"results-{args.size}.json").write_text(
        json.dumps({"machine": machine, "results": results}, indent=2)
    )
    print(
        "\n| recipe | I/O floor s | mergecli s | ratio | peak RSS | predicted peak | mergekit |"
        "\n|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
