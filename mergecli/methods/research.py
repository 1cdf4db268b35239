"""Methods from the research literature that mergekit lacks: Consensus (TALL masks), TSV."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

import torch

from mergecli.methods.kernels.selection import select_mask
from mergecli.methods.kernels.sums import group_sums, row_max, row_sums
from mergecli.methods.kernels.topk import keep_count
from mergecli.methods.spec import BlockSums, MergeArgs, MethodSpec, ParamSpec, TensorFacts
from mergecli.methods.task_vectors import LAMBDA


def consensus(args: MergeArgs) -> torch.Tensor:
    """Consensus merging (Wang et al. 2024, "Localizing Task Information for Improved Model
    Merging and Compression", eq. 3-5): d_MTL = sum_i d_i; task mask
    m_i = [|d_i| >= lambda_i |d_MTL - d_i|]; keep entries where at least k masks agree;
    result B + alpha * d_MTL * consensus mask."""
    assert args.base is not None
    total = torch.stack([t - args.base for t in args.tensors]).sum(0)
    votes = torch.stack(tall_masks(args)).sum(0)
    keep = votes >= int(args.params["k"])
    return args.base + float(args.params["alpha"]) * total * keep


def tall_masks(args: MergeArgs) -> list[torch.Tensor]:
    """Per-task TALL masks m_i = [|d_i| >= lambda_i |d_MTL - d_i|] (bool tensors)."""
    assert args.base is not None
    deltas = [t - args.base for t in args.tensors]
    total = torch.stack(deltas).sum(0)
    return [
        delta.abs() >= float(params["lambda"]) * (total - delta).abs()
        for delta, params in zip(deltas, args.per_model)
    ]


def _mask_folder_check(params: Mapping[str, Any], model: Mapping[str, Any]) -> str | None:
    folder = params.get("save_masks")
    if folder is None:
        return None
    parts = PurePosixPath(str(folder)).parts
    if not parts or PurePosixPath(folder).is_absolute() or ".." in parts or "\\" in folder:
        return f"save_masks {folder!r} must be a relative folder inside the output (no `..`)"
    if parts[0] == "." or "." in parts[0][1:] or parts[0].startswith("mergecli_"):
        return (
            f"save_masks {folder!r} would collide with the output's own files; "
            "use a plain folder name such as `masks`"
        )
    return None


def pcb(args: MergeArgs) -> torch.Tensor:
    """PCB-Merging (Du et al. 2024, "Parameter Competition Balancing for Model Merging").

    With task vectors d_i over the tensor and N models:
    intra-balancing b_intra,i = Softmax(N * Norm(d_i * d_i)) (eq. 2), inter-balancing
    b_inter,i = sum_j Softmax(Norm(d_i * d_j)) (eq. 3), b_i = b_intra,i * b_inter,i (eq. 4);
    keep the top `ratio` fraction of each b_i (eq. 5-6); merged m = sum_i b_i d_i / sum_i b_i
    element-wise (eq. 7, 0 where nothing is kept); result B + lambda m (eq. 8). Norm is the
    min-max scaling of the authors' code over the tensor's entries, softmax runs over them:
    the extremes (`_pcb_peaks`) and the softmax denominators (`_pcb_denominators`) come
    from statistics passes over the whole tensor, so a block of rows can be merged.
    Where mergecli's spec line differs (exp instead of softmax, a tanh inter-balance) this
    follows the paper, as the spec asks.
    """
    assert args.base is not None
    if args.base.numel() == 0:
        return args.base.clone()  # no entry to balance
    deltas = [t - args.base for t in args.tensors]
    kept = [
        balance * select_mask(balance, chosen[0])
        for balance, chosen in zip(_pcb_balance(args), args.whole.ranked)
    ]
    divisor = torch.stack(kept).sum(0)
    merged = torch.zeros_like(args.base)
    for share, delta in zip(kept, deltas):
        merged.add_(share * delta)
    merged = merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return args.base + float(args.params["lambda"]) * merged


def _products(args: MergeArgs) -> list[list[torch.Tensor]]:
    """d_i * d_j for each j >= i."""
    assert args.base is not None
    deltas = [t - args.base for t in args.tensors]
    return [[d * e for e in deltas[i:]] for i, d in enumerate(deltas)]


def _pcb_peaks(args: MergeArgs) -> BlockSums:
    """Per model i, per-row maxima of d_i d_j and of -d_i d_j for each j >= i."""
    peaks = [[m for p in row for m in (row_max(p), row_max(-p))] for row in _products(args)]
    return BlockSums([[] for _ in args.tensors], peaks=peaks)


def _softmax_terms(
    args: MergeArgs, products: list[list[torch.Tensor]], scale: float
) -> list[list[torch.Tensor]]:
    """exp(f * Norm(d_i d_j) - its maximum) for each j >= i, f = `scale` on the diagonal
    (j = i) and 1 elsewhere: the softmax numerators; Norm by the extremes of `_pcb_peaks`."""
    peaks = args.whole.priors[0].peaks
    terms = []
    for i, row in enumerate(products):
        out = []
        for j, product in enumerate(row):
            high, low = peaks[i][2 * j], -peaks[i][2 * j + 1]
            span = high - low if high > low else 1.0
            factor = scale if j == 0 else 1.0
            shift = factor if high > low else 0.0
            out.append(product.sub(low).mul_(factor / span).sub_(shift).exp_())
        terms.append(out)
    return terms


def _pcb_denominators(args: MergeArgs) -> BlockSums:
    """Per model i, per-row sums (float64) of its intra-balance numerators, then of the
    inter-balance numerators of each j >= i."""
    products = _products(args)
    intra = _softmax_terms(args, [row[:1] for row in products], float(len(products)))
    inter = _softmax_terms(args, products, 1.0)
    return BlockSums([[row_sums(a[0]), *(row_sums(t) for t in b)] for a, b in zip(intra, inter)])


def _pcb_balance(args: MergeArgs) -> list[torch.Tensor]:
    """Each model's balance b_i = b_intra,i * b_inter,i (from both statistics passes)."""
    products = _products(args)
    n = len(products)
    sums = args.whole.priors[1].sums
    intra = _softmax_terms(args, [row[:1] for row in products], float(n))
    inter = _softmax_terms(args, products, 1.0)
    balances = []
    for i in range(n):
        total = torch.zeros_like(intra[i][0])
        for j in range(n):
            low, high = min(i, j), max(i, j)
            total.add_(inter[low][high - low] / sums[low][1 + high - low])
        balances.append(intra[i][0].div_(sums[i][0]).mul_(total))
    return balances


def _pcb_counts(params: Mapping[str, Any], numel: int) -> list[int]:
    return [keep_count(numel, float(params["ratio"]))]


def _rank_normalise(scores: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dim scaled to [0, 1] (ties by position; one entry gives 0)."""
    count = scores.shape[-1]
    order = torch.argsort(scores, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(count, device=order.device).expand_as(order))
    return ranks.to(scores.dtype) / max(count - 1, 1)


def _calibrate(scores: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """Softmax across models (dim 0); shares above t times the mean share become s."""
    shares = torch.softmax(scores, dim=0)
    return torch.where(shares > t * shares.mean(), torch.full_like(shares, s), shares)


def widen(args: MergeArgs) -> torch.Tensor:
    """WIDEN (Yu et al. 2024, "Extend Model Merging from Fine-Tuned to Pre-Trained Large
    Language Models via Weight Disentanglement"): per column, split weights into magnitude
    (column norm) and direction; score each model by |m_i - m_B| and 1 - cos(D_i, D_B),
    rank-normalise within the model, softmax across models, calibrate shares above
    t * mean to s; the column weight is the mean of both scores; result B + sum_i w_i d_i.
    Column norms and dot products are sums over every row (`_widen_columns`, so a block of
    rows can be merged). 1-D tensors use |d_i| as the only score, per entry."""
    assert args.base is not None
    base = args.base
    t, s = float(args.params["t"]), float(args.params["s"])
    deltas = torch.stack([w - base for w in args.tensors])
    if base.dim() != 2:
        weights = _calibrate(_rank_normalise(deltas.abs().reshape(len(deltas), -1)), t, s)
        return base + (weights.reshape(deltas.shape) * deltas).sum(0)
    columns = args.whole.grouped
    base_norm = columns[0][2].sqrt()
    norms = torch.stack([model[0] for model in columns]).sqrt()
    dots = torch.stack([model[1] for model in columns])
    cos = dots / (norms * base_norm).clamp(min=1e-12)  # cosine_similarity's eps
    magnitude = _calibrate(_rank_normalise((norms - base_norm).abs()), t, s)
    direction = _calibrate(_rank_normalise(1 - cos), t, s)
    weights = ((magnitude + direction) / 2).to(deltas.device, deltas.dtype).unsqueeze(1)
    return base + (weights * deltas).sum(0)


WIDEN_ROWS = 64  # rows per partial column sum


def _widen_columns(args: MergeArgs) -> BlockSums:
    """Per model, sums over rows of W_i^2 and W_i B per column (model 0 also B^2), one
    partial per WIDEN_ROWS rows (`group_sums`); nothing for tensors that are not 2-D."""
    assert args.base is not None
    base = args.base
    if base.dim() != 2:
        return BlockSums([[] for _ in args.tensors])
    wide = base.double()
    grouped = [
        [group_sums(w.double().square(), WIDEN_ROWS), group_sums(w.double() * wide, WIDEN_ROWS)]
        for w in args.tensors
    ]
    grouped[0].append(group_sums(wide.square(), WIDEN_ROWS))
    return BlockSums([[] for _ in args.tensors], grouped=grouped)


def _orthogonalise(stacked: torch.Tensor) -> torch.Tensor:
    """The closest matrix with orthonormal columns: P Q^T from the SVD P S Q^T."""
    p, _, qh = torch.linalg.svd(stacked, full_matrices=False)
    result: torch.Tensor = p @ qh
    return result


def tsv(args: MergeArgs) -> torch.Tensor:
    """Task Singular Vectors (Gargiulo et al. 2025, TSV-Merge, eq. 6-8): keep the top
    r = max(1, floor(rank_fraction * min(shape) / n)) singular triplets of each task
    vector, orthogonalise the concatenated U and V, rebuild U_perp diag(S) V_perp^T;
    result B + lambda * that. A tall matrix (rows >= columns) is merged from its task
    vectors' Gram matrices (`_tsv_grams`, summed over row blocks): the merge is
    sum_i d_i A_i with A_i from `tsv_mixes`. Tensors that are not 2-D use task arithmetic."""
    assert args.base is not None
    deltas = [t - args.base for t in args.tensors]
    scale = float(args.params["lambda"])
    if args.base.dim() != 2:
        return args.base + scale * torch.stack(deltas).sum(0)
    if args.base.numel() == 0:
        return args.base.clone()  # no singular values
    rank = _tsv_rank(args.params, args.shape, len(deltas))
    if not _tall(args.shape):
        return args.base + scale * _tsv_direct(deltas, rank)
    merged = torch.zeros_like(args.base)
    for delta, mix in zip(deltas, args.whole.derived):
        merged.addmm_(delta, mix.to(delta.device, delta.dtype))
    return args.base + scale * merged


def _tsv_derive(
    params: Mapping[str, Any], shape: tuple[int, ...], facts: TensorFacts
) -> list[torch.Tensor] | None:
    """The mixing matrices of a tall matrix (`tsv_mixes`), once per tensor."""
    if not facts.grouped:
        return None
    return tsv_mixes(facts.grouped, _tsv_rank(params, shape, len(facts.grouped)))


def _tsv_rank(params: Mapping[str, Any], shape: tuple[int, ...], n: int) -> int:
    return max(1, int(float(params["rank_fraction"]) * min(shape) / n))


def _tall(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and shape[0] >= shape[1]


def _tsv_direct(deltas: list[torch.Tensor], rank: int) -> torch.Tensor:
    """TSV by the SVD of each whole task vector (wide matrices)."""
    us, ss, vs = [], [], []
    for delta in deltas:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        us.append(u[:, :rank])
        ss.append(s[:rank])
        vs.append(vh[:rank].T)
    u_perp = _orthogonalise(torch.cat(us, dim=1))
    v_perp = _orthogonalise(torch.cat(vs, dim=1))
    return u_perp @ torch.diag(torch.cat(ss)) @ v_perp.T


TSV_ROWS = 1024  # rows per partial Gram matrix
NEGLIGIBLE = 1e-12  # eigenvalues below this fraction of the largest count as zero


def _tsv_grams(args: MergeArgs) -> BlockSums:
    """Per task i, the partial Gram matrices d_i^T d_j (j >= i) of each TSV_ROWS rows of
    a tall matrix (float64); nothing for other tensors."""
    assert args.base is not None
    if args.base.dim() != 2 or not _tall(args.shape):
        return BlockSums([[] for _ in args.tensors])
    wide = [(t - args.base).double() for t in args.tensors]
    grouped = [[_group_grams(d, e) for e in wide[i:]] for i, d in enumerate(wide)]
    return BlockSums([[] for _ in args.tensors], grouped=grouped)


def _group_grams(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    parts = [a[s : s + TSV_ROWS].T @ b[s : s + TSV_ROWS] for s in range(0, a.shape[0], TSV_ROWS)]
    if not parts:
        return torch.zeros((0, a.shape[1], b.shape[1]), dtype=torch.float64)
    return torch.stack(parts)


def tsv_mixes(grams: Sequence[Sequence[torch.Tensor]], rank: int) -> list[torch.Tensor]:
    """The matrices A_i with U_perp diag(S) V_perp^T = sum_i d_i A_i, from the task vectors'
    Gram matrices C_ij = d_i^T d_j (`grams[i][j - i]`): C_ii = V_i S_i^2 V_i^T gives the
    top-`rank` V_i and S_i, U_i = d_i V_i / S_i; U_cat^T U_cat = Q L Q^T gives the polar
    factor U_perp = U_cat Q L^(-1/2) Q^T. Components of zero singular value (a task vector
    of lower rank) are left out; so are directions in which the U_i coincide."""
    n = len(grams)

    def gram(i: int, j: int) -> torch.Tensor:
        return grams[i][j - i] if j >= i else grams[j][i - j].T

    vs, ss = [], []
    for i in range(n):
        values, vectors = torch.linalg.eigh(gram(i, i))
        top = values.flip(0)[:rank].clamp(min=0)
        keep = top > NEGLIGIBLE * max(float(top[0]), 0.0) if top.numel() else top > 0
        vs.append(vectors.flip(1)[:, :rank][:, keep])
        ss.append(top[keep].sqrt())
    if not any(s.numel() for s in ss):  # every task vector is zero
        return [torch.zeros_like(gram(i, i)) for i in range(n)]
    whiten = [v / s for v, s in zip(vs, ss)]  # V_i S_i^-1
    blocks = [[whiten[i].T @ gram(i, j) @ whiten[j] for j in range(n)] for i in range(n)]
    values, q = torch.linalg.eigh(torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0))
    inverse_root = torch.where(
        values > NEGLIGIBLE * float(values.max().clamp(min=0)),
        values.clamp(min=NEGLIGIBLE).rsqrt(),
        torch.zeros_like(values),
    )
    polar = (q * inverse_root) @ q.T
    v_perp = _orthogonalise(torch.cat(vs, dim=1))
    rebuild = polar @ torch.diag(torch.cat(ss)) @ v_perp.T
    starts = [sum(s.numel() for s in ss[:i]) for i in range(n + 1)]
    return [whiten[i] @ rebuild[starts[i] : starts[i + 1]] for i in range(n)]


SPECS = (
    MethodSpec(
        "consensus",
        consensus,
        "Keep the summed task vector only where at least k task masks (TALL masks) agree.",
        (
            ParamSpec(
                "lambda",
                "float",
                "model",
                "mask threshold of this task (0.4-0.6 typical)",
                default=0.5,
                minimum=0.0,
            ),
            ParamSpec(
                "k", "int", "global", "number of task masks that must agree", default=2, minimum=0
            ),
            ParamSpec("alpha", "float", "global", "scale of the merged task vector", default=1.0),
            ParamSpec(
                "save_masks",
                "str",
                "global",
                "folder inside the output for the bit-packed per-task masks (off when unset)",
            ),
        ),
        needs_base=True,
        paper="https://arxiv.org/abs/2405.07813",
        masks=tall_masks,
        check=_mask_folder_check,
        elementwise=True,
    ),
    MethodSpec(
        "tsv",
        tsv,
        "Task Singular Vectors: low-rank task vectors, decorrelated by orthogonalisation.",
        (
            ParamSpec(
                "rank_fraction",
                "float",
                "global",
                "fraction of the rank shared by all tasks",
                default=1.0,
                minimum=0.0,
                maximum=1.0,
                exclusive_minimum=True,
            ),
            LAMBDA,
        ),
        needs_base=True,
        paper="https://arxiv.org/abs/2412.00081",
        sums=_tsv_grams,
        derive=_tsv_derive,
        row_group=TSV_ROWS,
        whole_when=lambda params, shape: not _tall(shape),
    ),
    MethodSpec(
        "pcb",
        pcb,
        "Parameter Competition Balancing: weight entries by intra- and inter-task balance.",
        (
            ParamSpec(
                "ratio",
                "float",
                "global",
                "fraction of entries each task keeps",
                default=0.1,
                minimum=0.0,
                maximum=1.0,
                exclusive_minimum=True,
            ),
            LAMBDA,
        ),
        needs_base=True,
        paper="https://arxiv.org/abs/2410.02396",
        priors=(_pcb_peaks, _pcb_denominators),
        score=_pcb_balance,
        score_topk=_pcb_counts,
    ),
    MethodSpec(
        "widen",
        widen,
        "Weight each model per column by its magnitude and direction change (WIDEN).",
        (
            ParamSpec(
                "t",
                "float",
                "global",
                "shares above t times the mean share are calibrated",
                default=1.0,
                minimum=0.0,
            ),
            ParamSpec(
                "s", "float", "global", "the value calibrated shares are set to", default=1.0
            ),
        ),
        needs_base=True,
        min_models=2,
        paper="https://arxiv.org/abs/2408.03092",
        sums=_widen_columns,
        row_group=WIDEN_ROWS,
    ),
)
