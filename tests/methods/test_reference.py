"""Every method and every fast kernel against `mergecli.methods.reference`, the plain math.

Inputs are random float64 (float32 for the radix kernels) with ties, exact zeros and
subnormals put in on purpose; kernels that claim exactness are compared with `torch.equal`
(equal values entry by entry, no tolerance), methods within float64 rounding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from mergecli import methods
from mergecli.methods import reference as ref
from mergecli.methods.kernels.bernoulli import DRAW_CHUNK, bernoulli_keep, generator_for
from mergecli.methods.kernels.selection import Selector, select_mask
from mergecli.methods.kernels.sign import disjoint_merge
from mergecli.methods.kernels.sums import exact_total, row_sums
from mergecli.methods.kernels.topk import keep_count, select_top, top_k_mask
from mergecli.methods.spec import MergeArgs

SHAPE = (12, 10)


def hostile(
    seed: int, shape: tuple[int, ...] = SHAPE, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Random values with repeated values (ties), exact zeros and subnormals."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 0.05
    flat = x.reshape(-1)
    pick = torch.randperm(flat.numel(), generator=g)
    m = flat.numel() // 10
    flat[pick[:m]] = 0.0
    flat[pick[m : 2 * m]] = 0.0125  # a block of ties
    tiny = torch.finfo(dtype).tiny
    subnormal = torch.tensor([tiny / 4, -tiny / 8, tiny / 2, -tiny / 3], dtype=torch.float64)
    flat[pick[2 * m : 2 * m + 4]] = subnormal
    return x.to(dtype)


def family(seed: int, count: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and `count` models whose task vectors are hostile (zeros: equal to the base)."""
    base = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return base, [base + hostile(seed + 1 + i) for i in range(count)]


def call(
    name: str,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    per_model: list[dict[str, Any]],
    seed: int = 0,
    **params: Any,
) -> torch.Tensor:
    spec = methods.get(name)
    assert spec is not None
    full, models = spec.with_defaults(params, per_model)
    return methods.apply(spec, MergeArgs(tensors, base, full, models, "w", seed))


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


def dare_masks(densities: list[float], seed: int = 0) -> list[torch.Tensor]:
    n = math.prod(SHAPE)
    return [
        torch.from_numpy(bernoulli_keep(n, 0, seed, "w", i, d)).reshape(SHAPE).double()
        for i, d in enumerate(densities)
    ]


