"""Vocabularies: union, base and model tokenizer sources and the `tokenizer:` block, with two
byte-level BPE tokenizers trained offline on different texts (their vocabularies overlap
partly), checked row by row against float64 math."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from typer.testing import CliRunner

from conftest import invoke, llama_config, save_model, write

ENGLISH = [
    "the quick brown fox jumps over the lazy dog",
    "a merge of models keeps the best of each one",
    "tokenizers split text into pieces that models read",
] * 20
CODE = [
    "def merge(models): return sum(models) / len(models)",
    "for layer in range(depth): print(layer, weights[layer])",
    "import torch; x = torch.zeros(3, 4); y = x + 1",
] * 20
TEXTS = ["the lazy dog reads code", "def f(x): return x + 1  # models", "zebra quiz!"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def train(corpus: list[str], size: int, specials: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus` (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token=None
    )


def save(folder: Path, tokenizer: PreTrainedTokenizerFast, seed: int) -> Path:
    config = llama_config(vocab=len(tokenizer))
    save_model(folder, config, seed)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, a: English BPE; b: code BPE with one extra special token."""
    root = tmp_path_factory.mktemp("vocab")
    english = train(ENGLISH, 300, ["<s>", "</s>"])
    code = train(CODE, 320, ["<s>", "</s>", "<|tool|>"])
    out = {
        "base": save(root / "base", english, 21),
        "a": save(root / "a", english, 22),
        "b": save(root / "b", code, 23),
    }
    config_path = out["a"] / "tokenizer_config.json"  # as transformers 4 wrote it
    config = json.loads(config_path.read_text())
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    config["added_tokens_decoder"] = {
        "0": {"content": "<s>", **flags},
        "1": {"content": "</s>", **flags},
    }
    config_path.write_text(json.dumps(config))
    return out


def vocab_of(folder: Path) -> dict[str, int]:
    return dict(
        Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
    )


def state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def run(runner: CliRunner, tmp_path: Path, text: str) -> Path:
    out = tmp_path / "out"
    code, _, err = invoke(runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(out))
    assert code == 0, err
    return out


def rows_by_token(folder: Path, name: str) -> dict[str, torch.Tensor]:
    tensor = state(folder)[name].double()
    return {token: tensor[i] for token, i in vocab_of(folder).items()}


def test_fixture_vocabularies_overlap_partly(vocabs: dict[str, Path]) -> None:
    a, b = set(vocab_of(vocabs["a"])), set(vocab_of(vocabs["b"]))
    assert len(a & b) > 200 and len(a - b) > 10 and len(b - a) > 10


def test_union_keeps_base_ids_appends_new_tokens_and_merges_rows(
    vocabs: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    out = run(
        runner,
        tmp_path,
        "merge_method: linear\ntokenizer_source: union\nmodels:\n"
        f"  - model: {vocabs['a']}\n    parameters: {{weight: 0.4}}\n"
        f"  - model: {vocabs['b']}\n    parameters: {{weight: 0.6}}\n",
    )
    va, vb, vu = vocab_of(vocabs["a"]), vocab_of(vocabs["b"]), vocab_of(out)
    assert all(vu[t] == i for t, i in va.items())
    new = sorted((i, t) for t, i in vb.items() if t not in va)
    assert [vu[t] for _, t in new] == list(range(len(va), len(va) + len(new)))
    assert len(vu) == len(va) + len(new)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vu)
    for name in (EMBED, HEAD):
        ra, rb = rows_by_token(vocabs["a"], name), rows_by_token(vocabs["b"], name)
        merged = state(out)[name].double()
        assert merged.shape[0] == len(vu)
        for token, index in vu.items():
            if token in ra and token in rb:
                expected = 0.4 * ra[token] + 0.6 * rb[token]
            else:
                expected = ra[token] if token in ra else rb[token]
            assert (merged[index] - expected).abs().max() < 1e-6, (name, token)


