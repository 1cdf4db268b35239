"""Run the same recipes through mergecli and mergekit 0.1.5 and compare every tensor.

    python benchmarks/parity.py --mergekit /path/to/venv/bin/mergekit-yaml [--only ties ...]

mergekit is never a dependency: install it in a virtual environment of its own
(`python -m venv --system-site-packages V && V/bin/pip install mergekit==0.1.5`) and name
its `mergekit-yaml`. The family is built here: four float32 Llamas (a base and three
fine-tunes, dense task vectors) and a T5 v1.1 with two fine-tunes (for `modules:`), from
`transformers` configs. Parity is defined as in
issue #13: with float32 inputs and `dtype: float32` both tools compute in float32, and a
tensor agrees when it is equal within float32 rounding (|a - b| <= 1e-5 |b| + 1e-6).
Random methods (DARE, DELLA) draw differently by design: they are compared entry by entry
at density 1, where no entry is dropped, and by statistics below it (`stat-*`: the share of
entries kept and the rescale of kept ones, per decile of magnitude rank, within 5 standard
errors). Prints one markdown row per recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def make_family(root: Path) -> dict[str, Path]:
    """Base and three fine-tunes of a 4-layer float32 Llama (hidden 64), saved like the Hub."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    out = {"base": root / "base"}
    base.save_pretrained(out["base"])
    for i in (1, 2, 3):
        model = LlamaForCausalLM(config).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in model.parameters():
                param.add_(
                    torch.randn_like(param) * 0.01 * i + torch.randn_like(param).sign() * 1e-3
                )
        out[f"ft{i}"] = root / f"ft{i}"
        model.save_pretrained(out[f"ft{i}"])
    return out


