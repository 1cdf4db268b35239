"""Row-block processing of element-wise methods gives byte-identical output."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_blocks_identical, sparse_tune, write
from mergecli.cli._common import plan_recipe
from mergecli.engine.blocks import row_blocks
from mergecli.engine.run import run_plan
from mergecli.methods import research
from mergecli.methods.kernels import bernoulli
from mergecli.methods.kernels.selection import Selection, Selector, select_mask
from mergecli.methods.kernels.topk import keep_selected, kth_largest, top_k_mask


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("linear", ""),
        ("task_arithmetic", "base_model: {base}\n"),
        ("nearswap", "base_model: {base}\nparameters: {{t: 0.05}}\n"),
        ("ties", "base_model: {base}\nparameters: {{density: 0.4}}\n"),
        ("ties", "base_model: {base}\nparameters: {{density: 0.4, consensus_method: count}}\n"),
        ("breadcrumbs", "base_model: {base}\nparameters: {{density: 0.5, gamma: 0.1}}\n"),
        ("breadcrumbs_ties", "base_model: {base}\nparameters: {{density: 0.3, gamma: 0.05}}\n"),
        ("slerp", "base_model: {base}\nparameters: {{t: [0, 0.3, 1]}}\n"),
        ("dare_ties", "base_model: {base}\nseed: 3\nparameters: {{density: 0.4}}\n"),
        ("dare_linear", "base_model: {base}\nparameters: {{density: 0.6, rescale_mode: l1}}\n"),
        ("consensus", "base_model: {base}\nparameters: {{k: 1, save_masks: tall}}\n"),
        ("ramplus_tl", "base_model: {base}\nparameters: {{epsilon: 0.01, r: 0.5}}\n"),
        ("model_stock", "base_model: {base}\n"),
        ("multislerp", "base_model: {base}\n"),
        ("nuslerp", "base_model: {base}\n"),
        ("karcher", "parameters: {{max_iter: 20, tol: 1e-9}}\n"),
        ("sce", "base_model: {base}\nparameters: {{select_topk: 0.3}}\n"),
        ("sce", "base_model: {base}\n"),
        ("arcee_fusion", "base_model: {base}\n"),
        ("pcb", "base_model: {base}\nparameters: {{ratio: 0.3, lambda: 0.8}}\n"),
        ("nuslerp", "parameters: {{nuslerp_flatten: false}}\n"),
        ("multislerp", "parameters: {{normalize_weights: false}}\n"),
        ("model_stock", "base_model: {base}\nparameters: {{filter_wise: true}}\n"),
    ],
)
def test_blocks_are_byte_identical(
    family: dict[str, Path], tmp_path: Path, method: str, extra: str
) -> None:
    single = method in ("nearswap", "slerp", "arcee_fusion")
    models = [family["a"]] if single else [family["a"], family["b"]]
    weight = "" if single else "\n    parameters: {weight: 0.7}"
    text = f"merge_method: {method}\n" + extra.format(base=family["base"]) + "models:\n"
    text += "".join(f"  - model: {m}{weight}\n" for m in models)
    recipe = write(tmp_path / "r.yaml", text)
    plan = plan_recipe(recipe)
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    assert row_blocks(plan, embed, 100) == [(i, min(32, i + 3)) for i in range(0, 32, 3)]
    assert_blocks_identical(plan, text, tmp_path)


def test_column_slerps_and_wide_tsv_matrices_are_not_blocked(
    family: dict[str, Path], tmp_path: Path
) -> None:
    def recipe(method: str, params: str) -> str:
        return (
            f"merge_method: {method}\nbase_model: {family['base']}\nparameters: {params}\n"
            f"models:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n"
            f"  - model: {family['b']}\n    parameters: {{weight: 1}}\n"
        )

    def blocks(text: str, name: str) -> list[tuple[int, int] | None]:
        plan = plan_recipe(write(tmp_path / "r.yaml", text))
        return row_blocks(plan, next(t for t in plan.tensors if t.name == name), 100)

    embed, down = "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"
    columns = recipe("nuslerp", "{nuslerp_flatten: false, nuslerp_row_wise: true}")
    assert blocks(columns, embed) == [None]
    assert len(blocks(columns.replace("flatten: false", "flatten: true"), embed)) > 1
    assert blocks(recipe("tsv", "{}"), down) == [None]  # wide: rows < columns


@pytest.mark.parametrize(
    ("method", "knob", "params"),
    [("widen", "WIDEN_ROWS", "{t: 1.1, s: 0.8}"), ("tsv", "TSV_ROWS", "{rank_fraction: 0.5}")],
)
def test_row_group_blocks_start_at_groups_and_are_byte_identical(
    family: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    knob: str,
    params: str,
) -> None:
    monkeypatch.setattr(research, knob, 4)  # the family's embedding has 32 rows
    text = (
        f"merge_method: {method}\nbase_model: {family['base']}\nparameters: {params}\n"
        f"models:\n  - model: {family['a']}\n  - model: {family['b']}\n"
    )
    plan = plan_recipe(write(tmp_path / "r.yaml", text))
    plan = replace(plan, method=replace(plan.method, row_group=4))
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    blocks = row_blocks(plan, embed, 100)  # tall (TSV): rows >= columns
    assert len(blocks) > 2 and all(b is not None and b[0] % 4 == 0 for b in blocks)
    whole = run_plan(plan, tmp_path / "whole", text, reproducible=True, block_elements=1 << 30)
    cut = run_plan(plan, tmp_path / "blocks", text, reproducible=True, block_elements=100)
    assert whole.files == cut.files


@pytest.mark.parametrize("mode", ["l1", "inverse_density"])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_blocks_start_at_draw_chunks_and_are_byte_identical(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, mode: str
) -> None:
    monkeypatch.setattr(bernoulli, "DRAW_CHUNK", 64)  # the family's tensors hold a few chunks
    text = (
        f"merge_method: {method}\nseed: 5\nbase_model: {family['base']}\n"
        f"parameters: {{rescale_mode: {mode}}}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 0.6, density: 0.5, epsilon: 0.2}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 0.4, density: 0.7}}\n"
    )
    plan = plan_recipe(write(tmp_path / "r.yaml", text))
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    blocks = row_blocks(plan, embed, 100)
    step = 64 // math.gcd(64, embed.row_numel)
    assert len(blocks) > 2 and all(b is not None and b[0] % step == 0 for b in blocks)
    whole = run_plan(plan, tmp_path / "whole", text, reproducible=True, block_elements=1 << 30)
    cut = run_plan(plan, tmp_path / "blocks", text, reproducible=True, block_elements=100)
    assert whole.files == cut.files


def test_per_entry_draws_of_a_chunk_aligned_block_equal_the_whole_tensors() -> None:
    chunk = bernoulli.DRAW_CHUNK
    numel = 3 * chunk + 1000
    probs = np.random.default_rng(0).uniform(0.2, 0.9, numel)
    probs[:50] = 77 / 256  # ties on the first byte draw more bits
    whole = bernoulli.bernoulli_keep(numel, 0, 4, "t", 1, probs)
    for start in range(0, numel, chunk):
        part = bernoulli.bernoulli_keep(
            min(chunk, numel - start), start, 4, "t", 1, probs[start : start + chunk]
        )
        assert np.array_equal(part, whole[start : start + chunk])
    with pytest.raises(ValueError, match="from a chunk's first entry only"):
        bernoulli.bernoulli_keep(10, 5, 4, "t", 1, probs[:10])


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.sampled_from([0.0, 1.0, 2.5]), st.floats(0, 1e30, allow_nan=False)),
        min_size=1,
        max_size=300,
    ),
    data=st.data(),
)
def test_radix_selection_equals_kthvalue(values: list[float], data: st.DataObject) -> None:
    flat = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, flat.numel()))
    expected = torch.kthvalue(flat, flat.numel() - k + 1).values
    assert kth_largest(flat, k).item() == expected.item()
    assert (
        kth_largest(-flat - 1, k).item()
        == torch.kthvalue(-flat - 1, flat.numel() - k + 1).values.item()
    )


# bit patterns: zeros, subnormals (bucket 1 starts at pattern 1), both sides of a bucket
# edge (2^16, 2^16 + 1) and normal numbers; few distinct values give many ties
PATTERNS = st.sampled_from([0, 1, 2, 0xFFFF, 0x10000, 0x10001, 0x3F800000, 0x3F800001, 0x40000000])


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_blockwise_selection_equals_whole_tensor_top_k(data: st.DataObject) -> None:
    rows = data.draw(st.integers(1, 12))
    cols = data.draw(st.integers(1, 9))
    bits = data.draw(st.lists(PATTERNS, min_size=rows * cols, max_size=rows * cols))
    values = torch.tensor(bits, dtype=torch.int32).view(torch.float32).reshape(rows, cols)
    k = data.draw(st.integers(0, rows * cols))
    cuts = (
        sorted(set(data.draw(st.lists(st.integers(1, rows - 1), max_size=4)))) if rows > 1 else []
    )
    blocks = list(zip([0, *cuts], [*cuts, rows]))
    chosen = _select(values, k, blocks, predict=False)
    assert _select(values, k, blocks, predict=True) == chosen  # pass 0's window changes nothing
    masks = [select_mask(values[s:e], c) for (s, e), c in zip(blocks, chosen)]
    order = sorted(range(len(bits)), key=lambda i: (-bits[i], i))[:k]
    expected = torch.zeros(len(bits), dtype=torch.bool)
    expected[order] = True
    assert torch.equal(torch.cat(masks).reshape(-1), expected)
    assert torch.equal(top_k_mask(values, k).reshape(-1), expected)
    signed = values * torch.where(torch.arange(values.numel()) % 2 == 0, 1.0, -1.0).reshape(
        values.shape
    )
    kept = torch.cat([keep_selected(signed[s:e], c) for (s, e), c in zip(blocks, chosen)])
    assert torch.equal(kept.reshape(-1), signed.reshape(-1) * expected)
    counted = Selector(k, values.numel(), len(blocks))  # zeros counted instead of histograms
    zeros = [int((values[s:e] == 0).sum()) for s, e in blocks]
    settled = counted.settle_zeros(zeros)
    assert settled == (k >= sum(1 for b in bits if b != 0))
    if settled:
        masks = [select_mask(values[s:e], counted.selection(j)) for j, (s, e) in enumerate(blocks)]
        assert torch.equal(torch.cat(masks).reshape(-1), expected)


def test_random_draws_of_a_block_equal_the_whole_tensors_draws() -> None:
    from mergecli.methods.kernels.bernoulli import DRAW_CHUNK, bernoulli_keep

    whole = bernoulli_keep(3 * DRAW_CHUNK + 5, 0, 1, "t", 2, 0.37)
    for offset, count in [
        (0, 7),
        (3, 1),
        (DRAW_CHUNK - 3, 10),
        (5, 2 * DRAW_CHUNK),
        (2 * DRAW_CHUNK + 1, DRAW_CHUNK + 4),
        (DRAW_CHUNK, 1),
    ]:
        got = bernoulli_keep(count, offset, 1, "t", 2, 0.37)
        assert (got == whole[offset : offset + count]).all()
    assert not (bernoulli_keep(100, 0, 1, "t", 3, 0.37) == whole[:100]).all()
    assert bernoulli_keep(0, 9, 1, "t", 2, 0.37).size == 0
    with pytest.raises(ValueError, match="from a chunk's first entry only"):
        bernoulli_keep(4, 8, 1, "t", 2, np.full(4, 0.5))


def _first_bytes(seed: int, name: str, model: int, chunks: int) -> np.ndarray:
    """The first byte of every entry as the generators give them: the bytes of their words."""
    from mergecli.methods.kernels.bernoulli import DRAW_CHUNK, generator_for

    out = []
    for chunk in range(chunks):
        words = torch.empty(DRAW_CHUNK // 8, dtype=torch.int64)  # 64 random bits each
        words.random_(-(2**63), None, generator=generator_for(seed, f"{name}\0{chunk}", model))
        out.append(words.numpy().view(np.uint8))
    return np.concatenate(out)


@pytest.mark.parametrize("p", [0.3, 77 / 256, 0.0, 1.0, 1 - 2.0**-40, 2.0**-30])
def test_bernoulli_keep_is_decided_by_the_first_byte_except_on_ties(p: float) -> None:
    from mergecli.methods.kernels.bernoulli import DRAW_CHUNK, bernoulli_keep

    n = 16 * DRAW_CHUNK
    keep = bernoulli_keep(n, 0, 4, "w", 0, p)
    first = _first_bytes(4, "w", 0, 16).astype(np.int64)
    level = math.floor(p * 256)
    assert (keep[first < level]).all() and not (keep[first > level]).any()
    ties = keep[first == level]
    rest = p * 256 - level
    if rest == 0:
        assert not ties.any()  # U = b/256 + ... >= p exactly when b = 256 p
    else:  # a tie is kept with probability `rest`: within 5 standard deviations
        assert abs(ties.mean() - rest) <= 5 * math.sqrt(rest * (1 - rest) / ties.size) + 1e-12
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.mean() - p) <= 5 * sigma + 1e-12


def test_bernoulli_keep_takes_one_probability_per_entry() -> None:
    from mergecli.methods.kernels.bernoulli import bernoulli_keep

    n = 300_000
    probability = np.resize([0.0, 1.0, 0.25, 0.8], n)
    keep = bernoulli_keep(n, 0, 7, "d", 1, probability)
    assert not keep[probability == 0].any() and keep[probability == 1].all()
    for p in (0.25, 0.8):
        share = keep[probability == p].mean()
        assert abs(share - p) <= 5 * math.sqrt(p * (1 - p) / (n / 4))
    scalar = bernoulli_keep(n, 0, 7, "d", 1, 0.25)  # 256 * 0.25 is whole: ties draw nothing
    assert (keep[probability == 0.25] == scalar[probability == 0.25]).all()


@pytest.mark.parametrize("fraction", [0.75, 0.25, 0.0])
def test_a_tie_on_32_more_bits_draws_32_more(fraction: float) -> None:
    from mergecli.methods.kernels.bernoulli import _settle_ties, generator_for

    def low_words(count: int) -> list[int]:
        words = torch.empty(count, dtype=torch.int64)
        words.random_(-(2**63), None, generator=generator_for(1, "z", 0))
        return [int(w) & 0xFFFFFFFF for w in words]

    first, second = low_words(2)
    rest = (first + fraction) / 2.0**32  # the first 32 bits tie with it exactly
    keep = np.zeros(4, dtype=bool)
    _settle_ties(keep, [generator_for(1, "z", 0)], np.array([2]), np.array([rest]))
    assert keep[2] == (second < math.floor(fraction * 2.0**32))  # fraction 0: dropped
    assert keep.sum() == keep[2]


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_pack_bits_round_trips_a_mask(numel: int, dtype: torch.dtype) -> None:
    from mergecli.methods.kernels.bernoulli import pack_bits, unpack_bits

    mask = (torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.4).to(dtype)
    packed = pack_bits(mask.reshape(-1, 1) if numel % 2 else mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 7) // 8
    unpacked = unpack_bits(packed, numel)
    assert unpacked.dtype == torch.float32 and torch.equal(unpacked, mask.to(torch.float32))


@pytest.mark.parametrize(
    ("keep", "density", "clean_rows"),
    [(0.1, 0.5, 0), (0.1, 0.05, 0), (0.3, 0.2, 3)],
    ids=["k-above-nonzeros", "k-below-nonzeros", "misleading-first-block"],
)
def test_sparse_task_vectors_select_as_the_whole_tensor_does(
    family: dict[str, Path], tmp_path: Path, keep: float, density: float, clean_rows: int
) -> None:
    a = sparse_tune(family["base"], tmp_path / "a", 1, keep, clean_rows)
    b = sparse_tune(family["base"], tmp_path / "b", 2, keep, clean_rows)
    text = (
        f"merge_method: ties\nbase_model: {family['base']}\n"
        f"parameters: {{density: {density}, weight: 1.0}}\nmodels:\n  - model: {a}\n  - model: {b}\n"
    )
    recipe = write(tmp_path / "r.yaml", text)
    plan = plan_recipe(recipe)
    whole = run_plan(plan, tmp_path / "whole", text, reproducible=True, block_elements=1 << 30)
    blocks = run_plan(plan, tmp_path / "blocks", text, reproducible=True, block_elements=100)
    assert whole.files == blocks.files


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_mask_unpacked_with_a_factor_scales_like_a_scalar_multiply(dtype: torch.dtype) -> None:
    from mergecli.methods.kernels.bernoulli import pack_bits, unpack_bits

    generator = torch.Generator().manual_seed(3)
    delta = torch.randn(1001, generator=generator, dtype=dtype)
    keep = torch.rand(1001, generator=generator) < 0.3
    factor = 1.2345678901234567  # not a float32: rounded as torch rounds a scalar
    mask = unpack_bits(pack_bits(keep), 1001, factor, dtype)
    assert mask.dtype == dtype
    assert torch.equal(delta * mask, (delta * keep.to(dtype)).mul_(factor))


def _select(
    values: torch.Tensor, k: int, blocks: list[tuple[int, int]], predict: bool
) -> list[Selection]:
    """Each block's selection, as the statistics pass finds it (with `predict`: pass 0's
    window centred on the first block's k-th largest)."""
    selector = Selector(k, values.numel(), len(blocks))
    if predict:
        selector.predict(values[blocks[0][0] : blocks[0][1]])
    for pass_no in (0, 1):
        if pass_no == 1 and not selector.second_pass():
            break
        for j, (start, end) in enumerate(blocks):
            selector.observe(pass_no, j, values[start:end])
    return [selector.selection(j) for j in range(len(blocks))]


