"""Spectral measures of feature matrices: singular values, effective and stable rank, top/tail
eigenspace projections, feature capture by forward hooks, t-SNE, and a per-epoch rank tracker.

A feature batch (B, C, H, W) is read as the matrix A of shape (B, D = C*H*W), one row per
sample. Spectra are computed in float64 through the Gram matrix of the smaller side
(A A^T when D >= B), which is exact for the large singular values and puts a floor of about
1e-8 * s_max under the small ones: far below the float32 precision of the features themselves.

Centring: ranks are of the rows as they are (uncentred) unless `center=True`. Uncentred, the
mean row is a direction like any other, so a shift shared by all rows (a trigger that only
moves the mean) lowers the effective rank and the stable rank without changing the spread of
the rows; `center=True` subtracts the column mean over rows first and measures that spread
(as PCA does). The centred spectrum comes from the same Gram matrix, centred on both sides;
its values below RANK_TOL * ||A||_F (round-off left by subtracting a large mean) count as zero,
so rows equal up to round-off have centred rank 0. `RankTracker` records both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from eglib.data import check_paired_images, check_uint8_images, to_float
from eglib.evaluate import EVAL_MODES, evaluating, even_batches, guards_eval_mode
from eglib.models.base import StagedNet
from eglib.params import check_bool, check_choice, check_int

# singular values below RANK_TOL * s_max are round-off (of float32 features, or of the Gram route)
RANK_TOL = 1e-6
# a top-k basis of a matrix whose both sides exceed this comes from a randomized SVD: the exact
# route's eigh of a 6272 x 6272 Gram (one label of full Fashion-MNIST at layer1) takes minutes
EXACT_MAX_SIDE = 2048
OVERSAMPLE = 10  # extra random directions of the randomized SVD (Halko et al., 2011)
POWER_ITERATIONS = 6  # subspace iterations: error ~ (s_{k+p+1} / s_k)^(2 * 6 + 1)


def flatten_rows(A: torch.Tensor) -> torch.Tensor:
    """View a (B, ...) tensor as the (B, D) matrix of its flattened rows (ValueError if 1-D)."""
    if A.dim() < 2 or A.numel() == 0:
        raise ValueError(
            f"expected a non-empty (B, ...) tensor with at least 2 dims, got shape {tuple(A.shape)}"
        )
    return A.reshape(A.shape[0], -1)


def require_finite(A: torch.Tensor, what: str = "input") -> None:
    """ValueError naming how many entries of `A` are NaN / inf, if any."""
    if not bool(torch.isfinite(A).all()):
        n_nan = int(torch.isnan(A).sum())
        n_inf = int(torch.isinf(A).sum())
        raise ValueError(
            f"{what} has non-finite values: {n_nan} NaN and {n_inf} inf among {A.numel()} entries"
        )


def gram_eigh(
    A: torch.Tensor, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values s (descending) and left singular vectors U of a (B, D) matrix, float64.

    Computed as the eigendecomposition (float64) of the B x B Gram matrix A A^T = U diag(s^2)
    U^T, accumulated in `dtype`, with no autograd (inputs are detached). A float64 Gram
    resolves s down to ~1e-8 * s_max, a float32 one only to ~1e-3 * s_max (its U_k for the
    large s are as good). Non-finite input raises ValueError.
    """
    with torch.no_grad(), torch.autocast(A.device.type, enabled=False):
        M = A.detach().to(dtype)
        gram = M @ M.T
        if not bool(torch.isfinite(gram.diagonal()).all()):  # any NaN / inf in a row shows here
            require_finite(A)
        lam, U = torch.linalg.eigh(gram.to(torch.float64))
    return lam.flip(0).clamp_min(0).sqrt(), U.flip(1)


def singular_values(A: torch.Tensor, *, center: bool = False) -> torch.Tensor:
    """Singular values (descending, float64, length min(B, D)) of a (B, ...) tensor's rows.

    `center=True`: of the rows minus their mean (see the module docstring on centring).
    """
    if check_bool("center", center):
        return uncentred_and_centred_spectra(A)[1]
    M = flatten_rows(A)
    if M.shape[1] >= M.shape[0]:
        return gram_eigh(M)[0]
    return gram_eigh(M.T)[0]


