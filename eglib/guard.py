"""EigenGuard: a plug-in layer that rescales the spectrum of a feature batch, and helpers that
place it after a named stage of a `StagedNet`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from eglib.evaluate import EVAL_MODES
from eglib.models.base import StagedNet
from eglib.params import check_float, check_int
from eglib.spectral import flatten_rows, gram_eigh, model_device, require_finite

RULES: tuple[str, ...] = ("kth", "mean", "damp", "remove")
# A float32 Gram's U_k is good to ~1e-7 * (s_1 / s_k)^2: below this s_k / s_1 use float64.
F32_GRAM_MIN_RATIO = 1e-2


def identity_reason(k: int, rule: str, top_scale: float, tail_scale: float) -> str | None:
    """Why a filter with these (in-range) settings is exactly the identity, else None.

    g(s_i) / s_i is 1 for every singular value exactly when the tail is left alone
    (tail_scale = 1) and the top k are too: rule 'kth' or 'mean' with k = 1 (s_1 set to s_1,
    resp. to the mean of {s_1}), or rule 'damp' with top_scale = 1 (any k). 'remove' never
    is; 'damp' with top_scale = tail_scale < 1 scales the whole batch by that factor, which
    is not the identity. The Gram route then computes A + U_k diag(0) U_k^T A = A exactly.
    """
    if tail_scale != 1:
        return None
    if rule in ("kth", "mean") and k == 1:
        what = "s_k" if rule == "kth" else "the mean of the top k"
        return (
            f"rule={rule!r} with k=1 sets s_1 to {what}, i.e. to s_1 itself, and "
            "tail_scale=1.0 leaves the tail; use k >= 2 or tail_scale < 1"
        )
    if rule == "damp" and top_scale == 1:
        return (
            "rule='damp' with top_scale=1.0 multiplies the top k by 1, and tail_scale=1.0 "
            "leaves the tail; use top_scale < 1 or tail_scale < 1"
        )
    return None


def is_identity_filter(
    k: int, rule: str = "kth", top_scale: float = 0.1, tail_scale: float = 1.0
) -> bool:
    """Whether EigenGuard(k, rule, top_scale, tail_scale) would map every batch to itself
    (`identity_reason`): such a guard is refused; the undefended model is defence 'none'."""
    return identity_reason(k, rule, top_scale, tail_scale) is not None


def _validate_filter(
    k: int, rule: str, top_scale: float, tail_scale: float, eps: float
) -> tuple[float, float, float]:
    """ValueError naming the first filter parameter out of range, or a filter that is the
    identity; returns (top_scale, tail_scale, eps) as floats."""
    check_int("k", k, 1)
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; allowed: {list(RULES)}")
    try:
        top = check_float("top_scale", top_scale, low=0.0, high=1.0, low_open=True)
    except ValueError as err:
        raise ValueError(f"{err} (use rule='remove' for 0)") from None
    try:
        tail = check_float("tail_scale", tail_scale, low=0.0, high=1.0, low_open=True)
    except ValueError as err:
        raise ValueError(f"{err} (1.0 leaves the tail)") from None
    small = check_float("eps", eps, low=0.0, high=1.0, low_open=True, high_open=True)
    reason = identity_reason(k, rule, top, tail)
    if reason is not None:
        raise ValueError(
            f"EigenGuard(k={k}, rule={rule!r}, top_scale={top_scale!r}, "
            f"tail_scale={tail_scale!r}) is the identity: it would change nothing ({reason}; "
            "for no defence use defence 'none')"
        )
    return top, tail, small


def _check_eval_mode(mode: str) -> str:
    """Return `mode` if it is a known eval mode, else ValueError listing them."""
    if mode not in EVAL_MODES:
        raise ValueError(f"unknown eval_mode {mode!r}; allowed: {list(EVAL_MODES)}")
    return mode


def _check_size(B: int, D: int, k: int, phase: str) -> None:
    """ValueError unless a batch-wise filter of rank k can run on a (B, D) batch."""
    if B < max(2, k):
        raise ValueError(
            f"EigenGuard(k={k}) in {phase} got a batch of B={B} rows; the batch-wise filter "
            f"needs B >= max(2, k) = {max(2, k)} (min_batch is k + 1 = {k + 1}: drop smaller "
            f"batches, or use eval_mode='running' for per-sample inference)"
        )
    if D < k:
        raise ValueError(f"EigenGuard(k={k}) got features of dimension D={D} < k")


def _top_factors(
    s: torch.Tensor, k: int, rule: str, top_scale: float, tail_scale: float, eps: float
) -> torch.Tensor:
    """g(s_i) / s_i for the top k of descending singular values `s` (no autograd).

    Singular values <= eps * s_max are round-off of exact zeros (rank deficiency): they count
    as 0 in the rules, and their directions get `tail_scale`, like the tail.
    """
    top = s[:k].detach()
    valid = top > eps * s[0].detach()
    safe = torch.where(valid, top, torch.ones_like(top))
    if rule == "kth":
        factors = (top * valid)[-1] / safe
    elif rule == "mean":
        factors = (top * valid).mean() / safe
    elif rule == "damp":
        factors = torch.full_like(top, top_scale)
    else:  # remove
        factors = torch.zeros_like(top)
    return torch.where(valid, factors, torch.full_like(top, tail_scale))


def svd_filter(
    x: torch.Tensor,
    k: int,
    rule: str = "kth",
    top_scale: float = 0.1,
    tail_scale: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Reference filter through a full SVD of A = x.reshape(B, D): U diag(g(s)) V^T, reshaped.

    Slow (the naive route, for tests and the overhead benchmark); autograd goes through
    torch.linalg.svd, with the factors g(s)/s held constant.
    """
    top_scale, tail_scale, eps = _validate_filter(k, rule, top_scale, tail_scale, eps)
    A = flatten_rows(x)
    _check_size(A.shape[0], A.shape[1], k, "svd_filter")
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    factors = torch.full_like(s, tail_scale)
    factors[:k] = _top_factors(s, k, rule, top_scale, tail_scale, eps)
    return ((U * (s * factors)) @ Vh).reshape(x.shape)