# kernels ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_selection_equals_a_stable_sort(seed: int, dtype: torch.dtype) -> None:
    magnitude = hostile(seed, dtype=dtype).abs()
    if seed % 2:
        magnitude.reshape(-1)[[3, 7]] = math.inf
    n = magnitude.numel()
    for k in sorted({0, 1, 2, n // 10, n // 5, n // 5 + 2, n // 2, n - 1, n}):
        want = ref.top_k_mask(magnitude, k)
        assert torch.equal(select_mask(magnitude, select_top(magnitude, k)), want), k
        assert torch.equal(top_k_mask(magnitude, k), want), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_of_nan_is_refused_not_guessed(dtype: torch.dtype) -> None:
    magnitude = hostile(1, dtype=dtype).abs()
    magnitude[2, 3] = math.nan
    with pytest.raises(ValueError, match="NaN magnitudes have no top-k"):
        select_top(magnitude, 10)


@pytest.mark.parametrize("seed", range(4))
def test_selection_over_row_blocks_equals_a_stable_sort(seed: int) -> None:
    magnitude = hostile(seed, (40, 30), torch.float32).abs()
    blocks = [magnitude[i : i + 7] for i in range(0, 40, 7)]
    for k in (1, 120, 600, 1199):
        selector = Selector(k, magnitude.numel(), len(blocks))
        for j, block in enumerate(blocks):
            selector.observe(0, j, block)
        if selector.second_pass():
            for j, block in enumerate(blocks):
                selector.observe(1, j, block)
        got = torch.cat([select_mask(b, selector.selection(j)) for j, b in enumerate(blocks)])
        assert torch.equal(got, ref.top_k_mask(magnitude, k)), k


@pytest.mark.parametrize("n", [0, 1, 7, 10, 99, 1000])
@pytest.mark.parametrize("density", [0.0, 1e-6, 0.1, 0.3, 0.7, 0.999, 1.0])
def test_keep_count_is_the_reference_count(n: int, density: float) -> None:
    assert keep_count(n, density) == ref.keep_count(n, density)


WEIGHTS = [[1.0, 1.0, 1.0], [0.5, 0.3, 0.2], [0.7, -0.4, 0.2], [1.0, 0.0, 2.0]]


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count", [False, True])
def test_disjoint_merge_equals_the_ties_formula(
    weights: list[float], normalize: bool, dtype: torch.dtype, count: bool
) -> None:
    deltas = [hostile(10 + i, dtype=dtype) for i in range(3)]
    deltas[1].reshape(-1)[:5] = -deltas[0].reshape(-1)[:5]  # sums of exactly zero
    got = disjoint_merge(deltas, weights, normalize, count)
    assert torch.equal(got, ref.ties_merge(deltas, weights, normalize, count))


def test_count_election_differs_from_sum_where_magnitudes_disagree() -> None:
    big, small = torch.tensor([-10.0]), torch.tensor([1.0])
    deltas, weights = [big, small, small], [1.0, 1.0, 1.0]
    assert float(disjoint_merge(deltas, weights, False)) == -10.0  # the sum is negative
    assert float(disjoint_merge(deltas, weights, False, count=True)) == 2.0  # two of three +


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_sums_equal_the_reference_total(dtype: torch.dtype) -> None:
    values = hostile(3, (50, 9), dtype)
    for step in (1, 7, 50):
        parts = [row_sums(values[i : i + step], dtype) for i in range(0, 50, step)]
        assert exact_total(parts) == ref.total(values, dtype)
    values[13, 4] = math.nan
    assert math.isnan(exact_total([row_sums(values, dtype)])) and math.isnan(ref.total(values))


def _draws(seed: int, name: str, model: int) -> tuple[np.ndarray, list[int]]:
    """The first bytes of one chunk and the 32-bit words drawn after them, as drawn by
    the kernel's documented protocol (one generator per chunk, 64 bits a word)."""
    generator = generator_for(seed, f"{name}\0{0}", model)
    words = torch.empty(DRAW_CHUNK // 8, dtype=torch.int64).random_(
        -(2**63), None, generator=generator
    )
    after = torch.empty(4096, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    return words.numpy().view(np.uint8), [w & 0xFFFFFFFF for w in after.tolist()]


@pytest.mark.parametrize("p", [0.3, 0.5, 0.9, 1 / 3])
def test_bernoulli_keep_is_u_below_p_exactly(p: float) -> None:
    first, words = _draws(4, "t", 1)
    got = bernoulli_keep(DRAW_CHUNK, 0, 4, "t", 1, p)
    assert got.tolist() == ref.bernoulli_keep(first.tolist(), words, p)
    assert abs(got.mean() - p) < 5 * math.sqrt(p * (1 - p) / DRAW_CHUNK)


# methods ------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_linear(normalize: bool) -> None:
    _, models = family(1)
    weights = [0.5, 0.3, -0.2]
    got = call("linear", models, None, [{"weight": w} for w in weights], normalize=normalize)
    close(got, ref.linear(models, weights, normalize))


def test_passthrough() -> None:
    x = hostile(2)
    close(call("passthrough", [x], None, [{}], scale=2.5), ref.passthrough(x, 2.5))


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(normalize: bool) -> None:
    base, models = family(2)
    weights = [0.5, 0.3, 0.2]
    got = call(
        "task_arithmetic",
        models,
        base,
        [{"weight": w} for w in weights],
        normalize=normalize,
        **{"lambda": 0.8},
    )
    close(got, ref.task_arithmetic(base, models, weights, 0.8, normalize))


@pytest.mark.parametrize("densities", [[0.5, 0.7, 0.3], [1.0, 0.05, 0.0], [0.2, 0.2, 0.2]])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_ties(densities: list[float], normalize: bool, consensus: str) -> None:
    base, models = family(3)
    weights = [0.5, 0.3, 0.2]
    per = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    got = call("ties", models, base, per, normalize=normalize, consensus_method=consensus)
    want = ref.ties(base, models, weights, densities, 1.0, normalize, consensus == "count")
    close(got, want)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("mode", ["l1", "inverse_density"])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare(name: str, mode: str, rescale: bool) -> None:
    base, models = family(4)
    weights, densities = [0.5, 0.3, 0.2], [0.5, 0.9, 1.0]
    per = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    params = {"rescale": rescale, "rescale_mode": mode, "normalize": False, "lambda": 1.0}
    got = call(name, models, base, per, seed=5, **params)
    want = ref.dare(
        base,
        models,
        dare_masks(densities, 5),
        weights,
        densities,
        params,
        elect=name == "dare_ties",
    )
    close(got, want)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.1])
def test_breadcrumbs(name: str, gamma: float) -> None:
    base, models = family(5)
    weights, densities, gammas = [0.6, 0.4, 0.5], [0.5, 0.8, 1.0], [gamma, 2 * gamma, 0.05]
    per = [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(weights, densities, gammas)]
    got = call(name, models, base, per)
    spec = methods.get(name)
    assert spec is not None
    params = {p.name: p.default for p in spec.scoped("global")}
    elect = name.endswith("ties")
    want = ref.breadcrumbs(base, models, weights, densities, gammas, params, elect=elect)
    close(got, want)


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("mode", ["l1", "inverse_density"])
def test_della(name: str, mode: str) -> None:
    base, models = family(6)
    weights, densities, epsilons = [0.5, 0.3, 0.2], [0.5, 0.6, 0.4], [0.2, 0.1, 0.3]
    per = [
        {"weight": w, "density": d, "epsilon": e} for w, d, e in zip(weights, densities, epsilons)
    ]
    got = call(name, models, base, per, seed=3, rescale_mode=mode)
    masks = [
        torch.from_numpy(
            bernoulli_keep(
                base.numel(), 0, 3, "w", i, ref.della_probabilities(m - base, d, e).numpy()
            )
        )
        .reshape(SHAPE)
        .double()
        for i, (m, d, e) in enumerate(zip(models, densities, epsilons))
    ]
    spec = methods.get(name)
    assert spec is not None
    params = {p.name: p.default for p in spec.scoped("global")}
    params |= {"rescale_mode": mode}
    want = ref.della(base, models, masks, weights, densities, epsilons, params, name == "della")
    close(got, want)


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce(topk: float) -> None:
    base, models = family(7)
    close(call("sce", models, base, [{}, {}, {}], select_topk=topk), ref.sce(base, models, topk))


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_and_nearswap(t: float) -> None:
    base, (other, *_) = family(8)
    close(call("slerp", [other], base, [{}], t=t), ref.slerp_flat(base, other, t))
    close(call("nearswap", [other], base, [{}], t=t), ref.nearswap(base, other, t))
    close(call("slerp", [3 * base], base, [{}], t=t), ref.slerp_flat(base, 3 * base, t))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(filter_wise: bool) -> None:
    base, models = family(9)
    got = call("model_stock", models, base, [{}, {}, {}], filter_wise=filter_wise)
    close(got, ref.model_stock(base, models, filter_wise))


def test_arcee_fusion() -> None:
    base, (other, *_) = family(10)
    close(call("arcee_fusion", [other], base, [{}]), ref.arcee_fusion(base, other))


@pytest.mark.parametrize(
    ("flatten", "row_wise", "axis"), [(True, False, None), (False, False, 1), (False, True, 0)]
)
def test_nuslerp(flatten: bool, row_wise: bool, axis: int | None) -> None:
    base, (x, y, _) = family(11)
    per = [{"weight": 1.0}, {"weight": 3.0}]
    got = call("nuslerp", [x, y], base, per, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    close(got, ref.nuslerp([x, y], base, [1.0, 3.0], axis))


def test_multislerp_and_karcher() -> None:
    base, models = family(12)
    per = [{"weight": w} for w in (0.5, 0.3, 0.2)]
    close(
        call("multislerp", models, base, per), ref.multislerp(models, base, [0.5, 0.3, 0.2], 1e-8)
    )
    close(call("karcher", models, None, [{}, {}, {}]), ref.karcher(models, 10, 1e-5))


def test_consensus() -> None:
    base, models = family(13)
    per = [{"lambda": lam} for lam in (0.4, 0.6, 0.5)]
    got = call("consensus", models, base, per, k=2, alpha=0.9)
    close(got, ref.consensus(base, models, [0.4, 0.6, 0.5], 2, 0.9))


def test_tsv_pcb_widen() -> None:
    base, models = family(14)
    close(
        call("tsv", models, base, [{}] * 3, rank_fraction=0.6, **{"lambda": 0.7}),
        ref.tsv(base, models, 0.6, 0.7),
    )
    close(
        call("pcb", models, base, [{}] * 3, ratio=0.3, **{"lambda": 0.9}),
        ref.pcb(base, models, 0.3, 0.9),
    )
    close(call("widen", models, base, [{}] * 3, t=1.2, s=1.5), ref.widen(base, models, 1.2, 1.5))
    vector = base[0]
    rows = [m[0] for m in models]
    close(call("widen", rows, vector, [{}] * 3, t=1.2, s=1.5), ref.widen(vector, rows, 1.2, 1.5))


def test_mwa() -> None:
    _, models = family(15)
    spec = methods.get("mwa")
    assert spec is not None and spec.prepare is not None
    states = [{"log_history": [{"loss": loss}]} for loss in (1.2, 0.9, 1.0)]
    per = spec.prepare(states, {"metric": "loss", "penalty": 2.0})
    close(call("mwa", models, None, per), ref.mwa(models, [1.2, 0.9, 1.0], 2.0))


@pytest.mark.parametrize("epsilon", [1e-5, 0.02])
def test_ram_and_ramplus(epsilon: float) -> None:
    base, models = family(16)
    close(call("ram", models, base, [{}] * 3, epsilon=epsilon), ref.ram(base, models, epsilon))
    got = call("ramplus_tl", models, base, [{}] * 3, epsilon=epsilon, r=0.5, alpha=0.3)
    close(got, ref.ram(base, models, epsilon, r=0.5, alpha=0.3))


def test_every_method_is_tested_here() -> None:
    tested = {
        "linear",
        "passthrough",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "sce",
        "slerp",
        "nearswap",
        "model_stock",
        "arcee_fusion",
        "nuslerp",
        "multislerp",
        "karcher",
        "consensus",
        "tsv",
        "pcb",
        "widen",
        "mwa",
        "ram",
        "ramplus_tl",
    }
    assert tested == set(methods.names())