def uncentred_and_centred_spectra(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending, float64) of a (B, ...) tensor's rows, and of the rows
    minus their mean, from one float64 Gram matrix of the smaller side.

    Centring the Gram costs O(min(B, D)^2) instead of a second O(B * D * min(B, D)) product:
    (I - 11^T/B) A A^T (I - 11^T/B) when D >= B, else A^T A - B m m^T (m: the mean row).
    Centred values below RANK_TOL * ||A||_F are round-off and come out as zero.
    """
    M = flatten_rows(A)
    with torch.no_grad(), torch.autocast(M.device.type, enabled=False):
        M = M.detach().to(torch.float64)
        if M.shape[1] >= M.shape[0]:
            gram = M @ M.T
            row_mean = gram.mean(dim=1, keepdim=True)
            centred = gram - row_mean - row_mean.T + gram.mean()
        else:
            gram = M.T @ M
            mean = M.mean(dim=0, keepdim=True)
            centred = gram - M.shape[0] * (mean.T @ mean)
        if not bool(torch.isfinite(gram.diagonal()).all()):  # any NaN / inf in a row shows here
            require_finite(M)
        s = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()
        s_centred = torch.linalg.eigvalsh(centred).flip(0).clamp_min(0).sqrt()
        floor = RANK_TOL * gram.diagonal().sum().sqrt()
    return s, s_centred * (s_centred > floor)


def spectrum_ranks(A: torch.Tensor) -> dict[str, float]:
    """Effective and stable rank of a (B, ...) tensor's rows, uncentred and centred, from one
    Gram matrix (`uncentred_and_centred_spectra`): keys erank, srank, erank_centred,
    srank_centred."""
    s, s_centred = uncentred_and_centred_spectra(A)
    return {
        "erank": effective_rank_of_spectrum(s),
        "srank": stable_rank_of_spectrum(s),
        "erank_centred": effective_rank_of_spectrum(s_centred),
        "srank_centred": stable_rank_of_spectrum(s_centred),
    }


def _check_spectrum(s: torch.Tensor) -> None:
    """ValueError unless `s` is a non-empty 1-D tensor of finite, non-negative values."""
    if not isinstance(s, torch.Tensor) or s.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of singular values, got {s!r}")
    if s.numel() == 0:
        raise ValueError(
            "the spectrum is empty; a rank needs at least one singular value (an empty "
            "matrix has no rank)"
        )
    require_finite(s, "spectrum")
    if bool((s < 0).any()):
        raise ValueError(f"singular values must be >= 0; got {int((s < 0).sum())} negative")


def effective_rank_of_spectrum(s: torch.Tensor) -> float:
    """Effective rank from singular values `s`: exp(entropy of s / sum(s)); 0 if all zero.

    ValueError for an empty, non-1-D, negative or non-finite `s`.
    """
    _check_spectrum(s)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank_of_spectrum(s: torch.Tensor) -> float:
    """Stable rank from singular values `s`: sum(s^2) / max(s)^2; 0 if all zero.

    ValueError for an empty, non-1-D, negative or non-finite `s`.
    """
    _check_spectrum(s)
    top = s.max()
    if top <= 0:
        return 0.0
    return float(s.square().sum() / top.square())


def effective_rank(A: torch.Tensor, *, center: bool = False) -> float:
    """Roy & Vetterli effective rank of a (B, ...) tensor's rows: exp of the entropy of s/sum(s).

    Between 1 (rank one) and min(B, D) (all singular values equal); 0 for a zero matrix;
    invariant to scaling A. It grows with the number of rows: compare groups at equal counts
    (see `equal_count_subsample`). Uncentred by default: a shift shared by all rows lowers
    it. `center=True` subtracts the column mean over rows first (0 when all rows are equal).
    """
    return effective_rank_of_spectrum(singular_values(A, center=center))


def stable_rank(A: torch.Tensor, *, center: bool = False) -> float:
    """Stable rank ||A||_F^2 / s_max^2 of a (B, ...) tensor's rows (0 for a zero matrix).

    Uncentred by default (a large mean row makes s_max large and the stable rank near 1);
    `center=True` subtracts the column mean over rows first (0 when all rows are equal).
    """
    return stable_rank_of_spectrum(singular_values(A, center=center))


def top_right_basis(A: torch.Tensor, k: int, *, center: bool = False) -> torch.Tensor:
    """Top-k right singular vectors V_k (D, k, float64) of the rows of A (B, ...).

    `center=True` subtracts the column mean first (principal axes). Directions with a
    singular value below RANK_TOL * s_max (round-off; rank < k) come out as zero columns.
    When both sides exceed EXACT_MAX_SIDE and k is small beside them, V_k comes from a seeded
    randomized SVD (subspace iteration, `_randomized_top_basis`) instead of a full eigh.
    """
    M, k = _rows64(A, k, center)
    if min(M.shape) > EXACT_MAX_SIDE and k + OVERSAMPLE <= min(M.shape) // 4:
        require_finite(M)  # the exact route's gram_eigh checks; torch's QR/SVD would not say
        return _randomized_top_basis(M, k)
    if M.shape[1] < M.shape[0]:
        s, V = gram_eigh(M.T)
        return V[:, :k] * (s[:k] > RANK_TOL * s[0])
    s, U = gram_eigh(M)
    keep = s[:k] > RANK_TOL * s[0]
    return (M.T @ U[:, :k]) / torch.where(keep, s[:k], torch.ones_like(s[:k])) * keep


def _randomized_top_basis(M: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k right singular vectors (D, k) of M (B, D) by randomized subspace iteration
    (Halko, Martinsson & Tropp 2011, Alg. 4.4), seeded by a private generator (the global
    random state is untouched). Products with M^T are formed as (Y^T M)^T: on the CPU, BLAS'
    product of a transposed 5700 x 12544 float64 matrix with 11 columns was 7.5x slower, and
    `torch.svd_lowrank` (which forms it) spent 40 s per label of a full-scale layer1 score."""
    generator = torch.Generator(device=M.device).manual_seed(0)
    sketch = torch.randn(
        M.shape[1], k + OVERSAMPLE, generator=generator, dtype=M.dtype, device=M.device
    )
    Q = torch.linalg.qr(M @ sketch).Q
    for _ in range(POWER_ITERATIONS):
        Z = torch.linalg.qr((Q.mT @ M).mT).Q
        Q = torch.linalg.qr(M @ Z).Q
    _, s, Vh = torch.linalg.svd(Q.mT @ M, full_matrices=False)
    return Vh[:k].mT * (s[:k] > RANK_TOL * s[0])