def _tokenizer(tokens: list[str]) -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def add_tokenizers(f: dict[str, Path]) -> dict[str, Path]:
    """Give the Llama family tokenizers (128 tokens) and add `ft2-vocab`: ft2 with two more
    tokens (rows appended to its embedding and head), for the tokenizer recipes."""
    from safetensors.torch import load_file, save_file

    tokens = ["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(125)]]
    for name in ("base", "ft1", "ft2", "ft3"):
        _tokenizer(tokens).save_pretrained(f[name])  # type: ignore[attr-defined]
    wide = f["ft2"].with_name("ft2-vocab")
    shutil.copytree(f["ft2"], wide)
    state = load_file(wide / "model.safetensors")
    g = torch.Generator().manual_seed(9)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], torch.randn(2, state[name].shape[1], generator=g)])
    save_file(state, str(wide / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((wide / "config.json").read_text())
    config["vocab_size"] = 130
    (wide / "config.json").write_text(json.dumps(config))
    _tokenizer([*tokens, "zz_new", "zz_other"]).save_pretrained(wide)  # type: ignore[attr-defined]
    return {"ft2-vocab": wide}


def tokenizer_recipes(f: dict[str, Path]) -> dict[str, str]:
    """Tokenizer blocks: the base's vocabulary, the union with added tokens, a token's row
    taken from a chosen model, and padding to a multiple."""
    base, a, wide = f["base"], f["ft1"], f["ft2-vocab"]
    models = f"models:\n  - model: {a}\n    parameters: {{weight: 0.4}}\n  - model: {wide}\n    parameters: {{weight: 0.6}}\n"
    head = f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\n"
    return {
        "tokenizer-base": f"{head}tokenizer_source: base\n{models}",
        "tokenizer-union": f"{head}tokenizer_source: union\n{models}",
        "tokenizer-block-tokens": f"{head}tokenizer:\n  source: union\n  tokens:\n"
        f"    zz_new:\n      source: {wide}\n    w7:\n      source:\n        kind: model_token\n"
        f"        model: {a}\n        token: w9\n      force: true\n{models}",
        "tokenizer-pad": f"{head}tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n{models}",
    }


def make_t5(root: Path) -> dict[str, Path]:
    """Base and two fine-tunes of a T5 v1.1 (gated-gelu, 3 encoder and 2 decoder blocks),
    for the multi-module form (`modules:` encoder / decoder / shared)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=3,
        num_decoder_layers=2,
        num_heads=4,
        tie_word_embeddings=False,
        feed_forward_proj="gated-gelu",
    )
    torch.manual_seed(1)
    base = T5ForConditionalGeneration(config).eval()
    out = {"t5": root / "t5-base"}
    base.save_pretrained(out["t5"])
    for i in (1, 2):
        model = T5ForConditionalGeneration(config).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.01 * i)
        out[f"t5-ft{i}"] = root / f"t5-ft{i}"
        model.save_pretrained(out[f"t5-ft{i}"])
    return out


def make_bare(root: Path) -> dict[str, Path]:
    """Three config-less `.safetensors` files whose tensor names overlap in part, for
    mergekit-pytorch's `-i`/`-u` (mergecli's `tensor_names: intersection | union`)."""
    from safetensors.torch import save_file

    names = {
        "x": ["a.weight", "shared.weight", "layers.0.w", "layers.1.w"],
        "y": ["b.weight", "shared.weight", "layers.0.w"],
        "z": ["a.weight", "b.weight", "shared.weight", "layers.0.w", "layers.1.w"],
    }
    g = torch.Generator().manual_seed(2)
    out = {}
    for model, held in names.items():
        out[f"bare-{model}"] = root / f"{model}.safetensors"
        save_file({n: torch.randn(16, 8, generator=g) for n in held}, str(out[f"bare-{model}"]))
    return out


def raw_recipes(f: dict[str, Path]) -> dict[str, str]:
    """Name-for-name merges of config-less files (run through mergekit-pytorch with -i/-u)."""
    out = {}
    for mode in ("intersection", "union"):
        models = "".join(
            f"  - model: {f[f'bare-{m}']}\n    parameters: {{weight: {w}}}\n"
            for m, w in (("x", 0.3), ("y", 0.7), ("z", 0.5))
        )
        out[f"raw-{mode}"] = (
            f"merge_method: linear\ndtype: float32\ntensor_names: {mode}\nmodels:\n{models}"
        )
    return out


def module_recipes(f: dict[str, Path]) -> dict[str, str]:
    """The multi-module form: per-module models, parameters and gradients (T5), and the
    single `default` module of a decoder-only model."""
    t5, t1, t2 = f["t5"], f["t5-ft1"], f["t5-ft2"]
    a, b = f["ft1"], f["ft2"]
    return {
        "modules-t5": (
            f"merge_method: task_arithmetic\nbase_model: {t5}\ndtype: float32\nmodules:\n"
            f"  encoder:\n    parameters: {{weight: 0.2}}\n    models:\n      - model: {t1}\n"
            f"      - model: {t2}\n        parameters: {{weight: 0.7}}\n"
            f"  decoder:\n    models:\n      - model: {t1}\n        parameters: {{weight: [0.0, 1.0]}}\n"
            f"      - model: {t2}\n        parameters: {{weight: 0.5}}\n"
            f"  shared:\n    models:\n      - model: {t1}\n        parameters: {{weight: 0.3}}\n"
            f"      - model: {t2}\n        parameters: {{weight: 0.3}}\n"
        ),
        "modules-t5-ties": (
            f"merge_method: ties\nbase_model: {t5}\ndtype: float32\n"
            "parameters: {weight: 0.5, density: 0.6}\nmodules:\n"
            f"  encoder:\n    models: [{{model: {t1}}}, {{model: {t2}}}]\n"
            f"  decoder:\n    parameters: {{density: 0.3}}\n    models: [{{model: {t1}}}, {{model: {t2}}}]\n"
            f"  shared:\n    models: [{{model: {t1}}}, {{model: {t2}}}]\n"
        ),
        "modules-default-slices": (
            "merge_method: linear\ndtype: float32\nmodules:\n  default:\n"
            "    parameters: {weight: 0.5}\n    slices:\n      - sources:\n"
            f"          - model: {a}\n            layer_range: [0, 3]\n"
            f"          - model: {b}\n            layer_range: [1, 4]\n"
            "            parameters: {weight: [1.0, 0.0]}\n"
        ),
    }


def recipes(f: dict[str, Path]) -> dict[str, str]:
    """Recipe text per case: every method and the recipe forms both tools share."""
    base, a, b, c = f["base"], f["ft1"], f["ft2"], f["ft3"]
    head = "dtype: float32\n"

    def models(params: list[str]) -> str:
        return "".join(
            f"  - model: {m}\n    parameters: {{{p}}}\n" for m, p in zip((a, b, c), params)
        )

    three = models(
        ["weight: 0.5, density: 0.5", "weight: 0.3, density: 0.7", "weight: 0.2, density: 0.3"]
    )
    dense = models(
        ["weight: 0.5, density: 1.0", "weight: 0.3, density: 1.0", "weight: 0.2, density: 1.0"]
    )
    weights = models(["weight: 0.5", "weight: 0.3", "weight: 0.2"])
    plain = "".join(f"  - model: {m}\n" for m in (a, b, c))
    two = f"  - model: {a}\n  - model: {b}\n"
    return {
        "linear": f"merge_method: linear\n{head}models:\n{weights}",
        "linear-base": f"merge_method: linear\nbase_model: {base}\n{head}parameters: {{weight: 0.25}}\nmodels:\n{weights}",
        "karcher-base": f"merge_method: karcher\nbase_model: {base}\n{head}models:\n{two}",
        "linear-normalize-false": f"merge_method: linear\n{head}parameters: {{normalize: false}}\nmodels:\n{weights}",
        "linear-gradient": f"merge_method: linear\n{head}models:\n  - model: {a}\n    parameters: {{weight: [0.0, 0.5, 1.0]}}\n  - model: {b}\n    parameters: {{weight: [1.0, 0.5, 0.0]}}\n",
        "linear-filters": f"merge_method: linear\n{head}models:\n  - model: {a}\n    parameters:\n      weight:\n        - filter: self_attn\n          value: 0.9\n        - value: 0.2\n  - model: {b}\n    parameters: {{weight: 0.5}}\n",
        "task_arithmetic": f"merge_method: task_arithmetic\nbase_model: {base}\n{head}models:\n{weights}",
        "task_arithmetic-lambda": f"merge_method: task_arithmetic\nbase_model: {base}\n{head}parameters: {{lambda: 0.7, normalize: true}}\nmodels:\n{weights}",
        "ties": f"merge_method: ties\nbase_model: {base}\n{head}models:\n{three}",
        "ties-normalize-false": f"merge_method: ties\nbase_model: {base}\n{head}parameters: {{normalize: false}}\nmodels:\n{three}",
        "breadcrumbs": f"merge_method: breadcrumbs\nbase_model: {base}\n{head}parameters: {{gamma: 0.05}}\nmodels:\n{three}",
        "breadcrumbs_ties": f"merge_method: breadcrumbs_ties\nbase_model: {base}\n{head}parameters: {{gamma: 0.05}}\nmodels:\n{three}",
        "dare_linear-density1": f"merge_method: dare_linear\nbase_model: {base}\n{head}models:\n{dense}",
        "dare_ties-density1": f"merge_method: dare_ties\nbase_model: {base}\n{head}models:\n{dense}",
        "della-density1": f"merge_method: della\nbase_model: {base}\n{head}parameters: {{epsilon: 0.0}}\nmodels:\n{dense}",
        "slerp": f"merge_method: slerp\nbase_model: {a}\n{head}parameters: {{t: 0.3}}\nmodels:\n{two}",
        "slerp-gradient": f"merge_method: slerp\nbase_model: {a}\n{head}parameters: {{t: [0.0, 0.5, 1.0]}}\nmodels:\n{two}",
        "nuslerp": f"merge_method: nuslerp\n{head}models:\n  - model: {a}\n    parameters: {{weight: 0.4}}\n  - model: {b}\n    parameters: {{weight: 0.6}}\n",
        "multislerp": f"merge_method: multislerp\n{head}models:\n{weights}",
        "multislerp-base": f"merge_method: multislerp\nbase_model: {base}\n{head}models:\n{weights}",
        "nuslerp-rows": f"merge_method: nuslerp\nbase_model: {base}\n{head}parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.4}}\n  - model: {b}\n    parameters: {{weight: 0.6}}\n",
        "nuslerp-columns": f"merge_method: nuslerp\n{head}parameters: {{nuslerp_flatten: false}}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.4}}\n  - model: {b}\n    parameters: {{weight: 0.6}}\n",
        "model_stock-filter_wise": f"merge_method: model_stock\nbase_model: {base}\n{head}parameters: {{filter_wise: true}}\nmodels:\n{plain}",
        "karcher": f"merge_method: karcher\n{head}models:\n{plain}",
        "model_stock": f"merge_method: model_stock\nbase_model: {base}\n{head}models:\n{plain}",
        "sce": f"merge_method: sce\nbase_model: {base}\n{head}parameters: {{select_topk: 0.5}}\nmodels:\n{plain}",
        "nearswap": f"merge_method: nearswap\nbase_model: {a}\n{head}parameters: {{t: 0.001}}\nmodels:\n{two}",
        "ram": f"merge_method: ram\nbase_model: {base}\n{head}models:\n{plain}",
        "ram-epsilon": f"merge_method: ram\nbase_model: {base}\n{head}parameters: {{epsilon: 0.01}}\nmodels:\n{plain}",
        "ramplus_tl": f"merge_method: ramplus_tl\nbase_model: {base}\n{head}parameters: {{epsilon: 0.01, r: 0.5, alpha: 0.3}}\nmodels:\n{plain}",
        "arcee_fusion": f"merge_method: arcee_fusion\nbase_model: {a}\n{head}models:\n{two}",
        "passthrough-slices": f"merge_method: passthrough\n{head}slices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n  - sources:\n      - model: {b}\n        layer_range: [1, 4]\n",
        **module_recipes(f),
        **raw_recipes(f),
        **stat_recipes(f),
        **tokenizer_recipes(f),
        "slices-linear": f"merge_method: linear\n{head}slices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n        parameters: {{weight: 0.7}}\n      - model: {b}\n        layer_range: [0, 2]\n        parameters: {{weight: 0.3}}\n  - sources:\n      - model: {b}\n        layer_range: [2, 4]\n        parameters: {{weight: 1.0}}\n      - model: {c}\n        layer_range: [2, 4]\n        parameters: {{weight: 1.0}}\n",
    }


def stat_recipes(f: dict[str, Path]) -> dict[str, str]:
    """Random methods below density 1, one fine-tune at weight 1 (so `merged - base` is the
    pruned, rescaled task vector): compared by statistics, not entry by entry."""
    base, a = f["base"], f["ft1"]
    one = f"  - model: {a}\n    parameters: {{weight: 1.0, density: {{d}}}}\n"
    return {
        "stat-dare_linear": f"merge_method: dare_linear\nbase_model: {base}\ndtype: float32\n"
        f"models:\n{one.replace('{d}', '0.3')}",
        "stat-della_linear": f"merge_method: della_linear\nbase_model: {base}\ndtype: float32\n"
        f"parameters: {{epsilon: 0.15}}\nmodels:\n{one.replace('{d}', '0.4')}",
        "stat-dare_ties": f"merge_method: dare_ties\nbase_model: {base}\ndtype: float32\n"
        f"models:\n{one.replace('{d}', '0.5')}",
        "stat-della": f"merge_method: della\nbase_model: {base}\ndtype: float32\n"
        f"parameters: {{epsilon: 0.1}}\nmodels:\n{one.replace('{d}', '0.6')}",
    }


def _layer_matrices(merged: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, t in merged.items() if t.dim() == 2 and ".layers." in n]


def kept_by_decile(
    merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]
) -> list[tuple[int, int]]:
    """Per decile of |delta| rank within its row (DELLA's ranking), pooled over the 2-D layer
    tensors: (entries, entries kept)."""
    counts = [[0, 0] for _ in range(10)]
    for name in _layer_matrices(merged):
        delta = (tuned[name] - base[name]).double()
        kept = merged[name].double() != base[name].double()
        ranks = delta.abs().argsort(dim=1).argsort(dim=1).double() / (delta.shape[1] - 1)
        decile = (ranks * 10).clamp(max=9).long()
        for d in range(10):
            counts[d][0] += int((decile == d).sum())
            counts[d][1] += int(((decile == d) & kept).sum())
    return [(n, k) for n, k in counts]


def l1_ratios(
    merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Per layer tensor: |merged - base|_1 / |delta|_1 (1 when the rescale keeps the L1 norm)."""
    return torch.tensor(
        [
            float((merged[n].double() - base[n].double()).abs().sum())
            / float((tuned[n].double() - base[n].double()).abs().sum())
            for n in _layer_matrices(merged)
        ]
    )


def stat_compare(
    ours: dict[str, torch.Tensor],
    theirs: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    tuned: dict[str, torch.Tensor],
) -> tuple[bool, str]:
    """Both tools keep the same share of each rank decile (two-proportion z within 5) and
    rescale every tensor to the same L1 norm (within 1e-6)."""
    worst = 0.0
    for (n, k1), (_, k2) in zip(
        kept_by_decile(ours, base, tuned), kept_by_decile(theirs, base, tuned)
    ):
        p = (k1 + k2) / (2 * n)
        worst = max(worst, abs(k1 - k2) / n / max((2 * p * (1 - p) / n) ** 0.5, 1e-12))
    norm = float((l1_ratios(ours, base, tuned) - l1_ratios(theirs, base, tuned)).abs().max())
    detail = f"kept share per rank decile: largest z {worst:.2f}; L1 rescale differs by {norm:.1e}"
    return worst <= 5 and norm <= 1e-6, detail


def token_ids(folder: Path) -> dict[str, int]:
    """Token -> id of an output's tokenizer (model vocabulary and added tokens)."""
    data = json.loads((folder / "tokenizer.json").read_text())
    ids = dict(data["model"]["vocab"])
    ids.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return ids


def align_vocab(
    ours: Path, theirs: Path, merged: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """mergekit's tensors with per-token rows moved to mergecli's token ids: mergekit numbers
    a union's added tokens in Python set order, which changes from run to run."""
    mine, kit = token_ids(ours), token_ids(theirs)
    if mine.keys() != kit.keys():
        return merged
    order = torch.arange(max(mine.values()) + 1)
    for token, i in mine.items():
        order[i] = kit[token]
    out = dict(merged)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in out:
            rows = out[name].clone()
            rows[: len(order)] = out[name][order]
            out[name] = rows
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def compare(
    ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]
) -> tuple[int, int, float, str]:
    """(tensors agreeing, tensors compared, largest relative error, first disagreeing name)."""
    names = sorted(set(ours) | set(theirs))
    agree, worst, first = 0, 0.0, ""
    for name in names:
        if name not in ours or name not in theirs or ours[name].shape != theirs[name].shape:
            first = first or f"{name} (missing or shape)"
            continue
        a, b = ours[name].double(), theirs[name].double()
        error = float(((a - b).abs() / (b.abs() * 1e-5 + 1e-6)).max()) if a.numel() else 0.0
        worst = max(worst, float(((a - b).abs() / (b.abs() + 1e-6)).max()) if a.numel() else 0.0)
        if error <= 1:
            agree += 1
        else:
            first = first or name
    return agree, len(names), worst, first


def main() -> None:
    """Build the family, run every recipe through both tools, print the agreement table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mergekit", required=True, help="path of mergekit-yaml")
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        llama = make_family(root / "family")
        family = {
            **llama,
            **add_tokenizers(llama),
            **make_t5(root / "family"),
            **make_bare(root / "family"),
        }
        print(
            "| recipe | tensors agreeing | largest relative difference | first differing |\n|---|---|---|---|"
        )
        total = agreeing = 0
        for name, text in recipes(family).items():
            if args.only and name not in args.only:
                continue
            recipe = root / f"{name}.yaml"
            recipe.write_text(text)
            ours, theirs = root / f"ours-{name}", root / f"theirs-{name}"
            mine = subprocess.run(
                [sys.executable, "-m", "mergecli", "run", str(recipe), "-o", str(ours), "--quiet"],
                capture_output=True,
                text=True,
                env=env,
            )
            tool = [args.mergekit]
            if name.startswith("raw-"):  # mergekit-pytorch, beside mergekit-yaml
                flag = "-u" if name.endswith("union") else "-i"
                tool = [str(Path(args.mergekit).with_name("mergekit-pytorch")), flag]
            kit = subprocess.run(
                [*tool, str(recipe), str(theirs)], capture_output=True, text=True, env=env
            )
            if mine.returncode or kit.returncode:
                failed = "mergecli" if mine.returncode else "mergekit"
                output = (mine.stderr if mine.returncode else kit.stderr).strip().splitlines()
                print(f"| {name} | {failed} failed | - | {(output or [''])[-1][:80]} |", flush=True)
                total += 1
                continue
            if name.startswith("stat-"):
                family_base = tensors(family["base"])
                ok, detail = stat_compare(
                    tensors(ours), tensors(theirs), family_base, tensors(family["ft1"])
                )
                total += 1
                agreeing += ok
                print(f"| {name} | {'statistically equal' if ok else 'differ'} | {detail} | - |")
                continue
            theirs_tensors = tensors(theirs)
            if name.startswith("tokenizer-"):
                theirs_tensors = align_vocab(ours, theirs, theirs_tensors)
            good, count, worst, first = compare(tensors(ours), theirs_tensors)
            total += 1
            agreeing += good == count
            print(f"| {name} | {good}/{count} | {worst:.2e} | {first or '-'} |", flush=True)
        print(f"\n{agreeing} of {total} recipes agree on every tensor")


if __name__ == "__main__":
    main()
