"""`mergecli extract-lora`: a PEFT LoRA adapter from a fine-tune and its base."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mergecli import __version__
from mergecli.cli._console import STDERR, stdout_console
from mergecli.cli._options import JsonOpt, OutOpt, OverwriteOpt, QuietOpt
from mergecli.errors import UsageError
from mergecli.io.checkpoint import ModelInfo
from mergecli.io.dtypes import CODE_TO_TORCH, NAME_TO_CODE
from mergecli.io.source import LocalSource
from mergecli.lora.extract import Extracted, Options, adapter_config, extract, nothing_changed
from mergecli.lora.factor import Solver
from mergecli.lora.write import AppendingSafetensors, write_config
from mergecli.output import folder as output
from mergecli.output.manifest import hash_files
from mergecli.output.side_files import write_json
from mergecli.plan.adapters import model_resolver
from mergecli.plan.inputs import read_model
from mergecli.recipe.schema import ModelRef, parse_model_ref

EXAMPLES = """
Examples:

  mergecli extract-lora org/tuned --base org/base -o tuned-lora --rank 64

  mergecli extract-lora ./tuned --base ./base -o out --energy 0.99 --exclude mlp
"""


def extract_lora(
    tuned: Annotated[
        str,
        typer.Argument(
            help="The fine-tune: a folder or Hub id (org/name@revision).", show_default=False
        ),
    ],
    base: Annotated[
        str, typer.Option("--base", help="The model TUNED was tuned from.", show_default=False)
    ],
    out: OutOpt,
    rank: Annotated[
        int | None, typer.Option("--rank", min=1, help="LoRA rank of every module.")
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy",
            help="Per module, the smallest rank keeping this fraction of the delta's squared "
            "singular values (0 < E <= 1), instead of --rank.",
        ),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option("--include", help="Only modules matching this regex (repeatable)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Leave out modules matching this regex (repeatable)."),
    ] = None,
    embeddings: Annotated[
        bool, typer.Option("--embeddings", help="Extract embeddings as LoRA too.")
    ] = False,
    lm_head: Annotated[
        bool, typer.Option("--lm-head", help="Extract the LM head as LoRA too.")
    ] = False,
    svd: Annotated[
        str, typer.Option("--svd", help="auto, exact (Gram eigen-decomposition) or randomized.")
    ] = "auto",
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="dtype of the adapter (default: TUNED's).")
    ] = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Extract a LoRA adapter: each changed weight's delta (TUNED - BASE) factored by
    truncated SVD, streamed one tensor at a time; changed norms and biases go whole to
    `modules_to_save`. Writes `adapter_config.json`, `adapter_model.safetensors` and a card
    that `peft.PeftModel.from_pretrained(BASE, OUT)` loads, and prints per module its rank
    and relative Frobenius error.
    """
    options = _options(rank, energy, include or [], exclude or [], embeddings, lm_head, svd, dtype)
    resolve = model_resolver(Path.cwd())
    base_ref, tuned_ref = _ref(base), _ref(tuned)
    base_model, _ = read_model(resolve, base_ref)
    tuned_model, _ = read_model(resolve, tuned_ref)
    roots = [m.source.root for m in (base_model, tuned_model) if isinstance(m.source, LocalSource)]
    output.check_output(out, overwrite, roots)
    started = time.monotonic()
    work = output.start(out)
    try:
        report = _write(work.path, tuned_model, base_model, base_ref, options, quiet)
        output.finish(work, out, overwrite)
    except BaseException:
        output.discard(work)
        raise
    _show(report, out, time.monotonic() - started, as_json)


extract_lora.__doc__ = (extract_lora.__doc__ or "") + EXAMPLES


def _ref(text: str) -> ModelRef:
    return ModelRef(**parse_model_ref(text))