def top_coordinates(A: torch.Tensor, k: int, *, center: bool = False) -> torch.Tensor:
    """The top-k right-singular coordinates A V_k (B, k, float64) of the rows of A (B, ...):
    `top_tail_projections`' first output, without forming the (B, D) tail."""
    M, k = _rows64(A, k, center)
    return M @ top_right_basis(M, k)


def top_tail_projections(
    A: torch.Tensor, k: int, *, center: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split rows into their top-k right-singular coordinates and the tail remainder.

    A: (B, ...) flattened to (B, D); V_k = `top_right_basis(A, k, center=center)`. Returns
    `top` = A V_k (B, k) and `tail` = A - A V_k V_k^T (B, D), both float64, so that
    top @ V_k^T + tail = A. With `center=True` the column mean is subtracted first (V_k are
    then the principal axes, as in PCA) and the identity holds for the centred A. Directions
    with a singular value below RANK_TOL * s_max (round-off; rank < k) get zero coordinates.
    """
    M, k = _rows64(A, k, center)
    V_k = top_right_basis(M, k)
    top = M @ V_k
    return top, M - top @ V_k.T


def _rows64(A: torch.Tensor, k: int, center: bool) -> tuple[torch.Tensor, int]:
    """A as a float64 (B, D) matrix, centred if asked, and k as an int; ValueError unless k is
    an integer (NumPy ones too, not a bool) in [1, min(B, D)]."""
    M = flatten_rows(A).to(torch.float64)
    k = check_int("k", k, 1, min(M.shape), numpy=True)
    return (M - M.mean(dim=0, keepdim=True) if check_bool("center", center) else M), k


def equal_count_subsample(
    sizes: Sequence[int], *, count: int | None = None, seed: int = 0
) -> list[torch.Tensor]:
    """Sorted row indices drawing the same number of rows from each group, seeded.

    sizes: the number of rows of each group; count: rows per group (default: the smallest
    group). Effective rank grows with the number of rows, so groups are compared this way.
    Sizes and count are integers (Python or NumPy; bools and floats are refused).
    """
    try:
        groups = [check_int("size", n, 1, numpy=True) for n in sizes]
    except (TypeError, ValueError):
        groups = []
    if not groups:
        shown = list(sizes) if isinstance(sizes, Sequence) else sizes
        raise ValueError(
            f"sizes={shown!r}; need at least one group, each an integer number of rows >= 1"
        )
    smallest = min(groups)
    chosen = smallest if count is None else check_int("count", count, 1, numpy=True)
    if chosen > smallest:
        raise ValueError(f"count={count!r}; must be in [1, smallest group = {smallest}]")
    generator = torch.Generator().manual_seed(seed)
    return [torch.sort(torch.randperm(n, generator=generator)[:chosen]).values for n in groups]


class _Captured(Exception):
    """Raised by the last capture hook of a batch to skip the rest of the forward pass."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (cpu if it has none)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def _stage_names(stages: Sequence[str]) -> list[str]:
    """The distinct stage names in order; ValueError unless a non-empty list of names (a bare
    str would otherwise be read as one stage per letter)."""
    if isinstance(stages, str):
        raise ValueError(f"stages={stages!r}; must be a list of stage names, e.g. [{stages!r}]")
    names = list(dict.fromkeys(stages)) if isinstance(stages, Sequence) else []
    if not names or not all(isinstance(name, str) and name for name in names):
        shown = list(stages) if isinstance(stages, Sequence) else stages
        raise ValueError(f"stages={shown!r}; must be a non-empty list of stage names (str)")
    return names


def capture_features(
    model: StagedNet,
    images_uint8: torch.Tensor,
    stages: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
    *,
    eval_mode: str = "running",
) -> dict[str, torch.Tensor]:
    """Features (float32, CPU, shape (N, C, H, W)) that the stage after each named stage sees
    ('penultimate': the map the classifier pools, see `StagedNet.feature_module`).

    Hooks `model.feature_module(name)` (the guard after a stage when there is one), runs
    the model in eval mode without gradients and restores each module's train/eval mode; the
    forward pass stops once every requested stage has been seen. `device` None: the model's
    device; otherwise the model is moved there. Unknown name -> KeyError listing the valid ones.

    Batches are near-equal, ceil(N / batch_size) of them (no tiny last batch), and the model's
    guards run with `eval_mode` ('running': per sample, from their running estimates, so the
    features do not depend on the batching; 'batch': each batch filtered as a whole), restored
    afterwards.
    """
    names = _stage_names(stages)
    check_uint8_images(images_uint8)
    batch_size = check_int("batch_size", batch_size, 1, numpy=True)
    check_choice("eval_mode", eval_mode, EVAL_MODES)
    modules = {name: model.feature_module(name) for name in names}
    dev = model_device(model) if device is None else torch.device(device)
    model.to(dev)
    current: dict[str, torch.Tensor] = {}
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook_for(name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            current[name] = output.detach().float().cpu()
            if len(current) == len(names):
                raise _Captured

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        with evaluating(model), guards_eval_mode(model, eval_mode):
            for batch in even_batches(images_uint8, batch_size):
                current.clear()
                try:
                    model(to_float(batch.to(dev)))
                except _Captured:
                    pass
                for name in names:
                    collected[name].append(current[name])
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in collected.items()}


def trigger_difference(
    model: StagedNet,
    clean_images: torch.Tensor,
    triggered_images: torch.Tensor,
    stages: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
    *,
    eval_mode: str = "running",
) -> dict[str, torch.Tensor]:
    """Trigger-induced feature change f(x + t) - f(x) per stage; row i of both inputs pairs up
    (batching and `eval_mode` as in `capture_features`)."""
    return {
        name: diff
        for name, (_, _, diff) in _paired_features(
            model, clean_images, triggered_images, stages, batch_size, device, eval_mode
        ).items()
    }


def _paired_features(
    model: StagedNet,
    clean_images: torch.Tensor,
    triggered_images: torch.Tensor,
    stages: Sequence[str],
    batch_size: int,
    device: str | torch.device | None,
    eval_mode: str = "running",
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per stage: (clean features, triggered features, their difference) for paired images."""
    check_paired_images(clean_images, triggered_images)
    clean = capture_features(model, clean_images, stages, batch_size, device, eval_mode=eval_mode)
    triggered = capture_features(
        model, triggered_images, stages, batch_size, device, eval_mode=eval_mode
    )
    return {name: (clean[name], triggered[name], triggered[name] - clean[name]) for name in clean}


def tsne_embed(
    X: torch.Tensor, *, max_points: int = 1000, seed: int = 0, perplexity: float = 30.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D t-SNE of the rows of X (N, ...): returns (indices used (n,), embedding (n, 2)).

    At most `max_points` rows, drawn with `seed` (sorted indices); rows are reduced to 50
    dims by PCA first when D > 50. Needs n > perplexity. Runs single-threaded (about 5-10 s
    for 1000 points on one CPU core).
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    M = flatten_rows(X)
    max_points = check_int("max_points", max_points, 2, numpy=True)
    if len(M) > max_points:
        indices = equal_count_subsample([len(M)], count=max_points, seed=seed)[0]
    else:
        indices = torch.arange(len(M))
    if not 0 < perplexity < len(indices):
        raise ValueError(
            f"perplexity={perplexity}; must be in (0, n) with n={len(indices)} points embedded"
        )
    data = M[indices].detach().to(torch.float32).cpu().numpy()
    if data.shape[1] > 50:
        dims = min(50, data.shape[0])
        data = PCA(n_components=dims, random_state=seed).fit_transform(data)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    with threadpool_limits(limits=1):  # sklearn's OpenMP threads crawl on a busy machine
        embedding = tsne.fit_transform(data.astype(np.float32))
    return indices, torch.from_numpy(np.ascontiguousarray(embedding, dtype=np.float32))


class RankTracker:
    """Training callback: effective and stable rank of clean, triggered and difference features.

    `clean_images` and `triggered_images` are uint8 (N, C, H, W) that pair up row by row
    (triggered[i] is clean[i] with the trigger). The same `n_samples` rows (seeded) are used
    at every epoch for all three groups, so the ranks are compared at equal counts (the count
    is recorded as `rank_samples`). Features are captured with the guards' running estimates
    (see `capture_features`). Adds, per stage: `erank_clean/<stage>`,
    `erank_triggered/<stage>`, `erank_diff/<stage>` (features of f(x + t) - f(x)) and the
    same three with `srank_` (stable rank), all uncentred; then the centred ranks (column mean
    over the rows subtracted first: blind to a shift of the mean) under
    `erank_centred_<group>/<stage>` and `srank_centred_<group>/<stage>`. Both come from one
    Gram matrix per group (`uncentred_and_centred_spectra`).
    """

    def __init__(
        self,
        clean_images: torch.Tensor,
        triggered_images: torch.Tensor,
        stages: Sequence[str],
        n_samples: int = 256,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        check_uint8_images(clean_images, "clean_images")
        check_uint8_images(triggered_images, "triggered_images")
        check_paired_images(clean_images, triggered_images)
        self.stages = tuple(_stage_names(stages))
        count = min(check_int("n_samples", n_samples, 2, numpy=True), len(clean_images))
        self.batch_size = check_int("batch_size", batch_size, 1, numpy=True)
        rows = equal_count_subsample([len(clean_images)], count=count, seed=seed)[0]
        self.clean = clean_images[rows]
        self.triggered = triggered_images[rows]
        self.n_samples = count

    def on_epoch_end(self, model: StagedNet, epoch: int, row: dict[str, float]) -> None:
        """Add twelve rank values per stage (and `rank_samples`) to the epoch's history row."""
        features = _paired_features(
            model, self.clean, self.triggered, self.stages, self.batch_size, None
        )
        row["rank_samples"] = float(self.n_samples)
        centred: dict[str, float] = {}  # after the uncentred keys: their columns keep their place
        for stage, groups in features.items():
            for group, feats in zip(("clean", "triggered", "diff"), groups, strict=True):
                for measure, value in spectrum_ranks(feats).items():
                    into = centred if measure.endswith("_centred") else row
                    into[f"{measure}_{group}/{stage}"] = value
        row.update(centred)