@pytest.mark.parametrize("predict", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_few_distinct_magnitudes_select_as_a_stable_sort(seed: int, predict: bool) -> None:
    """Task vectors of bf16 models take few distinct values: the threshold's bucket is dense
    (its per-block counts kept sparse) and most blocks keep every entry at the threshold
    (masked as |d| >= t, no search for the tied entries); one block keeps only some."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 1e-3, 1.5e-3, 2e-3, 2.5e-3, 3e-3]).bfloat16().float()
    values = levels[torch.randint(0, len(levels), (40, 25), generator=g)]
    signed = values * torch.where(torch.rand(40, 25, generator=g) < 0.5, -1.0, 1.0)
    k = int(torch.randint(1, values.numel(), (1,), generator=g))
    blocks = [(i, min(40, i + 7)) for i in range(0, 40, 7)]
    chosen = _select(values, k, blocks, predict=predict)
    flat = values.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]
    expected = torch.zeros(len(flat), dtype=torch.bool)
    expected[order] = True
    masks = torch.cat([select_mask(values[s:e], c) for (s, e), c in zip(blocks, chosen)])
    assert torch.equal(masks.reshape(-1), expected)
    kept = torch.cat([keep_selected(signed[s:e], c) for (s, e), c in zip(blocks, chosen)])
    assert torch.equal(kept.reshape(-1), signed.reshape(-1) * expected)
    assert any(c.every_tie for c in chosen) or k == int((values > 0).sum())


def test_a_good_prediction_saves_the_second_pass() -> None:
    g = torch.Generator().manual_seed(1)
    values = torch.randn(64, 512, generator=g).abs()
    blocks = [(i, i + 8) for i in range(0, 64, 8)]
    k = values.numel() // 3
    selector = Selector(k, values.numel(), len(blocks))
    selector.predict(values[:8])
    for j, (start, end) in enumerate(blocks):
        selector.observe(0, j, values[start:end])
    assert not selector.second_pass()
    threshold = selector.selection(0).threshold
    assert threshold == float(values.reshape(-1).sort(descending=True).values[k - 1])


def test_a_window_with_too_many_patterns_falls_back_to_the_second_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mergecli.methods.kernels import selection

    monkeypatch.setattr(selection, "WINDOW_PAIRS", 3)
    g = torch.Generator().manual_seed(2)
    values = torch.randn(64, 512, generator=g).abs()
    blocks = [(i, i + 8) for i in range(0, 64, 8)]
    k = values.numel() // 3
    predicted = _select(values, k, blocks, predict=True)
    assert predicted == _select(values, k, blocks, predict=False)
    assert predicted[0].threshold == float(values.reshape(-1).sort(descending=True).values[k - 1])


def test_a_statistics_pass_that_finds_nothing_stops_after_the_first_block(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergecli.engine.stats import block_sums
    from mergecli.io.reader import TensorReader

    text = (
        f"merge_method: della\nbase_model: {family['base']}\n"
        "parameters: {rescale_mode: inverse_density}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 1, density: 0.5}}\n"
    )
    monkeypatch.setattr(bernoulli, "DRAW_CHUNK", 64)
    plan = plan_recipe(write(tmp_path / "r.yaml", text))
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    blocks = row_blocks(plan, embed, 100)
    reads: list[tuple[int, int] | None] = []
    original = TensorReader.read

    def counting(self: TensorReader, model: object, name: str, rows: object = None) -> object:
        reads.append(rows)  # type: ignore[arg-type]
        return original(self, model, name, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(TensorReader, "read", counting)
    found = block_sums(plan, embed, TensorReader(), blocks)
    assert found.empty and reads == [blocks[0], blocks[0]]  # the model and the base, once
    l1 = plan_recipe(write(tmp_path / "l1.yaml", text.replace("inverse_density", "l1")))
    reads.clear()
    l1_embed = next(t for t in l1.tensors if t.name == embed.name)
    assert not block_sums(l1, l1_embed, TensorReader(), blocks).empty
    assert len(reads) == 2 * len(blocks)


@pytest.mark.parametrize("predict", [False, True])
def test_a_full_dense_bucket_kept_as_uint16_counts_selects_as_a_stable_sort(predict: bool) -> None:
    """Every entry in one radix bucket with most of its 65536 patterns present (PCB's
    balance scores look like this): blocks keep uint16 histograms, the result is exact."""
    gen = torch.Generator().manual_seed(3)
    patterns = torch.randint(0, 65536, (120_000,), generator=gen, dtype=torch.int32)
    patterns[:500] = 777  # ties at one pattern, across blocks
    bits = patterns + int(torch.tensor(1.0).view(torch.int32)) + 1  # inside one bucket
    values = bits.view(torch.float32).reshape(1200, 100)
    blocks = [(0, 5), (5, 400), (400, 801), (801, 1200)]
    flat = bits.tolist()
    for k in (1, 250, 60_000, 119_999):
        selector = Selector(k, values.numel(), len(blocks))
        if predict:
            selector.predict(values[:5])
        for j, (s, e) in enumerate(blocks):
            selector.observe(0, j, values[s:e])
        assert selector.second_pass()
        for j, (s, e) in enumerate(blocks):
            selector.observe(1, j, values[s:e])
        if not predict:
            assert all(low is not None and low.dtype == torch.uint16 for low in selector.lows[1:])
        masks = [select_mask(values[s:e], selector.selection(j)) for j, (s, e) in enumerate(blocks)]
        order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]
        expected = torch.zeros(len(flat), dtype=torch.bool)
        expected[order] = True
        assert torch.equal(torch.cat(masks).reshape(-1), expected)
