"""Data-free coordinate selection for DP-ZOPO: scores, masks and their storage.

DP-ZOPO (arXiv 2402.07818) runs DP zeroth-order fine-tuning on a small set of coordinates
chosen by a *data-free* score, so choosing the mask costs no privacy.  The official score is a
SynFlow/GraSP hybrid computed on a data-free objective:

1. linearize: theta <- |theta| (done here on copies, so the model's signed weights are never
   modified);
2. objective: feed the single token id 1 (``torch.ones((1, 1), dtype=long)``, no attention
   mask) and sum the K label-word logits at position 0, i.e.
   ``R(theta) = sum_k logits[0, 0, label_ids[k]]`` through the MLM head (``mlm``) or the LM head
   (``causal``), exactly the head path of :class:`dpzo.models.classifier.PromptClassifier`;
3. score = theta (.) H g with g = grad R and H its Hessian, all at the linearized point
   (GraSP's Hessian-gradient product, as in DeepZero's ZO-GraSP).

Scorers
-------
``synflow-exact``
    theta (.) H g with autograd Hessian-vector products: ``Hg = grad( grad R . stopgrad(grad R) )``.
``synflow-zo``
    The same quantity from function values only (what the paper intends: no backpropagation).
    The official estimator draws independent z1, z2 for the two ends and does not divide the
    gradient estimate by its step, so it is dominated by noise.  We implement the evident intent
    with shared directions and proper normalisation (see :func:`theta_hg_zo`):

    * ZO gradient with Q Gaussian directions u_q (set A):
      ``g^ = (1/Q) sum_q [(R(x + eps u_q) - R(x - eps u_q)) / (2 eps)] u_q``;
    * Hessian-vector product along v = g^/||g^|| with *another* Q directions w_q (set B, drawn
      independently of A, which makes E[H^g^] = H g: with the same set the expectation would be
      ``(H + (H + tr(H) I) / Q) g``), each w_q shared by both ends (common random numbers):
      ``H^v = (1/Q) sum_q [(D_q(x + mu v) - D_q(x - mu v)) / (2 mu)] w_q``, with
      ``D_q(y) = (R(y + eps w_q) - R(y - eps w_q)) / (2 eps)``, and ``H^g^ = ||g^|| H^v``;
    * score = x (.) H^g^.

    Cost: 6 Q forwards of a one-token input and ~5 d numbers of memory.  Defaults: Q = 64,
    eps = 1e-6, mu = 1e-5, float64 (the second difference divides round-off by eps * mu, which
    float32 cannot afford; with these steps the finite-difference error of w^T H v is ~1e-6
    relative on the GELU demo RoBERTa).  ReLU models (OPT) have kinks: a pre-activation a few
    1e-6 from 0 is typical, and a difference across it is not a Hessian term, so there the
    per-query error has heavy tails whatever the steps.

    **Caveat (measured):** every coordinate of H^g^ carries sampling noise of order
    ||H g^|| / sqrt(Q), so with Q << d the ZO score is essentially |theta| times noise.  On the
    random-init demo-sized RoBERTa / OPT (d ~ 0.72-0.74 M) the Spearman correlation of |ZO| with
    |exact| is 0.11 / 0.05 for Q = 16, 64 and 256 alike, exactly that of |theta| * |N(0, 1)|
    (0.11 / 0.05), and the smallest-1% ZO mask overlaps the smallest-1% *magnitude* mask far more
    (Jaccard 0.71 / 0.47) than the exact one (0.01).  On the pretrained demo models the
    pipeline's ``results/tables/synflow_agreement.csv`` shows the same: Spearman -0.12 / -0.03
    at Q = 16 and 64, top-5 % overlap 5-9 % (chance: 5 %).  On an 86-parameter tanh MLP it takes
    Q ~ 24 d for Spearman ~ 0.78.  Since R is data-free, its gradients cost no privacy and one
    double backward on a one-token input is cheap: ``synflow-exact`` is the faithful score, and
    ``synflow-zo`` reproduces the paper's backprop-free procedure with its limits.

``magnitude``
    |theta|.
``random``
    Uniform [0, 1) scores from a ``torch.Generator`` seeded with ``seed`` (device-independent).

Exact zeros: on the one-token objective the query/key projections (softmax over one key is
constant), unused embedding rows and zero-valued coordinates have score exactly 0 (53% / 72% of
the demo RoBERTa / OPT coordinates), so ``selection="smallest"`` with ``synflow-exact`` is
decided by the index tie-break (the first rows of the word embeddings).  ``largest`` is not
affected.

Scores are flat float32 CPU vectors in :class:`dpzo.zo.flat.FlatParameters` order (trainable parameters
in ``named_parameters()`` order, tied weights once).  They are computed through
``torch.func.functional_call`` on detached copies of the weights, so the model's own tensors are
never written: its weights stay bit-identical (signs and ``-0.0`` included) and any
``FlatParameters`` views into them stay valid.  The module training flags are switched to eval
for the scoring and put back afterwards.

Selection (:func:`select_mask`)
-------------------------------
``ratio`` is the fraction of coordinates to *train*.  ``selection="smallest"`` (default, as the
official code, which trains the 1% of coordinates with the smallest |score|) or ``"largest"``.
``scope="global"`` ranks all coordinates together; ``"per-layer"`` applies the same ratio
within every parameter tensor of ``layout``.  Counts: ``k = floor(ratio * n + 0.5)`` (round half
up, in exact rational arithmetic on the decimal ``repr`` of ``ratio``, so 0.15 * 10 -> 2 and
0.29 * 100 -> 29 despite binary floating point); globally at least 1; per layer
a tensor may get 0 when ``ratio * n_t < 0.5`` (the total must still be >= 1).  Ties are broken
deterministically by a stable sort on (|score|, index): among equal |score| the lower flat index
comes first for both selections.

``mode="rank"`` adds per-coordinate scales: the selected coordinates ordered by ascending |score|
(ties by index) get scales linearly from 1.2 (first) down to 0.8 (last) (a single coordinate
gets 1.2); the order is taken in the selection's scope (whole vector for ``global``, each tensor
for ``per-layer``).  Scales are float32 and aligned with ``indices``.

Storage: :class:`dpzo.masks.settings.Mask` (torch-free to import, beside the settings) holds
sorted int64 flat indices (never sparse COO or bool tensors), ``numel``, optional scales and a
metadata dict; ``save`` writes a plain dict atomically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dpzo.masks.settings import MODES, SCOPES, SCORERS, SELECTIONS, Mask, MaskSettings
from dpzo.models.classifier import output_head
from dpzo.zo.flat import gaussian_direction

RANK_SCALE_FIRST = 1.2  # scale of the selected coordinate with the smallest |score|
RANK_SCALE_LAST = 0.8  # ... and of the one with the largest |score|

# synflow-zo defaults (see theta_hg_zo): directions per estimate and finite-difference steps.
# In float64 these steps keep the finite-difference error of w^T H v near 1e-6 relative on the
# (GELU) demo RoBERTa while round-off (~1e-16 |R| / (eps mu)) stays negligible; float32 would
# need eps ~ 1e-3, mu ~ 1e-2 and is not recommended.  Q barely matters below Q ~ d (see doc).
DEFAULT_QUERIES = 64
DEFAULT_EPS = 1e-6  # per-coordinate step along Gaussian directions (||eps u|| ~ eps sqrt(d))
DEFAULT_MU = 1e-5  # step along the unit Hessian-vector direction v = g^/||g^||

Layout = list[tuple[str, int, int]]


# ---------------------------------------------------------------------------------------------
# Layout and objective
# ---------------------------------------------------------------------------------------------
def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    return params


def flat_parameter_names(model: torch.nn.Module) -> Layout:
    """(name, offset, numel) of every trainable parameter, in the FlatParameters order."""
    layout, offset = [], 0
    for name, p in _trainable(model):
        layout.append((name, offset, p.numel()))
        offset += p.numel()
    return layout


def _label_head(model: torch.nn.Module, family: str):
    if family not in ("mlm", "causal"):
        raise ValueError(f"family must be 'mlm' or 'causal', got {family!r}")
    return output_head(model, family)


def synflow_objective(model: torch.nn.Module, label_ids: torch.Tensor, family: str) -> torch.Tensor:
    """Data-free objective R: sum of the K label-word logits at position 0 for input id 1.

    Evaluated at the model's *current* weights (linearizing is the caller's business, see
    :func:`compute_scores`); differentiable.  Input is ``torch.ones((1, 1), dtype=long)`` with no
    attention mask, as in the official code (note: id 1 is ``<pad>`` for RoBERTa and OPT, whose
    embedding row is zero at initialisation and receives no gradient through ``padding_idx``).
    """
    head = _label_head(model, family)
    device = next(model.parameters()).device
    label_ids = torch.as_tensor(label_ids, dtype=torch.long, device=device).reshape(-1)
    ids = torch.ones((1, 1), dtype=torch.long, device=device)
    hidden = model.base_model(input_ids=ids).last_hidden_state[:, 0]  # [1, H]
    if family == "causal":
        logits = hidden @ head.weight[label_ids].T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[label_ids]
    else:
        logits = head(hidden)[:, label_ids]
    return logits.sum()


class _Objective(torch.nn.Module):
    """Wraps the model so that ``functional_call`` can evaluate R at substituted weights."""

    def __init__(self, model: torch.nn.Module, label_ids: torch.Tensor, family: str):
        super().__init__()
        self.model = model
        self.family = family
        self.label_ids = label_ids

    def forward(self) -> torch.Tensor:
        return synflow_objective(self.model, self.label_ids, self.family)


def _split(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[offset : offset + n].view(shape))
        offset += n
    return out


# ---------------------------------------------------------------------------------------------
# theta (.) H g, exact and zeroth-order
# ---------------------------------------------------------------------------------------------
def theta_hg_exact(
    params: Sequence[torch.Tensor], objective_fn: Callable[[list[torch.Tensor]], torch.Tensor]
) -> torch.Tensor:
    """theta (.) H g of a scalar objective of a list of tensors, by autograd (flat, detached).

    ``Hg = grad_theta( grad R(theta) . stopgrad(grad R(theta)) )`` at ``theta = params`` (no
    linearization here).  The result is concatenated in ``params`` order, in their dtype.
    """
    shapes = [p.shape for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params]).requires_grad_(True)
    with torch.enable_grad():
        value = objective_fn(_split(theta, shapes))
        (g,) = torch.autograd.grad(value, theta, create_graph=True)
        if g.requires_grad:
            (hg,) = torch.autograd.grad(g, theta, grad_outputs=g.detach())
        else:  # R is linear in theta: H = 0
            hg = torch.zeros_like(theta)
    return (theta.detach() * hg).detach()


def _seed(seed: int, phase: int, query: int) -> int:
    # Namespaced away from the training directions of dpzo.zo.flat.direction_seed.
    state = np.random.SeedSequence([int(seed), 0x5052554E, int(phase), int(query)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


@torch.no_grad()
def theta_hg_zo(
    params: Sequence[torch.Tensor],
    objective_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    *,
    queries: int = DEFAULT_QUERIES,
    eps: float = DEFAULT_EPS,
    mu: float = DEFAULT_MU,
    seed: int = 0,
) -> torch.Tensor:
    """Zeroth-order estimate of theta (.) H g from 6 * queries evaluations of the objective.

    With x the concatenated params (d coordinates), u_q and w_q independent N(0, I_d) directions
    (sets A and B, regenerated from ``seed``):

        D_q(y)  = (R(y + eps w_q) - R(y - eps w_q)) / (2 eps)              ~ w_q . g(y)
        g^      = mean_q [(R(x + eps u_q) - R(x - eps u_q)) / (2 eps)] u_q  ~ g(x)
        v       = g^ / ||g^||
        H^g^    = ||g^|| mean_q [(D_q(x + mu v) - D_q(x - mu v)) / (2 mu)] w_q
        score   = x (.) H^g^

    E over B given A is (up to O(eps^2, mu^2) finite-difference bias) H g^, and E over A of that
    is H g: the estimator is unbiased.  Each w_q is used at both x + mu v and x - mu v (common
    random numbers), so the difference isolates w_q^T H v instead of two independent noises.
    The computation runs in the params' dtype (use float64).
    """
    if queries < 1 or eps <= 0 or mu <= 0:
        raise ValueError("queries must be >= 1 and eps, mu positive")
    shapes = [p.shape for p in params]
    x = torch.cat([p.detach().reshape(-1) for p in params])
    d, dtype, device = x.numel(), x.dtype, x.device

    point = torch.empty_like(x)  # one reusable evaluation buffer: ~5 d numbers in all

    def R(shift: float, direction: torch.Tensor, step: float) -> float:
        """R(x + shift v + step direction), evaluated in the buffer."""
        torch.add(x, direction, alpha=step, out=point)
        if shift:
            point.add_(v, alpha=shift)
        return float(objective_fn(_split(point, shapes)))

    g = torch.zeros_like(x)
    for q in range(queries):
        u = gaussian_direction(_seed(seed, 0, q), d, dtype=dtype, device=device)
        g.add_(u, alpha=(R(0.0, u, eps) - R(0.0, u, -eps)) / (2.0 * eps))
    g.div_(queries)
    norm = float(torch.linalg.vector_norm(g))
    if norm == 0.0 or not math.isfinite(norm):
        return torch.zeros_like(x)
    v = g.div_(norm)
    hv = torch.zeros_like(x)
    for q in range(queries):
        w = gaussian_direction(_seed(seed, 1, q), d, dtype=dtype, device=device)
        # The same w_q at both ends x + mu v and x - mu v (common random numbers).
        plus = R(mu, w, eps) - R(mu, w, -eps)
        minus = R(-mu, w, eps) - R(-mu, w, -eps)
        hv.add_(w, alpha=(plus - minus) / (4.0 * eps * mu))
    hv.mul_(norm / queries)
    return x * hv


# ---------------------------------------------------------------------------------------------
# Scores of a model
# ---------------------------------------------------------------------------------------------
@contextmanager
def scoring_context(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, true embedding derivatives and differentiable attention while scoring.

    * every module in eval mode (training flags restored afterwards, module by module);
    * ``nn.Embedding(padding_idx=p)`` uses row p in the forward but zeroes its gradient.  The
      official input *is* the pad id 1 (for RoBERTa and OPT), so autograd would differentiate a
      different function from the one the ZO estimator probes; ``padding_idx`` is lifted while
      scoring so that both scorers see the true derivatives of R (a module attribute, restored
      afterwards; the weights are not touched);
    * the math SDPA backend: fused attention kernels have no double backward (the input is one
      token, so this costs nothing).
    """
    flags = {m: m.training for m in model.modules()}
    paddings = {m: m.padding_idx for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    model.eval()
    try:
        for module in paddings:
            module.padding_idx = None
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for module, flag in flags.items():
            module.training = flag
        for module, padding_idx in paddings.items():
            module.padding_idx = padding_idx


def linearized_objective(
    model: torch.nn.Module, label_ids: torch.Tensor, family: str, *, dtype: torch.dtype = torch.float64
) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], torch.Tensor]]:
    """(|theta| as detached copies in ``dtype``, R as a function of such a list of tensors).

    The function evaluates :func:`synflow_objective` with the given tensors substituted for the
    trainable parameters (``torch.func.functional_call``, tied weights follow), so the model's
    own parameters are never written.  Call it inside :func:`scoring_context`.
    """
    named = _trainable(model)
    device = named[0][1].device
    label_ids = torch.as_tensor(label_ids, dtype=torch.long, device=device).reshape(-1)
    wrapper = _Objective(model, label_ids, family)
    names = ["model." + n for n, _ in named]
    linear = [p.detach().to(dtype=dtype, copy=True).abs_() for _, p in named]

    def objective_fn(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(wrapper, dict(zip(names, tensors)), (), tie_weights=True, strict=False)

    return linear, objective_fn


def compute_scores(
    model: torch.nn.Module,
    label_ids: torch.Tensor,
    family: str,
    scorer: str,
    *,
    seed: int = 0,
    queries: int = DEFAULT_QUERIES,
    eps: float = DEFAULT_EPS,
    mu: float = DEFAULT_MU,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Flat float32 scores (FlatParameters order) of the trainable coordinates of ``model``.

    ``synflow-*`` scorers evaluate ``theta (.) H g`` of :func:`synflow_objective` at the
    linearized weights |theta| in ``dtype`` (float64 by default) through
    ``torch.func.functional_call``: the model's parameters are never written, so they are
    bit-identical afterwards.  Modules are in eval mode while scoring and get their training
    flags back afterwards.  ``seed`` drives ``synflow-zo`` directions and ``random`` scores.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    if family not in ("mlm", "causal"):
        raise ValueError(f"family must be 'mlm' or 'causal', got {family!r}")
    named = _trainable(model)
    numel = sum(p.numel() for _, p in named)
    if scorer == "random":
        gen = torch.Generator().manual_seed(int(seed))
        return torch.rand(numel, generator=gen, dtype=torch.float32)
    if scorer == "magnitude":
        return torch.cat([p.detach().reshape(-1).abs().float().cpu() for _, p in named])

    linear, objective_fn = linearized_objective(model, label_ids, family, dtype=dtype)
    with scoring_context(model):
        if scorer == "synflow-exact":
            scores = theta_hg_exact(linear, objective_fn)
        else:
            scores = theta_hg_zo(linear, objective_fn, queries=queries, eps=eps, mu=mu, seed=seed)
    return scores.float().cpu()


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------
def _count(ratio: float, n: int) -> int:
    """floor(ratio * n + 1/2), exact, with ``ratio`` read as the decimal it prints as.

    0.29 * 100 is 28.999... in floats and 0.15 is 0.1499... as a binary fraction; reading the
    float's shortest repr ("0.29", "0.15") as an exact rational gives 29 and round(1.5) = 2, the
    counts a person writing those ratios expects.
    """
    return int(math.floor(Fraction(repr(float(ratio))) * n + Fraction(1, 2)))


def _order(abs_scores: torch.Tensor, selection: str) -> torch.Tensor:
    """Positions sorted by (|score|, index) ascending, or by (-|score|, index) for 'largest'."""
    return torch.sort(abs_scores, descending=(selection == "largest"), stable=True).indices


def _rank_scales(count: int) -> torch.Tensor:
    if count == 1:
        return torch.tensor([RANK_SCALE_FIRST], dtype=torch.float32)
    steps = torch.arange(count, dtype=torch.float64) / (count - 1)
    return (RANK_SCALE_FIRST + (RANK_SCALE_LAST - RANK_SCALE_FIRST) * steps).float()


def _select_block(
    abs_scores: torch.Tensor, k: int, selection: str, rank: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k positions of one block (sorted) and, for rank mode, their scales aligned with them."""
    chosen = _order(abs_scores, selection)[:k]
    if not rank:
        return torch.sort(chosen).values, None
    # Ascending (|score|, index) among the chosen: stable sort of the chosen sorted by index.
    by_index = torch.sort(chosen).values
    ascending = by_index[torch.sort(abs_scores[by_index], stable=True).indices]
    scales = torch.empty(k, dtype=torch.float32)
    scales[torch.searchsorted(by_index, ascending)] = _rank_scales(k)
    return by_index, scales


def select_mask(
    scores: torch.Tensor,
    ratio: float,
    *,
    selection: str = "smallest",
    scope: str = "global",
    mode: str = "normal",
    layout: Layout | None = None,
    meta: dict | None = None,
) -> Mask:
    """The coordinates to train: a ``ratio`` fraction of ``scores`` by |score| (see module doc)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ratio = float(ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    scores = torch.as_tensor(scores).detach().reshape(-1).cpu()
    numel = scores.numel()
    if numel == 0:
        raise ValueError("no scores")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite")
    abs_scores = scores.double().abs()  # float64 holds every float32 |score| exactly
    rank = mode == "rank"

    if scope == "global":
        k = max(1, _count(ratio, numel))
        indices, scales = _select_block(abs_scores, k, selection, rank)
    else:
        if layout is None:
            raise ValueError("per-layer selection needs the layout (flat_parameter_names(model))")
        _check_layout(layout, numel)
        parts, part_scales = [], []
        for _, offset, n in layout:
            k = _count(ratio, n)
            if k == 0:
                continue
            idx, sc = _select_block(abs_scores[offset : offset + n], k, selection, rank)
            parts.append(idx + offset)
            part_scales.append(sc)
        if not parts:
            raise ValueError(f"ratio {ratio} selects no coordinate in any tensor")
        indices = torch.cat(parts)
        scales = torch.cat(part_scales) if rank else None

    info = {"ratio": ratio, "selection": selection, "scope": scope, "mode": mode, "count": int(indices.numel())}
    if layout is not None:
        info["layout"] = [[str(name), int(offset), int(n)] for name, offset, n in layout]
    info.update(meta or {})
    return Mask(indices=indices.to(torch.int64).contiguous(), numel=numel, scales=scales, meta=info)


def _check_layout(layout: Layout, numel: int) -> None:
    offset = 0
    for name, start, n in layout:
        if int(start) != offset or int(n) < 1:
            raise ValueError(f"layout is not contiguous at {name!r}")
        offset += int(n)
    if offset != numel:
        raise ValueError(f"layout covers {offset} coordinates, scores have {numel}")


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------
def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(0.5 * (starts + ends - 1), ends - starts)  # average rank of each tie run
    return ranks


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of |a| and |b| (ties get average ranks)."""
    x = torch.as_tensor(a).detach().reshape(-1).double().abs().cpu().numpy()
    y = torch.as_tensor(b).detach().reshape(-1).double().abs().cpu().numpy()
    if x.shape != y.shape or x.size < 2:
        raise ValueError("rank_correlation needs two vectors of the same length >= 2")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denom if denom > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# Strategies: which mask each stage of DP-ZOPO trains
# ---------------------------------------------------------------------------------------------
def compute_mask(
    model: torch.nn.Module, label_ids: torch.Tensor, family: str, settings: MaskSettings, ratio: float
) -> Mask:
    """Score the current weights with ``settings.scorer`` and select a ``ratio`` mask."""
    scores = compute_scores(model, label_ids, family, settings.scorer, seed=settings.seed)
    layout = flat_parameter_names(model)
    return select_mask(
        scores,
        ratio,
        selection=settings.selection,
        scope=settings.scope,
        mode=settings.mode,
        layout=layout if settings.scope == "per-layer" else None,
        meta={"scorer": settings.scorer, "seed": settings.seed},
    )


# ---------------------------------------------------------------------------------------------
# How well the zeroth-order SynFlow estimate agrees with the exact score
# ---------------------------------------------------------------------------------------------
def top_overlap(a: torch.Tensor, b: torch.Tensor, ratio: float) -> float:
    """Fraction of the top-``ratio`` coordinates by |b| that are also in the top by |a|.

    Two unrelated scorings overlap by about ``ratio`` (the chance level); identical ones by 1.
    """
    x, y = torch.as_tensor(a).reshape(-1).abs(), torch.as_tensor(b).reshape(-1).abs()
    if x.shape != y.shape:
        raise ValueError("top_overlap needs two vectors of the same length")
    k = max(_count(ratio, x.numel()), 1)
    top_a = _order(x, "largest")[:k]
    top_b = _order(y, "largest")[:k]
    return float(torch.isin(top_b, top_a).sum()) / k


def scorer_agreement(
    model: torch.nn.Module,
    label_ids: torch.Tensor,
    family: str,
    *,
    queries: Sequence[int] = (16, 64),
    ratios: Sequence[float] = (0.01, 0.05),
    seed: int = 0,
) -> dict:
    """Agreement of ``synflow-zo`` (at several query budgets) and ``magnitude`` with ``synflow-exact``.

    Spearman correlation of |score| over all trainable coordinates and the top-k overlap at each
    ratio (chance level: the ratio itself).  The paper masks with the zeroth-order estimate; this
    measures how much of the exact SynFlow ranking it recovers on a given model.
    """
    exact = compute_scores(model, label_ids, family, "synflow-exact")
    rows = []

    def row(scorer: str, q: int | None, scores: torch.Tensor) -> dict:
        out = {"scorer": scorer, "queries": q, "spearman": rank_correlation(scores, exact)}
        for r in ratios:
            out[f"top_overlap@{r:g}"] = top_overlap(scores, exact, r)
        return out

    for q in queries:
        rows.append(
            row("synflow-zo", int(q), compute_scores(model, label_ids, family, "synflow-zo", seed=seed, queries=int(q)))
        )
    rows.append(row("magnitude", None, compute_scores(model, label_ids, family, "magnitude")))
    return {
        "reference": "synflow-exact",
        "coordinates": int(exact.numel()),
        "seed": seed,
        "chance_overlap": {f"{r:g}": r for r in ratios},
        "rows": rows,
    }


def load_scorer(model_path: str, model_cfg: dict, *, device: str, task: str):
    """The model of a mask job and its task's label words (no training data is read)."""
    from dpzo.data.tasks import get_task
    from dpzo.models.candidates import make_scorer
    from dpzo.models.classifier import load_model

    lm, tokenizer, family = load_model(
        str(model_path), family=model_cfg.get("family", "auto"), dtype=model_cfg.get("dtype", "float32"), device=device
    )
    return make_scorer(lm, tokenizer, family, get_task(task))


def write_mask(
    path: str | Path, settings: MaskSettings, *, model_path: str, model_cfg: dict, device: str, task: str
) -> Mask:
    """Compute one data-free DP-ZOPO mask of the model at ``settings.ratio`` and save it to ``path``."""
    import logging

    clf = load_scorer(model_path, model_cfg, device=device, task=task)
    result = compute_mask(clf.model, clf.label_ids, clf.family, settings, float(settings.ratio))
    result.save(Path(path))
    logging.getLogger(__name__).info("mask: %d of %d coordinates (%s)", len(result), result.numel, settings)
    return result


def write_scorer_agreement(
    path: str | Path, *, model: str, task: str, model_path: str, model_cfg: dict, device: str
) -> dict:
    """How much of the exact SynFlow ranking the zeroth-order estimate recovers on one model
    (:func:`scorer_agreement`), written as JSON to ``path``."""
    import logging

    from dpzo.fileio import write_json_atomic

    clf = load_scorer(model_path, model_cfg, device=device, task=task)
    result = scorer_agreement(clf.model, clf.label_ids, clf.family)
    result.update(model=model, task=task)
    write_json_atomic(Path(path), result)
    for row in result["rows"]:
        logging.getLogger(__name__).info("%s", row)
    return result