def test_union_tokenizer_round_trips_and_loads(
    vocabs: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    out = run(
        runner,
        tmp_path,
        "merge_method: linear\ntokenizer_source: union\nmodels:\n"
        f"  - model: {vocabs['a']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {vocabs['b']}\n    parameters: {{weight: 0.5}}\n",
    )
    assert not (out / "vocab.json").exists() and not (out / "merges.txt").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    original = AutoTokenizer.from_pretrained(vocabs["a"])
    for text in [*TEXTS, *ENGLISH[:3], *CODE[:3]]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids("<|tool|>") == vocab_of(out)["<|tool|>"]
    assert tokenizer.encode("<|tool|>", add_special_tokens=False) == [vocab_of(out)["<|tool|>"]]
    english = ENGLISH[0]
    assert tokenizer.encode(english, add_special_tokens=False) == original.encode(
        english, add_special_tokens=False
    )
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"][str(vocab_of(out)["<|tool|>"])]["content"] == "<|tool|>"
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tokenizer.encode(CODE[0], add_special_tokens=False)])
    assert ids.max() >= len(vocab_of(vocabs["a"]))  # the code text uses tokens only b had
    with torch.no_grad():
        assert model(ids).logits.shape[-1] == len(vocab_of(out))


def test_base_source_fills_missing_rows_from_the_base(
    vocabs: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    out = run(
        runner,
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {vocabs['base']}\nmodels:\n"
        f"  - model: {vocabs['a']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {vocabs['b']}\n    parameters: {{weight: 0.5}}\n",
    )
    assert (out / "tokenizer.json").read_bytes() == (vocabs["base"] / "tokenizer.json").read_bytes()
    vbase = vocab_of(vocabs["base"])
    for name in (EMBED, HEAD):
        base, ra, rb = (rows_by_token(vocabs[k], name) for k in ("base", "a", "b"))
        merged = state(out)[name].double()
        assert merged.shape[0] == len(vbase)
        for token, index in vbase.items():
            b_row = rb.get(token, base[token])
            expected = base[token] + 0.5 * (ra[token] - base[token]) + 0.5 * (b_row - base[token])
            assert (merged[index] - expected).abs().max() < 1e-6, (name, token)


def test_model_source_takes_that_vocabulary(
    vocabs: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    out = run(
        runner,
        tmp_path,
        f"merge_method: linear\ntokenizer_source: {vocabs['b']}\nmodels:\n"
        f"  - model: {vocabs['a']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {vocabs['b']}\n    parameters: {{weight: 3.0}}\n",
    )
    assert (out / "tokenizer.json").read_bytes() == (vocabs["b"] / "tokenizer.json").read_bytes()
    vb = vocab_of(vocabs["b"])
    ra, rb = rows_by_token(vocabs["a"], EMBED), rows_by_token(vocabs["b"], EMBED)
    merged = state(out)[EMBED].double()
    for token, index in vb.items():
        expected = (ra[token] + 3.0 * rb[token]) / 4.0 if token in ra else rb[token]
        assert (merged[index] - expected).abs().max() < 1e-6, token


def test_tokenizer_block_sources_force_and_padding(
    vocabs: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    a, b = vocabs["a"], vocabs["b"]
    shared = next(t for t in vocab_of(a) if t in vocab_of(b) and t.startswith("Ġ"))
    out = run(
        runner,
        tmp_path,
        "merge_method: linear\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.5}}\n"
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n  tokens:\n"
        f"    '<|tool|>':\n      source: {{kind: model_token, model: {a}, token: '</s>'}}\n"
        f"    {json.dumps(shared)}:\n      source: {{kind: zero}}\n      force: true\n"
        f"    '</s>':\n      source: {{kind: model_token, model: {b}, token: '<s>'}}\n"
        "      force: true\n",
    )
    vu = vocab_of(out)
    rows = -(-len(vu) // 64) * 64
    merged = state(out)[EMBED].double()
    assert merged.shape[0] == rows and rows > len(vu)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    assert torch.equal(merged[vu[shared]], torch.zeros(merged.shape[1]).double())
    rb = rows_by_token(b, EMBED)
    ra = rows_by_token(a, EMBED)
    # padding rows: in each model the mean of its token rows as mergekit places them (forced
    # rows as forced, a's `</s>` lent for the `<|tool|>` it lacks, the other model's row for
    # a union token it lacks), then merged like any row
    zero = torch.zeros(merged.shape[1]).double()
    forced = {shared: zero, "</s>": rb["<s>"]}
    lent = {"<|tool|>": ra["</s>"]}

    def placed(
        tok: str, own: dict[str, torch.Tensor], other: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        if tok in forced:
            return forced[tok]
        if tok in own:
            return own[tok]
        return lent[tok] if tok in lent and own is ra else other[tok]

    means = [
        sum((placed(tok, own, other) for tok in vu), zero) / len(vu)
        for own, other in ((ra, rb), (rb, ra))
    ]
    padding = 0.5 * means[0] + 0.5 * means[1]
    assert (merged[len(vu) :] - padding).abs().max() < 1e-6
    assert (merged[vu["</s>"]] - rb["<s>"]).abs().max() < 1e-6
    # not forced: b keeps its own row; a lacks the token and lends its `</s>` row instead
    expected = 0.5 * ra["</s>"] + 0.5 * rb["<|tool|>"]
    assert "<|tool|>" not in ra and (merged[vu["<|tool|>"]] - expected).abs().max() < 1e-6
    untouched = next(t for t in vu if t in ra and t in rb and t not in (shared, "</s>"))
    assert (merged[vu[untouched]] - 0.5 * (ra[untouched] + rb[untouched])).abs().max() < 1e-6


def test_token_sources_are_checked_before_merging(
    vocabs: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    a, b = vocabs["a"], vocabs["b"]
    text = (
        "merge_method: linear\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.5}}\n"
        "tokenizer:\n  source: union\n  tokens:\n"
        f"    '<|tool|>':\n      source: {a}\n"
        "    'not-a-token':\n      source: {kind: zero}\n"
    )
    code, _, err = invoke(runner, "validate", str(write(tmp_path / "r.yaml", text)))
    assert code == 2, err
    assert (
        "tokenizer.tokens['<|tool|>']: " in err
        and "has no embedding row for token '<|tool|>'" in err
    )
    assert (
        "tokenizer.tokens['not-a-token']: token 'not-a-token' is not in the output vocabulary"
        in err
    )


def test_sentencepiece_only_model_is_refused_not_mixed(
    vocabs: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    sp = tmp_path / "sp"
    shutil.copytree(vocabs["b"], sp)
    (sp / "tokenizer.json").unlink()
    (sp / "tokenizer.model").write_bytes(b"\x0a\x05\x0a\x01a\x15\x00\x00\x00\x00")
    text = (
        "merge_method: linear\nmodels:\n"
        f"  - model: {vocabs['a']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {sp}\n    parameters: {{weight: 0.5}}\n"
    )
    code, _, err = invoke(
        runner, "run", str(write(tmp_path / "r.yaml", text)), "-o", str(tmp_path / "o")
    )
    assert code == 4, err
    assert (
        f"models[1].model: the vocabularies differ and {sp} has no tokenizer.json (found: tokenizer.model)"
        in err
    )
    assert "save_pretrained" in err
    assert not (tmp_path / "o").exists()


def plan_json(runner: CliRunner, tmp_path: Path, first: Path, second: Path) -> dict[str, Any]:
    text = (
        "merge_method: linear\ntokenizer_source: union\nmodels:\n"
        f"  - model: {first}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {second}\n    parameters: {{weight: 0.5}}\n"
    )
    code, out, err = invoke(runner, "plan", str(write(tmp_path / "r.yaml", text)), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def test_same_tokenizer_needs_no_reindexing(
    vocabs: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    same = plan_json(runner, tmp_path, vocabs["a"], vocabs["base"])
    assert same["vocabulary"] is None
    assert not any(t["rows_reindexed"] for t in same["tensors"])
    other = plan_json(runner, tmp_path, vocabs["a"], vocabs["b"])
    union = len(set(vocab_of(vocabs["a"])) | set(vocab_of(vocabs["b"])))
    assert other["vocabulary"] == {
        "tokens": union,
        "added_by_union": union - len(vocab_of(vocabs["a"])),
        "rows": union,
    }
    reindexed = {t["name"] for t in other["tensors"] if t["rows_reindexed"]}
    assert reindexed == {EMBED, HEAD}


def test_union_ties_runs_per_row_group_with_fallback_for_rows_without_base(
    vocabs: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    from mergecli import methods
    from mergecli.methods.spec import MergeArgs

    out = run(
        runner,
        tmp_path,
        f"merge_method: ties\nbase_model: {vocabs['base']}\ntokenizer_source: union\nmodels:\n"
        f"  - model: {vocabs['a']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {vocabs['b']}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
    )
    vu, va, vb = vocab_of(out), vocab_of(vocabs["a"]), vocab_of(vocabs["b"])
    base, ra, rb = (rows_by_token(vocabs[k], EMBED) for k in ("base", "a", "b"))
    merged = state(out)[EMBED].double()
    only_b = [t for t in vu if t not in va]
    for token in only_b:  # no base row: the mean of the rows present (b alone)
        assert torch.equal(merged[vu[token]], rb[token].float().double()), token
    both = sorted((t for t in vu if t in va and t in vb), key=lambda t: vu[t])
    only_a = sorted((t for t in vu if t in va and t not in vb), key=lambda t: vu[t])
    spec = methods.get("ties")
    assert spec is not None
    params = {p.name: p.default for p in spec.scoped("global")}
    full = MergeArgs(
        [torch.stack([ra[t] for t in both]), torch.stack([rb[t] for t in both])],
        torch.stack([base[t] for t in both]),
        params,
        [{"weight": 0.5, "density": 0.5}] * 2,
    )
    expected = methods.apply(spec, full)
    got = torch.stack([merged[vu[t]] for t in both])
    assert (got - expected).abs().max() < 1e-6
    single = MergeArgs(
        [torch.stack([ra[t] for t in only_a])],
        torch.stack([base[t] for t in only_a]),
        params,
        [{"weight": 0.5, "density": 0.5}],
    )
    got_a = torch.stack([merged[vu[t]] for t in only_a])
    assert (got_a - methods.apply(spec, single)).abs().max() < 1e-6


def test_padded_embedding_rows_are_kept(
    vocabs: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    english = AutoTokenizer.from_pretrained(vocabs["a"])
    padded = tmp_path / "padded"
    save_model(padded, llama_config(vocab=len(english) + 12), 31)
    english.save_pretrained(padded)
    out = run(
        runner,
        tmp_path,
        f"merge_method: linear\nbase_model: {padded}\nmodels:\n"
        f"  - model: {padded}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {vocabs['b']}\n    parameters: {{weight: 0.5}}\n",
    )
    merged, source = state(out)[EMBED].double(), state(padded)[EMBED].double()
    assert merged.shape[0] == len(english) + 12
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(english) + 12
    # padding rows: b has none, so (base fill) both inputs hold the base row
    assert (merged[len(english) :] - source[len(english) :]).abs().max() < 1e-6


def test_union_on_a_tied_gpt2_keeps_it_tied_and_loads(
    vocabs: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    folders = {}
    for seed, (name, source) in enumerate([("a", vocabs["a"]), ("b", vocabs["b"])]):
        tokenizer = AutoTokenizer.from_pretrained(source)
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64
        )
        folders[name] = tmp_path / name
        GPT2LMHeadModel(config).save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    out = run(
        runner,
        tmp_path,
        "merge_method: linear\ntokenizer_source: union\nmodels:\n"
        f"  - model: {folders['a']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {folders['b']}\n    parameters: {{weight: 0.5}}\n",
    )
    vu = vocab_of(out)
    merged = state(out)
    assert set(merged) == set(state(folders["a"]))  # tied: no head written
    ra, rb = (
        rows_by_token(folders["a"], "transformer.wte.weight"),
        rows_by_token(folders["b"], "transformer.wte.weight"),
    )
    for token, index in vu.items():
        both = [r[token] for r in (ra, rb) if token in r]
        expected = sum(both) / len(both)
        assert (merged["transformer.wte.weight"][index].double() - expected).abs().max() < 1e-6
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(vu) and config["tie_word_embeddings"] is True
    model = GPT2LMHeadModel.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, merged["transformer.wte.weight"])


def test_model_without_tokenizer_files(
    vocabs: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(vocabs["a"], bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    # same rows as the output's vocabulary: taken position for position
    out = run(
        runner,
        tmp_path,
        "merge_method: linear\ntokenizer_source: union\nmodels:\n"
        f"  - model: {vocabs['a']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {bare}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {vocabs['b']}\n    parameters: {{weight: 0.5}}\n",
    )
    ra, rb = rows_by_token(vocabs["a"], EMBED), rows_by_token(vocabs["b"], EMBED)
    merged, vu = state(out)[EMBED].double(), vocab_of(out)
    token = next(t for t in ra if t in rb)
    assert (merged[vu[token]] - (2 * ra[token] + rb[token]) / 3).abs().max() < 1e-6
    # other rows than the output's vocabulary: refused
    text = (
        "merge_method: linear\nmodels:\n"
        f"  - model: {vocabs['b']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {bare}\n    parameters: {{weight: 0.5}}\n"
    )
    recipe = write(tmp_path / "r2.yaml", text)
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "o2"))
    assert code == 4
    assert (
        f"models[1].model: the vocabularies differ and {bare} has no tokenizer.json (found: no tokenizer files)"
        in err
    )