def _options(
    rank: int | None,
    energy: float | None,
    include: list[str],
    exclude: list[str],
    embeddings: bool,
    lm_head: bool,
    svd: str,
    dtype: str | None,
) -> Options:
    if (rank is None) == (energy is None):
        raise UsageError(
            "give exactly one of --rank and --energy", hint="e.g. --rank 64 or --energy 0.99"
        )
    if energy is not None and not 0 < energy <= 1:
        raise UsageError(
            f"--energy {energy} is out of range", hint="a fraction in (0, 1], e.g. 0.99"
        )
    if svd not in ("auto", "exact", "randomized"):
        raise UsageError(f"--svd {svd!r} is not a solver", hint="auto, exact or randomized")
    if svd == "randomized" and rank is None:
        raise UsageError("--svd randomized needs --rank", hint="--energy needs the exact spectrum")
    for pattern in (*include, *exclude):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"module pattern {pattern!r} is not a valid regex ({exc})") from None
    code = NAME_TO_CODE.get((dtype or "").lower().removeprefix("torch.")) if dtype else None
    if dtype and code is None:
        raise UsageError(f"--dtype {dtype!r} is not a dtype", hint="float32, bfloat16 or float16")
    chosen: Solver = svd  # type: ignore[assignment]
    return Options(
        rank, energy, tuple(include), tuple(exclude), embeddings, lm_head, chosen,
        CODE_TO_TORCH[code] if code else None,
    )  # fmt: skip


def _write(
    folder: Path,
    tuned: ModelInfo,
    base: ModelInfo,
    base_ref: ModelRef,
    options: Options,
    quiet: bool,
) -> Extracted:
    weights = AppendingSafetensors(folder / "adapter_model.safetensors")
    with STDERR.status("extracting", spinner="dots") if not quiet else _Nothing() as status:
        report = extract(
            tuned,
            base,
            options,
            weights,
            lambda m: status.update(f"extracting {m}") if status else None,
        )
    weights.close()
    if not report.rows:
        raise nothing_changed(tuned, base)
    write_config(folder, adapter_config(report, options, base_ref.path, base_ref.revision))
    (folder / "README.md").write_text(_card(report, tuned, base_ref, options))
    write_json(
        folder / output.MANIFEST,
        {
            "tool": "mergecli",
            "version": __version__,
            "command": "extract-lora",
            "inputs": [
                {"model": base.label, "commit": base.source.commit},
                {"model": tuned.label, "commit": tuned.source.commit},
            ],
            "outputs": hash_files(folder, {}),
        },
    )
    return report


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def _card(report: Extracted, tuned: ModelInfo, base: ModelRef, options: Options) -> str:
    how = f"rank {options.rank}" if options.rank else f"energy {options.energy}"
    rows = "\n".join(
        f"| `{r.module}` | {r.action} | {r.rank if r.rank is not None else ''} | "
        f"{'' if r.error is None else f'{r.error:.4f}'} | {r.note} |"
        for r in report.rows
    )
    return (
        f"---\nbase_model: {base.path}\nlibrary_name: peft\ntags:\n- mergecli\n- lora\n- extract-lora\n---\n\n"
        f"# LoRA adapter extracted from {tuned.label}\n\n"
        f"Made with `mergecli extract-lora` ({how}): the difference between `{tuned.label}` and "
        f"`{base}` factored by truncated SVD, module by module.\n\n"
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base.path}"), "path/to/this/folder")\n```\n\n'
        "| module | saved as | rank | relative error | note |\n|---|---|---|---|---|\n"
        f"{rows}\n\n{report.unchanged} modules unchanged (left out).\n"
    )


def _report_data(report: Extracted, out: Path, seconds: float) -> dict[str, Any]:
    return {
        "output": str(out),
        "seconds": round(seconds, 3),
        "unchanged_modules": report.unchanged,
        "modules": [
            {
                "module": r.module,
                "shape": list(r.shape),
                "action": r.action,
                "rank": r.rank,
                "relative_error": r.error,
                "note": r.note,
            }
            for r in report.rows
        ],
    }


def _show(report: Extracted, out: Path, seconds: float, as_json: bool) -> None:
    data = _report_data(report, out, seconds)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(
        "module", "shape", "saved as", "rank", "rel. error", "note", title=f"extract-lora -> {out}"
    )
    for r in report.rows:
        table.add_row(
            r.module, "x".join(map(str, r.shape)), r.action,
            "" if r.rank is None else str(r.rank),
            "" if r.error is None else f"{r.error:.4f}", r.note,
        )  # fmt: skip
    console = stdout_console()
    console.print(table)
    lora = report.targets
    console.print(
        f"{len(lora)} modules as LoRA, {sum(r.action == 'modules_to_save' for r in report.rows)} in "
        f"modules_to_save, {sum(r.action == 'left out' for r in report.rows)} changed but left out, "
        f"{report.unchanged} unchanged; wrote {out} in {seconds:.1f} s"
    )
