"""DELLA, SCE, nuslerp, multislerp, karcher, arcee_fusion against float64 math written here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_methods import RNG, ref_slerp, run, trio
from typer.testing import CliRunner

from conftest import invoke, write


@pytest.mark.parametrize(
    ("della", "dare", "normalize"),
    [("della", "dare_ties", False), ("della_linear", "dare_linear", True)],
)
def test_della_with_zero_epsilon_is_dare_draw_for_draw(
    della: str, dare: str, normalize: bool
) -> None:
    base, models = trio((12, 9))
    per = [
        {"weight": 0.7, "density": 0.4},
        {"weight": 0.2, "density": 0.6},
        {"weight": 0.5, "density": 0.5},
    ]
    got = run(della, models, base, per, seed=9, tensor="t", epsilon=0.0, normalize=normalize)
    np.testing.assert_array_equal(
        got, run(dare, models, base, per, seed=9, tensor="t", normalize=normalize)
    )


def test_della_keep_probability_follows_magnitude_rank() -> None:
    rows, cols = 4000, 5
    delta = np.tile(np.array([0.1, -0.2, 0.3, -0.4, 0.5]), (rows, 1))
    delta = delta[:, RNG.permutation(cols)]
    got = run(
        "della_linear",
        [delta],
        np.zeros_like(delta),
        [{"weight": 1.0, "density": 0.5}],
        epsilon=0.2,
        rescale_mode="inverse_density",
    )
    ranks = np.argsort(np.argsort(np.abs(delta), axis=1, kind="stable"), axis=1)
    p = (0.5 - 0.2) + 2 * 0.2 * ranks / (cols - 1)
    kept = got != 0
    np.testing.assert_allclose(got[kept], (delta / p)[kept], rtol=1e-12)
    for rank in range(cols):
        observed = kept[ranks == rank].mean()
        expected = 0.3 + 0.1 * rank
        assert abs(observed - expected) < 5 * math.sqrt(expected * (1 - expected) / rows)


def test_della_out_of_range_probabilities_are_refused(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: della\nbase_model: {family['base']}\nparameters: {{epsilon: 0.2}}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 1, density: 0.1}}\n",
    )
    code, _, err = invoke(runner, "validate", str(recipe))
    assert code == 2
    assert (
        "models[0].parameters: density 0.1 with epsilon 0.2 gives keep probabilities [-0.1, 0.3]; both must lie in (0, 1]"
        in err
    )


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce(topk: float) -> None:
    base, models = trio((8, 6))
    got = run("sce", models, base, [{}, {}, {}], select_topk=topk)
    d = np.stack([m - base for m in models])
    if topk < 1:
        var = d.var(axis=0).reshape(-1)
        k = math.floor(topk * var.size + 1e-9)
        keep = np.zeros(var.size, dtype=bool)
        keep[np.argsort(-var, kind="stable")[:k]] = True
        d = d * keep.reshape(base.shape)
    energy = (d**2).reshape(3, -1).mean(axis=1)
    c = energy / energy.sum()
    sign = np.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(d) == sign
    num = sum(c[i] * agree[i] * d[i] for i in range(3))
    den = sum(c[i] * agree[i] for i in range(3))
    np.testing.assert_allclose(got, base + num / np.where(den == 0, 1, den), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
def test_nuslerp(flatten: bool, row_wise: bool) -> None:
    base, models = trio((4, 7))
    x, y = models[0], models[1]
    got = run(
        "nuslerp",
        [x, y],
        base,
        [{"weight": 1.0}, {"weight": 3.0}],
        nuslerp_flatten=flatten,
        nuslerp_row_wise=row_wise,
    )
    dx, dy = x - base, y - base
    if flatten:
        expected = ref_slerp(dx, dy, 0.75)
    elif row_wise:
        expected = np.stack([ref_slerp(dx[:, j], dy[:, j], 0.75) for j in range(7)], axis=1)
    else:
        expected = np.stack([ref_slerp(dx[i], dy[i], 0.75) for i in range(4)])
    np.testing.assert_allclose(got, base + expected, rtol=1e-10, atol=1e-12)
    no_base = run("nuslerp", [x, y], None, [{"weight": 1.0}, {"weight": 1.0}])
    np.testing.assert_allclose(no_base, ref_slerp(x, y, 0.5), rtol=1e-10)


def test_multislerp_and_karcher_of_two_equal_norm_vectors_are_the_slerp_midpoint() -> None:
    x = RNG.normal(size=50)
    y = RNG.normal(size=50)
    y *= np.linalg.norm(x) / np.linalg.norm(y)
    mid = ref_slerp(x, y, 0.5)
    np.testing.assert_allclose(
        run("multislerp", [x, y], None, [{"weight": 2.0}, {"weight": 2.0}]),
        mid,
        rtol=1e-9,
        atol=1e-12,
    )
    np.testing.assert_allclose(run("karcher", [x, y], None, [{}, {}]), mid, rtol=1e-9, atol=1e-12)


def log_map(mean: np.ndarray, unit: np.ndarray) -> np.ndarray:
    cos = np.clip(unit @ mean, -1, 1)
    v = unit - cos * mean
    return np.arccos(cos) * v / np.linalg.norm(v)


def test_karcher_mean_has_zero_tangent_residual_and_mean_norm() -> None:
    vectors = [RNG.normal(size=30) + 2.0 for _ in range(4)]
    got = run("karcher", vectors, None, [{}] * 4, max_iter=200, tol=1e-12)
    norms = [np.linalg.norm(v) for v in vectors]
    assert np.linalg.norm(got) == pytest.approx(np.mean(norms), rel=1e-12)
    direction = got / np.linalg.norm(got)
    residual = sum(log_map(direction, v / n) for v, n in zip(vectors, norms))
    assert np.linalg.norm(residual) < 1e-9


def test_multislerp_projects_onto_the_tangent_space() -> None:
    """mergekit's Multi-SLERP: orthogonal projections (not log maps) onto the tangent space
    at the weighted unit mean, one exponential-map step, the weighted mean norm."""
    base, models = trio((3, 5))
    w = [0.2, 0.3, 0.5]
    eps = 1e-8
    got = run("multislerp", models, base, [{"weight": x} for x in w])
    d = [(m - base).reshape(-1) for m in models]
    norms = [np.linalg.norm(v) for v in d]
    units = [v / (n + eps) for v, n in zip(d, norms)]
    mean = sum(x * u for x, u in zip(w, units))
    mean /= np.linalg.norm(mean)
    tangent = sum(x * (u - (u @ mean) * mean) for x, u in zip(w, units))
    t = np.linalg.norm(tangent) + eps
    point = np.cos(t) * mean + np.sin(t) * tangent / t
    expected = base + (sum(x * n for x, n in zip(w, norms)) * point).reshape(base.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_arcee_fusion() -> None:
    a = RNG.normal(size=(20, 16))
    c = a + RNG.normal(scale=0.2, size=(20, 16)) * (RNG.random((20, 16)) < 0.3)
    got = run("arcee_fusion", [c], a, [{}])

    def log_softmax(x: np.ndarray) -> np.ndarray:
        shifted = x - x.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    kl = (np.exp(log_softmax(c)) * (log_softmax(c) - log_softmax(a))).sum(axis=-1, keepdims=True)
    importance = np.abs(c - a) * kl
    q1, med, q3 = np.quantile(importance, [0.25, 0.5, 0.75], method="lower")
    mask = importance >= med + 1.5 * (q3 - q1)
    assert 0 < mask.sum() < mask.size
    np.testing.assert_allclose(got, a + (c - a) * mask, rtol=1e-12, atol=1e-15)


def test_consensus() -> None:
    base, models = trio((9, 7))
    lambdas = [0.4, 0.5, 0.6]
    got = run("consensus", models, base, [{"lambda": x} for x in lambdas], k=2, alpha=0.7)
    d = [m - base for m in models]
    total = sum(d)
    votes = sum((np.abs(x) >= lam * np.abs(total - x)).astype(float) for x, lam in zip(d, lambdas))
    np.testing.assert_allclose(got, base + 0.7 * total * (votes >= 2), rtol=1e-12, atol=1e-15)
    everything = run("consensus", models, base, [{}] * 3, k=0)
    np.testing.assert_allclose(everything, base + total, rtol=1e-12)


def test_tsv_against_numpy_svd() -> None:
    base, models = trio((8, 6))
    got = run("tsv", models, base, [{}] * 3, rank_fraction=0.5, **{"lambda": 0.9})
    r = int(0.5 * 6 / 3)
    us, ss, vs = [], [], []
    for m in models:
        u, s, vh = np.linalg.svd(m - base, full_matrices=False)
        us.append(u[:, :r])
        ss.append(s[:r])
        vs.append(vh[:r].T)

    def polar(x: np.ndarray) -> np.ndarray:
        p, _, qh = np.linalg.svd(x, full_matrices=False)
        return p @ qh

    rebuilt = polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ polar(np.hstack(vs)).T
    np.testing.assert_allclose(got, base + 0.9 * rebuilt, rtol=1e-9, atol=1e-12)
    vector = run("tsv", [m[0] for m in models], base[0], [{}] * 3)
    np.testing.assert_allclose(vector, base[0] + sum(m[0] - base[0] for m in models), rtol=1e-12)


def test_tsv_of_orthogonal_task_vectors_is_task_arithmetic() -> None:
    q, _ = np.linalg.qr(RNG.normal(size=(6, 6)))
    p, _ = np.linalg.qr(RNG.normal(size=(5, 5)))
    base = RNG.normal(size=(6, 5))
    deltas = [
        3.0 * np.outer(q[:, i], p[:, i]) + 1.0 * np.outer(q[:, i + 2], p[:, i + 2])
        for i in range(2)
    ]
    got = run("tsv", [base + d for d in deltas], base, [{}, {}])
    np.testing.assert_allclose(got, base + sum(deltas), rtol=1e-9, atol=1e-12)


def test_lines_scales_task_vectors_by_depth(
    family: dict[str, Path], tmp_path: Path, runner: CliRunner
) -> None:
    import torch
    from safetensors.torch import load_file

    recipe = write(
        tmp_path / "r.yaml",
        f"merge_method: task_arithmetic\nbase_model: {family['base']}\npost: {{lines: {{alpha: 0.2, beta: 0.6}}}}\n"
        f"models:\n  - model: {family['a']}\n    parameters: {{weight: 1.0}}\n",
    )
    code, _, err = invoke(runner, "run", str(recipe), "-o", str(tmp_path / "out"), "--quiet")
    assert code == 0, err
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    b, a = (
        load_file(str(family["base"] / "model.safetensors")),
        load_file(str(family["a"] / "model.safetensors")),
    )
    for name, scale in [
        ("model.layers.0.mlp.up_proj.weight", 0.2),
        ("model.layers.1.mlp.up_proj.weight", 0.5),
        ("model.layers.2.mlp.up_proj.weight", 0.8),
        ("model.embed_tokens.weight", 0.2),
        ("lm_head.weight", 0.2),
    ]:
        expected = b[name].double() + scale * (a[name].double() - b[name].double())
        assert (got[name].double() - expected).abs().max() <= 8 * torch.finfo(torch.float32).eps * (
            b[name].abs().max() + 1
        )
    bad = write(
        tmp_path / "bad.yaml",
        f"merge_method: linear\npost: {{lines: {{alpha: 1, beta: 0}}}}\nmodels:\n  - model: {family['a']}\n    parameters: {{weight: 1}}\n",
    )
    code, _, err = invoke(runner, "validate", str(bad))
    assert (
        code == 2
        and "post.lines: LiNeS scales task vectors, but method `linear` takes no base model" in err
    )


@pytest.mark.parametrize("ratio", [0.2, 1.0])
def test_pcb_follows_the_paper(ratio: float) -> None:
    base, models = trio((5, 8))
    got = run("pcb", models, base, [{}] * 3, ratio=ratio, **{"lambda": 0.8})
    d = np.stack([(m - base).reshape(-1) for m in models])
    n, size = d.shape

    def minmax(x: np.ndarray) -> np.ndarray:
        low, high = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
        return (x - low) / np.where(high == low, 1, high - low)

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    intra = softmax(n * minmax(d * d))
    inter = np.stack([softmax(minmax(d[i] * d)).sum(axis=0) for i in range(n)])
    beta = intra * inter
    k = max(1, math.floor(ratio * size + 1e-9))
    kept = np.zeros_like(beta)
    for i in range(n):
        top = np.argsort(-beta[i], kind="stable")[:k]
        kept[i, top] = beta[i, top]
    den = kept.sum(axis=0)
    merged = (kept * d).sum(axis=0) / np.where(den == 0, 1, den)
    np.testing.assert_allclose(got, base + 0.8 * merged.reshape(base.shape), rtol=1e-10, atol=1e-13)


def np_rank(scores: np.ndarray) -> np.ndarray:
    order = np.argsort(scores, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(
        ranks, order, np.arange(scores.shape[-1])[None, :].repeat(scores.shape[0], 0), axis=-1
    )
    return ranks / max(scores.shape[-1] - 1, 1)


def np_calibrate(scores: np.ndarray, t: float, s: float) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=0, keepdims=True))
    shares = e / e.sum(axis=0, keepdims=True)
    return np.where(shares > t * shares.mean(), s, shares)


def test_widen_matrix_and_vector() -> None:
    base, models = trio((6, 5))
    got = run("widen", models, base, [{}] * 3, t=1.0, s=1.0)
    stacked = np.stack(models)
    mag = np.abs(np.linalg.norm(stacked, axis=1) - np.linalg.norm(base, axis=0))
    cos = (stacked * base).sum(axis=1) / (
        np.linalg.norm(stacked, axis=1) * np.linalg.norm(base, axis=0)
    )
    w = (np_calibrate(np_rank(mag), 1.0, 1.0) + np_calibrate(np_rank(1 - cos), 1.0, 1.0)) / 2
    expected = base + (w[:, None, :] * (stacked - base)).sum(axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13)
    vec_base, vecs = base[0], [m[0] for m in models]
    got_vec = run("widen", vecs, vec_base, [{}] * 3, t=1.2, s=0.9)
    d = np.stack(vecs) - vec_base
    np.testing.assert_allclose(
        got_vec, vec_base + (np_calibrate(np_rank(np.abs(d)), 1.2, 0.9) * d).sum(axis=0), rtol=1e-10
    )


def test_karcher_follows_mergekits_steps() -> None:
    """mergekit 0.1.5's Karcher iteration, worked in float64 here: start at the normalised
    mean of the unit vectors, one exponential-map step per iteration, the mean norm as the
    scale; an input of norm <= `tol` leaves the direction but not the scale."""
    vectors = [RNG.normal(size=12) + 1.0 for _ in range(3)]
    vectors.append(vectors[0] * 3.0)  # same direction as the first: its unit vector repeats
    norms = [np.linalg.norm(v) for v in vectors]
    units = [v / n for v, n in zip(vectors, norms)]
    mean = sum(units) / 4
    mean /= np.linalg.norm(mean)
    for _ in range(2):
        tangent = np.zeros_like(mean)
        for u in units:
            cos = np.clip(mean @ u, -1, 1)
            theta = np.arccos(cos)
            tangent += theta / np.sin(theta) / 4 * (u - cos * mean)
        size = np.linalg.norm(tangent)
        mean = np.cos(size) * mean + np.sin(size) * tangent / size
        mean /= np.linalg.norm(mean)
    expected = np.mean(norms) * mean
    got = run("karcher", vectors, None, [{}] * 4, max_iter=2, tol=1e-5)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    # a tensor of norm <= tol leaves the mean but not the scale
    small = [vectors[0], vectors[1], np.full(12, 1e-8)]
    two = run("karcher", small, None, [{}] * 3, max_iter=50, tol=1e-5)
    pair = run("karcher", small[:2], None, [{}] * 2, max_iter=50, tol=1e-5)
    scale = sum(np.linalg.norm(v) for v in small) / 3
    np.testing.assert_allclose(two, pair / np.linalg.norm(pair) * scale, rtol=1e-12)


def test_multislerp_of_cancelling_unit_vectors() -> None:
    """Antipodal inputs with balancing weights: two interpolate linearly, three refuse."""
    x = RNG.normal(size=(4, 3))
    got = run("multislerp", [x, -2 * x], None, [{"weight": 1.0}, {"weight": 1.0}])
    np.testing.assert_allclose(got, 0.5 * x + 0.5 * (-2 * x), rtol=1e-12)
    per = [{"weight": 1.0}, {"weight": 1.0}, {"weight": 2.0}]
    with pytest.raises(ValueError, match="the weighted unit vectors cancel"):
        run("multislerp", [x, 3 * x, -x], None, per)
