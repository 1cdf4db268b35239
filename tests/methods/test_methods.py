"""Every method against an independent float64 implementation written here (numpy)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergecli import methods
from mergecli.methods.kernels.topk import keep_count, top_k_mask
from mergecli.methods.spec import MergeArgs

RNG = np.random.default_rng(1234)


def run(
    name: str,
    tensors: list[np.ndarray],
    base: np.ndarray | None,
    per_model: list[dict[str, Any]],
    seed: int = 0,
    tensor: str = "w",
    **params: Any,
) -> np.ndarray:
    """Call a registered method with defaults filled in, on float64 tensors."""
    spec = methods.get(name)
    assert spec is not None
    full, models = spec.with_defaults(params, per_model)
    args = MergeArgs(
        [torch.from_numpy(t) for t in tensors],
        None if base is None else torch.from_numpy(base),
        full,
        models,
        tensor,
        seed,
    )
    return methods.apply(spec, args).numpy()


def trio(shape: tuple[int, ...] = (6, 5)) -> tuple[np.ndarray, list[np.ndarray]]:
    base = RNG.normal(size=shape)
    return base, [base + RNG.normal(scale=0.1, size=shape) for _ in range(3)]


def ref_topk(delta: np.ndarray, density: float) -> np.ndarray:
    """Keep floor(density n) (min 1) largest |entries|; ties by lowest index (stable sort)."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    k = max(1, math.floor(density * flat.size + 1e-9))
    order = np.argsort(-np.abs(flat), kind="stable")
    out = np.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out.reshape(delta.shape)


def ref_disjoint(weighted: list[np.ndarray], weights: list[float], normalize: bool) -> np.ndarray:
    out = np.zeros_like(weighted[0])
    total = weighted[0].copy() * 0
    summed = sum(weighted)
    for idx in np.ndindex(out.shape):
        sign = 1.0 if summed[idx] >= 0 else -1.0
        for e, w in zip(weighted, weights):
            if np.sign(e[idx]) == sign:
                out[idx] += e[idx]
                total[idx] += w
        if normalize and total[idx] != 0:
            out[idx] /= total[idx]
    return out


def test_linear() -> None:
    _, models = trio()
    got = run("linear", models, None, [{"weight": 1.0}, {"weight": 2.0}, {"weight": -0.5}])
    np.testing.assert_allclose(got, (models[0] + 2 * models[1] - 0.5 * models[2]) / 2.5, rtol=1e-12)
    raw = run("linear", models, None, [{"weight": 1.0}, {"weight": 2.0}, {"weight": -3.0}])
    np.testing.assert_allclose(
        raw, models[0] + 2 * models[1] - 3 * models[2], rtol=1e-12
    )  # sum 0: no division


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(normalize: bool) -> None:
    base, models = trio()
    w = [0.5, 1.0, -0.25]
    got = run(
        "task_arithmetic",
        models,
        base,
        [{"weight": x} for x in w],
        normalize=normalize,
        **{"lambda": 0.8},
    )
    delta = sum(x * (m - base) for x, m in zip(w, models))
    expected = base + 0.8 * (delta / sum(w) if normalize else delta)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("densities", "normalize"), [([0.5, 0.7, 0.3], True), ([1.0, 0.2, 0.9], False)]
)
def test_ties(densities: list[float], normalize: bool) -> None:
    base, models = trio()
    w = [1.0, 0.6, 0.3]
    got = run(
        "ties",
        models,
        base,
        [{"weight": x, "density": d} for x, d in zip(w, densities)],
        normalize=normalize,
        **{"lambda": 1.5},
    )
    weighted = [x * ref_topk(m - base, d) for x, m, d in zip(w, models, densities)]
    expected = base + 1.5 * ref_disjoint(weighted, w, normalize)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def ref_breadcrumbs(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    flat = delta.reshape(-1)
    n = flat.size
    target = max(1, math.floor(density * n + 1e-9)) if density < 1 else n
    n_top = min(math.floor(gamma * n + 1e-9), n - target)
    order = np.argsort(-np.abs(flat), kind="stable")
    keep = order[n_top : n_top + target]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


@pytest.mark.parametrize(
    ("name", "gamma"), [("breadcrumbs", 0.1), ("breadcrumbs", 0.01), ("breadcrumbs_ties", 0.1)]
)
def test_breadcrumbs(name: str, gamma: float) -> None:
    base, models = trio((10, 8))
    w, d = [1.0, 0.5, 0.8], [0.5, 0.3, 0.8]
    got = run(name, models, base, [{"weight": x, "density": k} for x, k in zip(w, d)], gamma=gamma)
    sparse = [ref_breadcrumbs(m - base, k, gamma) for m, k in zip(models, d)]
    if name == "breadcrumbs":
        expected = base + sum(x * s for x, s in zip(w, sparse))
    else:
        expected = base + ref_disjoint([x * s for x, s in zip(w, sparse)], w, False)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_breadcrumbs_keeps_small_tensors_mergekit_would_zero() -> None:
    base = np.zeros(10)
    model = np.arange(1.0, 11.0)
    got = run("breadcrumbs", [model], base, [{"weight": 1.0, "density": 0.5}], gamma=0.01)
    np.testing.assert_array_equal(got, [0, 0, 0, 0, 0, 6, 7, 8, 9, 10])


def ref_slerp(a: np.ndarray, c: np.ndarray, t: float) -> np.ndarray:
    cos = float(np.dot(a.ravel(), c.ravel()) / (np.linalg.norm(a) * np.linalg.norm(c)))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * c
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * c) / math.sin(theta)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp(t: float) -> None:
    a, c = RNG.normal(size=(4, 6)), RNG.normal(size=(4, 6))
    got = run("slerp", [c], a, [{}], t=t)
    np.testing.assert_allclose(got, ref_slerp(a, c, t), rtol=1e-12, atol=1e-14)
    if t in (0.0, 1.0):
        np.testing.assert_allclose(got, a if t == 0 else c, atol=1e-12)


