"""Time `mergecli extract-lora` (and `mergekit-extract-lora` with --mergekit) on a benchmark
family: TUNED = ft1 (dense task vectors, as a full fine-tune's), BASE = base, rank 64.

    python benchmarks/extract.py --size 0.5b [--rank 64] [--mergekit PATH] [--repeat 3]

Both adapters are scored by the same code: per LoRA'd matrix, the relative Frobenius error
||D - scale * B A|| / ||D|| of the adapter's update against the true delta D, next to the
Eckart-Young optimum (torch's SVD of each delta in float64).
Prints wall seconds, peak RSS and the mean and worst error ratio to the optimum.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import HERE, ensure_family, timed


def weights(folder: Path) -> dict[str, tuple[Path, str]]:
    """Tensor name -> (file, name) of a sharded or single-file model."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        mapping = json.loads(index.read_text())["weight_map"]
        return {n: (folder / f, n) for n, f in mapping.items()}
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {n: (folder / "model.safetensors", n) for n in handle.keys()}  # noqa: SIM118


def read(where: tuple[Path, str]) -> torch.Tensor:
    with safe_open(str(where[0]), "pt") as handle:
        return handle.get_tensor(where[1]).double()


def adapter_errors(adapter: Path, tuned: Path, base: Path) -> dict[str, float]:
    """Per module the relative error of the adapter's update against TUNED - BASE."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    files = sorted(adapter.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            tensors.update({k: handle.get_tensor(k).double() for k in handle.keys()})  # noqa: SIM118
    tuned_w, base_w = weights(tuned), weights(base)
    errors = {}
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = tensors[key.replace("lora_A", "lora_B")]
        r = config.get("rank_pattern", {}).get(module, config["r"])
        alpha = config.get("alpha_pattern", {}).get(module, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        name = f"{module}.weight"
        delta = read(tuned_w[name]) - read(base_w[name])
        errors[module] = float((delta - scale * b @ a).norm() / delta.norm())
    return errors


def optimal_errors(tuned: Path, base: Path, rank: int) -> dict[str, float]:
    """Eckart-Young per LoRA-shaped layer matrix: the least relative error at `rank`."""
    tuned_w, base_w = weights(tuned), weights(base)
    out = {}
    for name, where in tuned_w.items():
        if ".layers." not in name or not name.endswith("proj.weight"):
            continue
        values = torch.linalg.svdvals(read(where) - read(base_w[name]))
        out[name.removesuffix(".weight")] = float(
            values[rank:].square().sum().sqrt() / values.square().sum().sqrt()
        )
    return out


def main() -> None:
    """Run, score, print a table row per tool."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="0.5b")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--mergekit", help="path of mergekit-extract-lora")
    parser.add_argument("--work", type=Path, default=HERE / "_work")
    args = parser.parse_args()
    family = ensure_family(args.size, args.work / args.size)
    tuned, base = family / "ft1", family / "base"
    ours, theirs = family / "extract-mergecli", family / "extract-mergekit"
    commands = {
        "mergecli": [sys.executable, "-m", "mergecli", "extract-lora", str(tuned), "--base", str(base),
                     "-o", str(ours), "--rank", str(args.rank), "--overwrite", "--quiet", "--json"],
    }  # fmt: skip
    if args.mergekit:
        commands["mergekit"] = [args.mergekit, "--model", str(tuned), "--base-model", str(base),
                                "--out-path", str(theirs), "--max-rank", str(args.rank)]  # fmt: skip
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in commands}
    for _ in range(args.repeat):
        for key, command in commands.items():
            shutil.rmtree(theirs, ignore_errors=True)
            runs[key].append(timed(command))
    optimal = optimal_errors(tuned, base, args.rank)
    print("| tool | wall s | peak RSS | mean error / optimum | worst error / optimum | modules |")
    print("|---|---|---|---|---|---|")
    for key, folder in (("mergecli", ours), ("mergekit", theirs)):
        if key not in runs:
            continue
        wall = statistics.median(w for w, _ in runs[key])
        rss = max(r for _, r in runs[key])
        errors = adapter_errors(folder, tuned, base)
        ratios = [errors[m] / optimal[m] for m in errors if m in optimal and optimal[m] > 0]
        print(
            f"| {key} | {wall:.1f} | {rss / 1e9:.2f} GB | {statistics.mean(ratios):.4f} "
            f"| {max(ratios):.4f} | {len(errors)} |"
        )


if __name__ == "__main__":
    main()
