"""The I/O floor of a merge: read every input tensor once, write one model's bytes.

python benchmarks/io_floor.py OUT_FILE MODEL_DIR [MODEL_DIR ...] [--extra ADAPTER_DIR ...]

Folders after `--extra` (LoRA adapters) have every tensor of their `.safetensors` files
read once too; nothing of theirs is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors import safe_open

from mergecli.io.writer import ShardWriter
from mergecli.plan.types import TensorPlan


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file of a sharded model."""
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]  # type: ignore[no-any-return]


def main() -> None:
    """Stream: for each tensor, read it from every model; write the first model's copy."""
    args = sys.argv[2:]
    extra = args[args.index("--extra") + 1 :] if "--extra" in args else []
    args = args[: args.index("--extra")] if "--extra" in args else args
    out, folders = Path(sys.argv[1]), [Path(p) for p in args]
    for folder in map(Path, extra):
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no iteration)
                    handle.get_tensor(name)
    maps = [weight_map(f) for f in folders]
    handles = [
        {file: safe_open(str(f / file), "pt") for file in set(m.values())}
        for f, m in zip(folders, maps)
    ]
    names = list(maps[0])
    first = handles[0]
    plans = []
    for name in names:
        view = first[maps[0][name]].get_slice(name)
        plans.append(
            TensorPlan(
                name,
                tuple(view.get_shape()),
                view.get_dtype(),
                "layer",
                None,
                0.0,
                (),
                None,
                {},
                (),
                True,
            )
        )
    writer = ShardWriter(out.parent, (out.name,), plans, digest=False)
    writer.open()
    for name in names:
        tensors = [h[m[name]].get_tensor(name) for h, m in zip(handles, maps)]
        writer.write(name, tensors[0])
    writer.close()


if __name__ == "__main__":
    main()