@pytest.mark.parametrize("factor", [2.0, -3.0])
def test_slerp_of_parallel_and_antiparallel_tensors_is_linear(factor: float) -> None:
    a = RNG.normal(size=16)
    got = run("slerp", [factor * a], a, [{}], t=0.25)
    np.testing.assert_allclose(got, 0.75 * a + 0.25 * factor * a, rtol=1e-12)
    zero = run("slerp", [a], np.zeros(16), [{}], t=0.25)
    np.testing.assert_allclose(zero, 0.25 * a)


def test_nearswap() -> None:
    a, c = RNG.normal(size=(5, 5)), RNG.normal(size=(5, 5))
    c[0, 0] = a[0, 0]  # identical entry: weight 1 via the 1e-6 floor
    got = run("nearswap", [c], a, [{}], t=0.5)
    w = np.clip(0.5 / np.maximum(np.abs(a - c), 1e-6), 0, 1)
    np.testing.assert_allclose(got, a + w * (c - a), rtol=1e-12)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(filter_wise: bool) -> None:
    base, models = trio()
    got = run("model_stock", models, base, [{}, {}, {}], filter_wise=filter_wise)
    deltas = [m - base for m in models]
    n = len(models)

    def cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        axis = -1 if filter_wise else None
        return np.sum(x * y, axis=axis) / (
            np.linalg.norm(x, axis=axis) * np.linalg.norm(y, axis=axis)
        )

    c = np.mean([cos(deltas[i], deltas[j]) for i in range(n) for j in range(i + 1, n)], axis=0)
    t = n * c / (1 + (n - 1) * c)
    if filter_wise:
        t = t[:, None]
    np.testing.assert_allclose(got, t * np.mean(models, axis=0) + (1 - t) * base, rtol=1e-10)


def test_dare_rescales_l1_and_keeps_about_density() -> None:
    base = np.zeros(20000)
    model = RNG.normal(size=20000)
    got = run("dare_linear", [model], base, [{"weight": 1.0, "density": 0.3}], seed=7, tensor="x")
    kept = got != 0
    fraction = kept.mean()
    assert abs(fraction - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 20000)
    scale = got[kept] / model[kept]
    np.testing.assert_allclose(scale, scale[0], rtol=1e-12)  # one factor for the tensor
    assert np.abs(got).sum() == pytest.approx(np.abs(model).sum(), rel=1e-12)
    inverse = run(
        "dare_linear",
        [model],
        base,
        [{"weight": 1.0, "density": 0.3}],
        seed=7,
        tensor="x",
        rescale_mode="inverse_density",
    )
    np.testing.assert_allclose(inverse[kept], model[kept] / 0.3, rtol=1e-12)
    assert ((inverse != 0) == kept).all()  # same draw: the mask depends on seed and name only


