"""Time mergecli against the I/O floor on a benchmark family; print a table of ratios.

    python benchmarks/run.py [--size 0.5b] [--methods linear ties ...] [--compare-mergekit]
                             [--repeat 3] [--cold]

For each recipe, in one run: the I/O floor (read every input tensor once and write one
model, `io_floor.py`), then `mergecli run` (and `mergekit-yaml` with --compare-mergekit when
it is installed), each in its own process timed by /usr/bin/time (wall seconds, peak RSS).
The page cache is warm (the floor runs first), or emptied before every command with
--cold (as root: sync, then /proc/sys/vm/drop_caches). With --repeat N the three commands run N
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
# issue #14's targets, in multiples of the I/O floor; every other method: 5x
TARGET = {"linear": 1.3, "passthrough": 1.3, "lora_fold": 1.3, "task_arithmetic": 2.5, "ties": 2.5,
          "dare_ties": 2.5, "breadcrumbs_ties": 2.5, "slerp": 2.5}  # fmt: skip
BLOCKED = {"linear", "passthrough", "task_arithmetic", "ties", "dare_ties", "dare_linear",
           "breadcrumbs", "breadcrumbs_ties", "slerp", "lora_fold", "lora_ties"}  # fmt: skip
PEAK = 2.5e9  # every method
BLOCKED_PEAK = 0.8e9
NO_BASE = {"linear", "karcher"}


def recipes(family: Path) -> dict[str, str]:
    """The benchmark recipes over `family` (base, ft1..ft3): weights 0.5/0.3/0.2 and
    densities 0.5/0.7/0.3 where a method takes them (issue #14's recipe)."""
    base, ft = family / "base", [family / f"ft{i}" for i in (1, 2, 3)]
    config = base / "config.json"
    layers = json.loads(config.read_text())["num_hidden_layers"] if config.exists() else 24
    half = layers // 2
    head = f"base_model: {base}\nmodels:\n"

    def models(params: list[str]) -> str:
        return "".join(
            f"  - model: {m}\n" + (f"    parameters: {{{p}}}\n" if p else "")
            for m, p in zip(ft, params)
        )

    wd = models(
        ["weight: 0.5, density: 0.5", "weight: 0.3, density: 0.7", "weight: 0.2, density: 0.3"]
    )
    w = models(["weight: 0.5", "weight: 0.3", "weight: 0.2"])
    plain = models(["", "", ""])
    one = f"  - model: {ft[0]}\n"
    two = f"  - model: {ft[0]}\n  - model: {ft[1]}\n"
    return {
        "linear": f"merge_method: linear\nmodels:\n{w}",
        "passthrough": "merge_method: passthrough\nslices:\n"
        f"  - sources:\n      - model: {ft[0]}\n        layer_range: [0, {half}]\n"
        f"  - sources:\n      - model: {ft[1]}\n        layer_range: [{half}, {layers}]\n",
        "task_arithmetic": f"merge_method: task_arithmetic\n{head}{w}",
        "ties": f"merge_method: ties\nparameters: {{normalize: true}}\n{head}{wd}",
        "dare_ties": f"merge_method: dare_ties\nseed: 0\n{head}{wd}",
        "dare_linear": f"merge_method: dare_linear\nseed: 0\n{head}{wd}",
        "breadcrumbs": f"merge_method: breadcrumbs\n{head}{wd}",
        "breadcrumbs_ties": f"merge_method: breadcrumbs_ties\n{head}{wd}",
        "slerp": f"merge_method: slerp\nbase_model: {ft[0]}\nparameters: {{t: [0, 0.5, 1]}}\nmodels:\n{two}",
        "della": f"merge_method: della\nseed: 0\n{head}{wd}",
        "della_linear": f"merge_method: della_linear\nseed: 0\n{head}{wd}",
        "sce": f"merge_method: sce\nparameters: {{select_topk: 0.5}}\n{head}{plain}",
        "model_stock": f"merge_method: model_stock\n{head}{plain}",
        "karcher": f"merge_method: karcher\nmodels:\n{plain}",
        "multislerp": f"merge_method: multislerp\n{head}{w}",
        "nuslerp": f"merge_method: nuslerp\nmodels:\n"
        f"  - model: {ft[0]}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {ft[1]}\n    parameters: {{weight: 0.4}}\n",
        "consensus": f"merge_method: consensus\n{head}{plain}",
        "tsv": f"merge_method: tsv\n{head}{plain}",
        "pcb": f"merge_method: pcb\n{head}{plain}",
        "widen": f"merge_method: widen\n{head}{plain}",
        "arcee_fusion": f"merge_method: arcee_fusion\n{head}{one}",
        "nearswap": f"merge_method: nearswap\nparameters: {{t: 0.001}}\n{head}{one}",
        "ram": f"merge_method: ram\n{head}{plain}",
        "ramplus_tl": f"merge_method: ramplus_tl\n{head}{plain}",
        # issue #15: one rank-64 adapter folded; ties of three adapters folded into the base
        "lora_fold": f"merge_method: linear\nmodels:\n  - model: {base}+{family / 'lora1'}\n"
        "    parameters: {weight: 1}\n",
        "lora_ties": f"merge_method: ties\nparameters: {{normalize: true}}\n{head}"
        + wd.replace(str(family / "ft"), f"{base}+{family / 'lora'}"),
    }


def inputs_of(method: str, family: Path) -> list[Path]:
    """The model folders a recipe reads (for the floor)."""
    ft = [family / f"ft{i}" for i in (1, 2, 3)]
    if method in ("slerp", "passthrough", "nuslerp"):
        return ft[:2]
    if method in ("arcee_fusion", "nearswap"):
        return [family / "base", ft[0]]
    if method == "lora_fold":
        return [family / "base", Path("--extra"), family / "lora1"]
    if method == "lora_ties":
        return [family / "base", Path("--extra"), *(family / f"lora{i}" for i in (1, 2, 3))]
    return ft if method in NO_BASE else [family / "base", *ft]


def ensure_family(size: str, family: Path) -> Path:
    """The benchmark family of `size` in `family`, made first when it is missing."""
    if not (family / "ft3").exists():
        subprocess.run(
            [sys.executable, str(HERE / "make_family.py"), "--size", size, "--out", str(family)],
            check=True,
        )
    return family


def cold_cache() -> bool:
    """Empty the page cache (sync, then drop caches: root only); False when not allowed,
    and then a run whose inputs exceed RAM together still reads most of them from disk."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def timed(command: list[str], cold: bool = False) -> tuple[float, int]:
    """Run `command` under /usr/bin/time (after emptying the page cache when `cold`);
    return (wall seconds, peak RSS bytes)."""
    if cold and not cold_cache():
        print("cannot drop the page cache here (not root): timings are not cold", file=sys.stderr)
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
    parser.add_argument("--mergekit", help="path of mergekit-yaml (default: on PATH)")
    parser.add_argument("--device", default="cpu", help="mergecli's --device (cpu, cuda)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time each command N times, interleaved; report the median wall and the largest peak",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="empty the page cache before every command (the floor is then the cold floor)",
    )
    args = parser.parse_args()
    family = ensure_family(args.size, args.work / args.size)
    mergekit = (args.mergekit or shutil.which("mergekit-yaml")) if args.compare_mergekit else None
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
                "--device",
                args.device,
            ],
        }
        if mergekit:
            commands["mergekit"] = [mergekit, str(recipe), str(family / f"mk-{method}")]
        runs: dict[str, list[tuple[float, int]]] = {key: [] for key in commands}
        for _ in range(args.repeat):  # interleaved, so a slow spell of the machine hits all
            for key, command in commands.items():
                runs[key].append(timed(command, args.cold))
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
            "peaks": {key: [r for _, r in timings] for key, timings in runs.items()},
        }
        if mergekit:
            entry["mergekit_s"], entry["mergekit_rss"] = summary(runs["mergekit"])
        shutil.rmtree(out, ignore_errors=True)
        ratio = wall / floor
        target = TARGET.get(method, 5.0)
        peak = BLOCKED_PEAK if method in BLOCKED else PEAK
        rows.append(
            f"| {method} | {floor:.1f} | {wall:.1f} | {ratio:.2f}x (target <= {target}x: {'met' if ratio <= target else 'missed'}) "
            f"| {rss / 1e9:.2f} GB (<= {peak / 1e9} GB: {'met' if rss <= peak else 'missed'}) "
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
