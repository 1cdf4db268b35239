"""The plain math of every method and kernel, as the papers write it (float64, no tricks).

Nothing here is fast and nothing here is used by a merge: each function is the expression a
method or a fast kernel is tested equal to (`tests/methods/test_reference.py`), on random
inputs with ties, zeros and subnormals. Random methods take their keep masks as inputs:
the draws are the Bernoulli kernel's job, whose own reference is `bernoulli_keep`.
One module per family: `kernels`, `task_vectors`, `geometry`, `research`.
"""

from mergecli.methods.reference.geometry import (
    PARALLEL,
    arcee_fusion,
    cosine,
    karcher,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    slerp_flat,
)
from mergecli.methods.reference.kernels import (
    bernoulli_keep,
    keep_count,
    ties_merge,
    top_k_mask,
    total,
)
from mergecli.methods.reference.research import consensus, pcb, tsv, widen
from mergecli.methods.reference.task_vectors import (
    breadcrumbs,
    dare,
    della,
    della_probabilities,
    linear,
    mwa,
    passthrough,
    ram,
    sce,
    task_arithmetic,
    ties,
    trim,
)

__all__ = [
    "PARALLEL",
    "arcee_fusion",
    "bernoulli_keep",
    "breadcrumbs",
    "consensus",
    "cosine",
    "dare",
    "della",
    "della_probabilities",
    "karcher",
    "keep_count",
    "linear",
    "model_stock",
    "multislerp",
    "mwa",
    "nearswap",
    "nuslerp",
    "passthrough",
    "pcb",
    "ram",
    "sce",
    "slerp_flat",
    "task_arithmetic",
    "ties",
    "ties_merge",
    "top_k_mask",
    "total",
    "trim",
    "tsv",
    "widen",
]