def test_dare_is_reproducible_per_seed_and_tensor_name() -> None:
    base, models = trio((30, 30))
    per = [{"weight": 1.0, "density": 0.5}] * 3
    first = run("dare_ties", models, base, per, seed=3, tensor="a")
    np.testing.assert_array_equal(first, run("dare_ties", models, base, per, seed=3, tensor="a"))
    assert not np.array_equal(first, run("dare_ties", models, base, per, seed=4, tensor="a"))
    assert not np.array_equal(first, run("dare_ties", models, base, per, seed=3, tensor="b"))


@pytest.mark.parametrize(
    ("n", "density", "expected"),
    [(10, 0.3, 3), (100, 0.29, 29), (7, 0.01, 1), (5, 0.0, 0), (5, 1.0, 5)],
)
def test_keep_count(n: int, density: float, expected: int) -> None:
    assert keep_count(n, density) == expected


def test_top_k_is_exact_with_ties_broken_by_index() -> None:
    values = torch.tensor([1.0, 3.0, 3.0, 3.0, 2.0, 3.0])
    assert top_k_mask(values, 2).tolist() == [False, True, True, False, False, False]
    assert top_k_mask(values, 5).tolist() == [False, True, True, True, True, True]
    assert int(top_k_mask(torch.zeros(50), 17).sum()) == 17


floats = st.floats(min_value=-2, max_value=2, allow_nan=False, width=64)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(floats, min_size=6, max_size=6),
    st.floats(min_value=0.1, max_value=10),
    st.sampled_from(
        ["ties", "task_arithmetic", "breadcrumbs", "dare_ties", "dare_linear", "breadcrumbs_ties"]
    ),
)
def test_all_models_equal_to_base_give_the_base(
    values: list[float], weight: float, name: str
) -> None:
    base = np.array(values).reshape(2, 3)
    got = run(name, [base.copy(), base.copy()], base, [{"weight": weight, "density": 0.5}] * 2)
    np.testing.assert_array_equal(got, base)


@settings(max_examples=40, deadline=None)
@given(st.lists(floats, min_size=12, max_size=12), st.floats(min_value=0.1, max_value=100))
def test_normalized_weights_are_scale_invariant(values: list[float], scale: float) -> None:
    base = np.zeros(4)
    models = [np.array(values[i : i + 4]) for i in (0, 4, 8)]
    w = [0.2, 0.5, 0.3]
    for name, extra in (
        ("linear", {}),
        ("ties", {"normalize": True}),
        ("task_arithmetic", {"normalize": True}),
    ):
        one = run(
            name,
            models,
            None if name == "linear" else base,
            [{"weight": x, "density": 0.7} for x in w],
            **extra,
        )
        scaled = run(
            name,
            models,
            None if name == "linear" else base,
            [{"weight": x * scale, "density": 0.7} for x in w],
            **extra,
        )
        np.testing.assert_allclose(one, scaled, rtol=1e-9, atol=1e-12)


def test_density_one_equals_the_unsparsified_method() -> None:
    base, models = trio()
    per = [
        {"weight": 0.4, "density": 1.0},
        {"weight": 0.6, "density": 1.0},
        {"weight": 0.1, "density": 1.0},
    ]
    ta = run("task_arithmetic", models, base, per)
    np.testing.assert_array_equal(run("dare_linear", models, base, per), ta)
    np.testing.assert_array_equal(run("breadcrumbs", models, base, per, gamma=0.0), ta)
    np.testing.assert_array_equal(
        run("dare_ties", models, base, per), run("ties", models, base, per, normalize=False)
    )


def test_passthrough_scale() -> None:
    x = RNG.normal(size=(3, 4))
    np.testing.assert_array_equal(run("passthrough", [x], None, [{}]), x)
    np.testing.assert_allclose(run("passthrough", [x], None, [{}], scale=0.5), 0.5 * x, rtol=0)