class EigenGuard(nn.Module):
    """Spectral filter on a feature batch (B, C, H, W) or (B, D), used like BatchNorm.

    Training: A = x.reshape(B, D) = U diag(s) V^T becomes U diag(g(s)) V^T, reshaped back.
    The filter family g has three parameters:
    - `k`: how many top singular values are rescaled;
    - `rule`, how the top k are rescaled: 'kth' (all set to s_k, the k-th largest), 'mean'
      (all set to their mean), 'damp' (multiplied by `top_scale` in (0, 1], e.g. 0.001), or
      'remove' (set to 0: the ablation, not the paper's method);
    - `tail_scale` in (0, 1]: the factor on every singular value beyond k (1.0 leaves the
      tail alone; 0.001 is the other reading of the paper's Algorithm 1).
    Settings that make the filter exactly the identity are refused with ValueError
    (`identity_reason`): tail_scale=1.0 with 'kth' or 'mean' at k=1, or with 'damp' at
    top_scale=1.0.
    DEFAULT: rule='kth', tail_scale=1.0 (the top k share the k-th singular value, tail
    untouched), chosen by `eglib.studies.forced_dimension.choose_default` on the lite run
    (figures/forced_dimension.csv: BadNets 10 %, cnn-small after layer1, 3 seeds): the lowest
    per-sample ASR among filters within 2 ACC points of no defence was kth, k=16 (ACC 81.3 %,
    ASR 97.9 % vs 82.6 % / 99.6 % undefended): no filter in that grid met the ACC budget AND
    removed the backdoor per sample. rule='damp', top_scale=0.001, k=16 did (per-sample ASR
    5.8 %) at a 6.5-point ACC cost; kth's low ASR appears only in pure triggered batches.

    Computation: the Gram matrix A A^T = U diag(s^2) U^T (B x B, float64 eigh) gives U_k;
    the output is tail_scale * A + U_k diag(g(s_k)/s_k - tail_scale) U_k^T A, which equals the
    SVD route but costs one B x B x D product plus two thin (k-wide) ones. For float32 (and
    half) features the Gram is accumulated in float32, and again in float64 when the batch
    is ill conditioned (s_k < F32_GRAM_MIN_RATIO * s_1: rank deficiency, steep spectra);
    float64 features use float64. The top singular values are read as s_i = |u_i^T A| (rows
    of U_k^T A, which the output needs anyway): exact zeros (zero or duplicated rows) stay
    exactly 0. Singular values s <= eps * s_max are taken as exact zeros: they count as 0 in
    the rules ('kth' with rank < k removes the top k) and their directions get the tail
    factor, so zero rows stay zero and nothing is divided by zero.

    Gradients: U and g(s)/s are computed without autograd and held constant within a step,
    so the backward pass is that of the linear map A -> M A with M = tail_scale * I +
    U_k diag(g/s - tail_scale) U_k^T: always finite (no 1/(s_i^2 - s_j^2) terms, so repeated
    or zero singular values are harmless) and cheap. The consequence: the gradient ignores how
    the batch's spectrum itself moves with A (it is the derivative of a fixed spectral
    filter); each damped direction passes gradient scaled by its factor, so 'damp' with
    0.001 still lets a little through while 'remove' blocks the top k entirely.

    Inference (`eval_mode`, settable later and not part of the state_dict):
    - 'batch': the same batch-wise filter as in training (transductive: a prediction depends
      on the rest of its batch; a batch smaller than max(2, k) raises ValueError);
    - 'running' (default): per sample. Training keeps a running estimate of the top-k part of
      the feature second moment A^T A / B (normalised by B, so batch size does not matter):
      C <- (1 - momentum) C + momentum * A^T U_k U_k^T A / B, truncated back to rank k after
      each update (the first batch initialises it). Its eigenvectors are the buffer
      `running_basis` (D, k, orthonormal: the running V_k) and the square roots of its
      eigenvalues `running_scale` (k,: the per-direction RMS singular values s / sqrt(B)).
      In eval each row a maps to tail_scale * a + (a V) diag(g(r)/r - tail_scale) V^T with
      V = running_basis and r = running_scale, i.e. A - P + P_scaled with P the projection on
      V (plus tail scaling): one image's output does not depend on its batch. Keeping C
      rather than V_k itself makes the estimate blind to the sign and order ambiguities of
      singular vectors. Every rule's g(r)/r depends on ratios of r only, so the sqrt(B)
      normalisation just weights batches of different sizes fairly in the average. The
      buffers (and `num_batches_tracked`) are in the state_dict; a fresh guard takes their
      shape on load.
    """

    running_basis: torch.Tensor
    running_scale: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(
        self,
        k: int,
        rule: str = "kth",
        top_scale: float = 0.1,
        tail_scale: float = 1.0,
        eval_mode: str = "running",
        momentum: float = 0.1,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        top_scale, tail_scale, eps = _validate_filter(k, rule, top_scale, tail_scale, eps)
        self.k = k
        self.rule = rule
        self.top_scale = top_scale
        self.tail_scale = tail_scale
        self.momentum = check_float("momentum", momentum, low=0.0, high=1.0, low_open=True)
        self.eps = eps
        self._eval_mode = _check_eval_mode(eval_mode)
        self.register_buffer("running_basis", torch.zeros(0, k))
        self.register_buffer("running_scale", torch.zeros(k))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @property
    def eval_mode(self) -> str:
        """How eval-mode forward passes filter: 'running' (per sample) or 'batch'."""
        return self._eval_mode

    @eval_mode.setter
    def eval_mode(self, mode: str) -> None:
        self._eval_mode = _check_eval_mode(mode)

    @property
    def min_batch(self) -> int:
        """Smallest training batch the training loop should feed: k + 1 (a non-empty tail)."""
        return self.k + 1

    def extra_repr(self) -> str:
        """The filter's parameters, for print(model)."""
        return (
            f"k={self.k}, rule={self.rule!r}, top_scale={self.top_scale}, "
            f"tail_scale={self.tail_scale}, eval_mode={self.eval_mode!r}, "
            f"momentum={self.momentum}, eps={self.eps}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Filter a (B, ...) feature batch; returns the same shape and dtype."""
        A = flatten_rows(x)
        if self.training or self.eval_mode == "batch":
            out = self._batch_filter(A)
        else:
            out = self._running_filter(A)
        return out.reshape(x.shape)

    def _factors(self, s: torch.Tensor) -> torch.Tensor:
        """g(s_i)/s_i - tail_scale for the top k of descending `s` (the top directions' weights)."""
        factors = _top_factors(s, self.k, self.rule, self.top_scale, self.tail_scale, self.eps)
        return factors - self.tail_scale

    def _top_left_vectors(self, A: torch.Tensor) -> torch.Tensor:
        """U_k (B, k, float64) from the Gram matrix: float32 when well conditioned, else float64."""
        if A.dtype != torch.float64:
            s, U = gram_eigh(A, torch.float32)
            if s[self.k - 1] >= F32_GRAM_MIN_RATIO * s[0]:
                return U[:, : self.k]
        return gram_eigh(A, torch.float64)[1][:, : self.k]

    def _batch_filter(self, A: torch.Tensor) -> torch.Tensor:
        """The batch-wise filter through the Gram matrix; updates running stats in training."""
        B, D = A.shape
        _check_size(B, D, self.k, "training" if self.training else "eval_mode='batch'")
        U_k = self._top_left_vectors(A)  # float64, no autograd
        proj = U_k.T.to(A.dtype) @ A  # (k, D) = diag(s_k) V_k^T
        s_k = proj.detach().to(torch.float64).norm(dim=1)  # s_i = |u_i^T A|: exact zeros stay 0
        coef = (U_k * self._factors(s_k)).to(A.dtype)
        if self.training:
            self._update_running(proj.detach(), B)
        return torch.addmm(A, coef, proj, beta=self.tail_scale)

    @torch.no_grad()
    def _update_running(self, proj: torch.Tensor, B: int) -> None:
        """EMA of the rank-k second moment A^T U_k U_k^T A / B = W W^T, re-truncated to rank k."""
        D = proj.shape[1]
        W = proj.to(torch.float64).T / math.sqrt(B)  # (D, k): V_k diag(s_k / sqrt(B))
        started = self.running_basis.shape[0] > 0  # D is known once a batch was seen
        if started and self.running_basis.shape[0] != D:
            raise ValueError(
                f"feature dimension changed from D={self.running_basis.shape[0]} to D={D}"
            )
        if started:
            m = self.momentum
            R = self.running_basis.to(torch.float64) * self.running_scale.to(torch.float64)
            Z = torch.cat([math.sqrt(1 - m) * R, math.sqrt(m) * W], dim=1)
        else:
            Z = W
        lam, P = torch.linalg.eigh(Z.T @ Z)  # Z Z^T's nonzero eigenpairs, via the small side
        scale = lam.flip(0)[: self.k].clamp_min(0).sqrt()
        keep = scale > self.eps * scale[0]
        basis = (Z @ P.flip(1)[:, : self.k]) / torch.where(keep, scale, torch.ones_like(scale))
        if self.running_basis.shape[0] != D:
            self.running_basis = self.running_basis.new_zeros(D, self.k)
        self.running_basis.copy_(basis * keep)
        self.running_scale.copy_(scale * keep)
        self.num_batches_tracked += 1

    def _running_filter(self, A: torch.Tensor) -> torch.Tensor:
        """Per-sample filter with the running basis and scales (eval_mode='running')."""
        if self.running_basis.shape[0] == 0:
            raise RuntimeError(
                "EigenGuard has no running statistics yet: train it (or load a state_dict) "
                "before eval, or set eval_mode='batch'"
            )
        if A.shape[1] != self.running_basis.shape[0]:
            raise ValueError(
                f"features of dimension D={A.shape[1]}; the running statistics are for "
                f"D={self.running_basis.shape[0]}"
            )
        require_finite(A)
        V = self.running_basis.to(A.dtype)
        coef = self._factors(self.running_scale.to(torch.float64)).to(A.dtype)
        return torch.addmm(A, (A @ V) * coef, V.T, beta=self.tail_scale)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Take the incoming running_basis's shape (D is only known after training)."""
        incoming = state_dict.get(prefix + "running_basis")
        if isinstance(incoming, torch.Tensor) and incoming.shape != self.running_basis.shape:
            if incoming.dim() != 2 or incoming.shape[1] != self.k:
                error_msgs.append(
                    f"{prefix}running_basis has shape {tuple(incoming.shape)}; "
                    f"EigenGuard(k={self.k}) expects (D, {self.k})"
                )
                return
            self.running_basis = self.running_basis.new_zeros(incoming.shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def insert_guard(model: StagedNet, at: str | None = None, **params: Any) -> EigenGuard:
    """Put a new EigenGuard(**params) after stage `at` (default: model.default_guard_stage).

    Replaces a guard already there; the guard joins the model's device and train/eval mode.
    Unknown stage -> KeyError listing the valid ones.
    """
    if at is None:
        at = (
            getattr(model, "default_guard_stage", None)
            or model.stages[min(1, len(model.stages) - 1)]
        )
    model.stage(at)  # KeyError for an unknown stage
    guard = EigenGuard(**params).to(model_device(model))
    guard.train(model.training)
    model.guards[at] = guard
    return guard


def remove_guard(model: StagedNet, at: str) -> nn.Module:
    """Take the guard after stage `at` out of the model and return it (KeyError if none)."""
    if at not in model.guards:
        raise KeyError(f"no guard after stage {at!r}; guarded stages: {list(model.guards)}")
    return model.guards.pop(at)


def guards(model: StagedNet) -> dict[str, EigenGuard]:
    """The model's EigenGuards by stage name, input to output."""
    return {
        name: model.guards[name]  # type: ignore[misc]
        for name in model.stages
        if name in model.guards and isinstance(model.guards[name], EigenGuard)
    }


def set_eval_mode(model: StagedNet, mode: str) -> None:
    """Set `eval_mode` ('running' or 'batch') on every EigenGuard of the model."""
    _check_eval_mode(mode)
    for guard in guards(model).values():
        guard.eval_mode = mode
