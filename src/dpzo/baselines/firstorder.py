"""First-order baselines of the comparison: DP-SGD (full), DP-SGD on a prefix, and plain fine-tuning.

Methods (``train_first_order(method=...)``):

* ``dp-sgd``    DP-SGD on every trainable weight (Abadi et al. 2016).  Each step draws a Poisson
                batch with rate q = B/n from the secret RNG (empty batches allowed: the update is
                then noise only), computes the gradient of every example's loss separately, clips
                each to L2 norm <= C jointly over all trained parameters, sums, adds
                N(0, sigma^2 C^2 I) from the secret RNG and divides by the expected batch size
                q n = B.  The optimizer (AdamW or SGD, constant lr) then post-processes this
                release.  ``steps`` steps are ``steps`` Poisson-subsampled Gaussian releases with
                noise multiplier sigma: exactly what ``privacy.accounting_record(steps=steps,
                directions=1, ...)`` accounts (add/remove neighbours, sensitivity C).
* ``dp-prefix`` the same DP-SGD mechanics on prefix-tuning parameters only (Li & Liang 2021):
                ``prefix_tokens`` trainable key/value vectors prepended in every self-attention
                layer; all model weights are frozen (``requires_grad=False``) and stay
                bit-identical.  As in MeZO's "prefix" baseline: no reparameterisation, and the
                prefix is initialised from the real key/value activations of random vocabulary
                tokens (drawn from a public generator seeded with the run seed): ``dpzo.models.prefix``.
* ``ft``        non-private fine-tuning of every trainable weight: fixed-size minibatches drawn
                uniformly without replacement from a public numpy generator seeded with the run
                seed, mean loss, constant lr (AdamW by default).

All three run the model in eval mode (dropout off), like the zeroth-order methods, so that the
baselines differ from them only in how the gradient is obtained.

Per-example gradients
---------------------
Exact, with ``torch.func``: ``vmap(grad(loss_i))`` over the examples of a physical micro-batch
(``physical_batch_size``, default 8), where ``loss_i`` is ``PromptClassifier.per_example_loss``
of one example run through ``functional_call`` on the trained parameters.  The clipped
per-example gradients are summed micro-batch by micro-batch, so peak memory holds
``physical_batch_size`` copies of the trained parameters' gradients (full fine-tuning of a
355M-parameter model in float32 with 8 examples: ~11 GiB on top of activations; lower
``physical_batch_size`` for larger models).  The mathematics is per-example clipping whatever
the micro-batch size.

transformers' mask builders test "is there any padding?" with Python control flow on the mask
values (to skip the mask), which ``vmap`` cannot trace.  While per-example gradients are
computed, :func:`_vmap_safe_masks` disables that skip (the mask is then always materialised:

Noise
-----
Noise and batches come only from the ``SecretRandom`` passed in: each step draws its Poisson
batch (``poisson_batch(n, q)``), then one standard normal per trained coordinate, tensor by
tensor in ``named_parameters`` order (``standard_normal_array``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn

from dpzo.methods import FIRST_ORDER, get_method
from dpzo.methods.hyperparameters import FirstOrderHyperparameters
from dpzo.models.classifier import EncodedSet, PromptClassifier
from dpzo.models.evaluate import TestLossCurve
from dpzo.models.prefix import install_prefix, prefix_modules
from dpzo.privacy.secret import SecretRandom
from dpzo.progress import Progress

log = logging.getLogger(__name__)

FIRST_ORDER_METHODS = tuple(FIRST_ORDER)
PRIVATE_FIRST_ORDER_METHODS = tuple(name for name, private in FIRST_ORDER.items() if private)


#: Above this many scalar draws per noise vector, the scalar fallback of secret_normals warns.
_SLOW_NOISE_WARN = 1_000_000


# --------------------------------------------------------------------------------------
# secret noise
# --------------------------------------------------------------------------------------


def secret_normals(secret: SecretRandom, size: int) -> np.ndarray:
    """``size`` independent N(0, 1) draws (float64) from the secret generator, in order.

    Uses ``SecretRandom.standard_normal_array`` (one vectorised draw); an object without it
    falls back to one scalar ``standard_normal()`` call per coordinate, which numpy's Generator
    turns into the very same sequence, only slower (~0.8 us per coordinate).
    """
    size = int(size)
    if size < 0:
        raise ValueError(f"size must be >= 0; got {size}")
    vectorised = getattr(secret, "standard_normal_array", None)
    if vectorised is not None:
        return np.asarray(vectorised(size), dtype=np.float64).reshape(size)
    if size > _SLOW_NOISE_WARN:
        log.warning("drawing %d secret normals one scalar call at a time (~%.0f s)", size, size * 0.8e-6)
    return np.fromiter((secret.standard_normal() for _ in range(size)), dtype=np.float64, count=size)


def privatize_gradients(
    sums: dict[str, torch.Tensor],
    *,
    sigma: float,
    clip: float,
    expected_batch_size: float,
    secret: SecretRandom | None,
) -> dict[str, torch.Tensor]:
    """``(sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / expected_batch_size`` for every tensor.

    The noise vector is drawn from ``secret`` tensor by tensor, in the order of ``sums``; with
    ``sigma == 0`` no noise is drawn (then ``clip`` may be inf).
    """
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0; got {sigma!r}")
    if sigma > 0 and not math.isfinite(float(clip)):
        raise ValueError("clip must be finite when sigma > 0 (the sensitivity would be infinite)")
    if not (math.isfinite(expected_batch_size) and expected_batch_size > 0):
        raise ValueError(f"expected_batch_size must be a finite number > 0; got {expected_batch_size!r}")
    out = {}
    for name, s in sums.items():
        g = s.clone()
        if sigma > 0:
            if secret is None:
                raise ValueError("noise needs the secret RNG")
            z = torch.from_numpy(secret_normals(secret, s.numel())).view(s.shape)
            g.add_(z.to(device=s.device, dtype=s.dtype), alpha=sigma * float(clip))
        out[name] = g.div_(expected_batch_size)
    return out


# --------------------------------------------------------------------------------------
# per-example gradients
# --------------------------------------------------------------------------------------


class _LossModule(nn.Module):
    """Makes ``clf.per_example_loss`` the forward of a module that owns ``clf.model``.

    ``functional_call`` substitutes parameters named ``model.<name>`` for the duration of a call;
    the classifier then computes with the substituted tensors (it holds the same model object).
    """

    def __init__(self, clf: PromptClassifier):
        super().__init__()
        self.model = clf.model
        object.__setattr__(self, "_clf", clf)  # not a submodule

    def forward(self, input_ids, attention_mask, score_pos, labels):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "score_pos": score_pos, "labels": labels}
        return self._clf.per_example_loss(batch)


@contextlib.contextmanager
def _vmap_safe_masks() -> Iterator[None]:
    """Disable transformers' "no padding, skip the mask" shortcut while vmapping over examples.

    The shortcut reads the mask's values in Python control flow (``padding_mask.all()``), which
    vmap refuses.  Without it the mask is always built; the attention computed is the same.
    """
    import transformers.masking_utils as mu

    # the shortcut's functions in the installed transformers (their names differ between versions)
    names = [n for n in ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa") if n in vars(mu)]
    saved = {n: getattr(mu, n) for n in names}

    def never(*args, **kwargs) -> bool:
        return False

    try:
        for n in names:
            setattr(mu, n, never)
        with warnings.catch_warnings():
            # sdpa's fused CPU/GPU kernels have no vmap batching rule: torch loops over the
            # examples for that one op (correct, just slower) and warns about it.
            warnings.filterwarnings(
                "ignore", message="There is a performance drop because we have not yet implemented the batching rule"
            )
            yield
    finally:
        for n, f in saved.items():
            setattr(mu, n, f)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name (tied weights once, as ``named_parameters`` gives them)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def clipped_grad_sum(
    clf: PromptClassifier,
    params: dict[str, nn.Parameter],
    batch: dict,
    clip: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Sum over the batch of per-example gradients each clipped to L2 norm <= ``clip``.

    ``params`` are (a subset of) ``clf.model``'s parameters by name; the per-example norm is
    taken jointly over all of them.  Returns ``(sums by name, losses [B], norms [B])``; the
    sums are in the parameters' dtype (float32 for half-precision parameters).  ``clip=inf``
    sums the raw per-example gradients.
    """
    from torch.func import functional_call, grad, vmap

    module = _LossModule(clf)
    names = list(params)
    detached = {"model." + n: p.detach() for n, p in params.items()}

    def one_example(theta, ids, mask, pos, label):
        loss = functional_call(module, theta, (ids[None], mask[None], pos[None], label[None]))[0]
        return loss, loss

    per_example = vmap(grad(one_example, has_aux=True), in_dims=(None, 0, 0, 0, 0))
    with _vmap_safe_masks():
        try:
            grads, losses = per_example(
                detached, batch["input_ids"], batch["attention_mask"], batch["score_pos"], batch["labels"]
            )
        except RuntimeError as err:
            if "vmap" in str(err) and "data-dependent" in str(err):
                raise RuntimeError(
                    "per-example gradients: the model's forward has data-dependent Python control flow "
                    "that torch.func.vmap cannot trace (transformers' mask shortcuts are disabled by "
                    f"_vmap_safe_masks for transformers 5.x; check it for this version): {err}"
                ) from err
            raise
    b = losses.shape[0]
    acc_dtype = {
        n: (torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype) for n, p in params.items()
    }
    norm_dtype = torch.float64 if any(d == torch.float64 for d in acc_dtype.values()) else torch.float32
    sq = torch.zeros(b, dtype=norm_dtype, device=losses.device)
    for n in names:
        sq += torch.linalg.vector_norm(grads["model." + n].reshape(b, -1), dim=1, dtype=norm_dtype).square()
    norms = sq.sqrt()
    # min(1, C / ||g_i||): C / 0 = inf and inf / x = inf both clamp to 1 (no clipping).
    factor = (float(clip) / norms).clamp(max=1.0)
    sums = {}
    for n in names:
        g = grads["model." + n].to(acc_dtype[n])
        sums[n] = torch.tensordot(factor.to(g.dtype), g, dims=1)
    return sums, losses.detach(), norms


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------


def _make_optimizer(params: list[nn.Parameter], hp: FirstOrderHyperparameters) -> torch.optim.Optimizer:
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    return torch.optim.SGD(params, lr=hp.lr, weight_decay=hp.weight_decay)


def _check_finite(losses: torch.Tensor, step: int) -> None:
    if not bool(torch.isfinite(losses).all()):
        raise FloatingPointError(f"non-finite training loss at step {step}; lower the learning rate")


def _check_run(method: str, hp: FirstOrderHyperparameters, n: int, sigma: float, secret: SecretRandom | None) -> bool:
    """Refuse a run whose settings contradict its method; returns whether it is private."""
    if method not in FIRST_ORDER_METHODS:
        raise ValueError(f"train_first_order runs {FIRST_ORDER_METHODS}, not {method!r}")
    private = method in PRIVATE_FIRST_ORDER_METHODS
    if hp.batch_size > n:
        raise ValueError(f"batch_size {hp.batch_size} is larger than the training set ({n} examples)")
    if private:
        if secret is None:
            raise ValueError(f"{method} is private and needs the secret RNG (secret=SecretRandom(...))")
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0; got {sigma!r}")
        if sigma > 0 and math.isinf(hp.clip):
            raise ValueError(f"{method} with sigma > 0 needs a finite clip (the sensitivity would be infinite)")
    else:
        if sigma != 0.0:
            raise ValueError(f"{method} is non-private; sigma must be 0, got {sigma!r}")
        if math.isfinite(hp.clip):
            raise ValueError(f"{method} is plain fine-tuning without clipping; clip must be inf, got {hp.clip!r}")
    return private


def _trained_parameters(model: nn.Module, method: str, hp: FirstOrderHyperparameters, run_seed: int):
    """The parameters the method trains: for a method that installs its own prefix (dp-prefix,
    ``Method.installs_prefix``) a freshly installed prefix (every other weight frozen), otherwise
    what the model leaves trainable."""
    if get_method(method).installs_prefix:
        if prefix_modules(model):
            raise RuntimeError("model already has a prefix installed; dp-prefix starts from a model without one")
        prefix = install_prefix(model, hp.prefix_tokens, seed=run_seed)
        for name, p in model.named_parameters():
            p.requires_grad_(name in prefix)
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model has no trainable parameters")
    return params


def _private_gradient(clf, params, train_set, chunks, hp, *, sigma, expected_batch_size, secret, step) -> tuple:
    """Set every parameter's ``grad`` to the noisy clipped-gradient sum / qn (DP-SGD); returns the
    per-example losses of the batch and how many examples were clipped."""
    sums = {
        name: torch.zeros_like(p, dtype=torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype)
        for name, p in params.items()
    }
    step_losses, clipped = [], 0
    for chunk in chunks:
        batch = train_set.batch(chunk, clf.device)
        chunk_sums, losses, norms = clipped_grad_sum(clf, params, batch, hp.clip)
        _check_finite(losses, step)
        if not bool(torch.isfinite(norms).all()):
            raise FloatingPointError(f"non-finite per-example gradient at step {step}; lower the learning rate")
        for name in sums:
            sums[name].add_(chunk_sums[name])
        step_losses.append(losses)
        clipped += int((norms > hp.clip).sum())
    noisy = privatize_gradients(sums, sigma=sigma, clip=hp.clip, expected_batch_size=expected_batch_size, secret=secret)
    for name, p in params.items():
        p.grad = noisy[name].to(p.dtype)
    return step_losses, clipped


def _plain_gradient(clf, train_set, chunks, hp, *, step) -> tuple:
    """Backpropagate the batch's mean loss (fine-tuning, no privacy); returns its losses and 0 clipped."""
    step_losses = []
    for chunk in chunks:
        batch = train_set.batch(chunk, clf.device)
        losses = clf.per_example_loss(batch)
        _check_finite(losses.detach(), step)
        (losses.sum() / hp.batch_size).backward()
        step_losses.append(losses.detach())
    return step_losses, 0


class _Window:
    """The private diagnostics of the current log window (losses, examples, clipped examples)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.examples = 0
        self.clipped = 0

    def add(self, step_losses: list[torch.Tensor], examples: int, clipped: int) -> None:
        if step_losses:
            self.losses.append(float(torch.cat(step_losses).double().mean()))
        self.examples += examples
        self.clipped += clipped

    def close(self, history: dict, step: int, lr: float, progress: Progress) -> None:
        """Append the window's point to ``history`` and start a new window."""
        history["step"].append(step)
        history["lr"].append(lr)
        history["loss"].append(float(np.mean(self.losses)) if self.losses else float("nan"))
        log.info("%s", progress.line(step, loss=history["loss"][-1]))
        history["examples"].append(self.examples)
        history["clipped_fraction"].append(self.clipped / max(self.examples, 1))
        self.__init__()


def train_first_order(
    clf: PromptClassifier,
    train_set: EncodedSet,
    hp: FirstOrderHyperparameters,
    *,
    method: str,
    run_seed: int,
    sigma: float = 0.0,
    secret: SecretRandom | None = None,
    curve: TestLossCurve | None = None,
) -> dict:
    """Train ``clf.model`` in place with a first-order method; returns the training history.

    ``method``: ``"dp-sgd"``, ``"dp-prefix"`` (private: need ``secret``; ``sigma`` is the noise
    multiplier of the ledger) or ``"ft"`` (non-private).  Exactly ``hp.steps`` optimizer steps
    run; for the private methods each is one accounted release.  For ``dp-prefix`` the prefix
    stays installed on ``clf.model`` (so evaluation uses it) and every other weight is frozen.
    The model runs in eval mode (dropout off), as in the zeroth-order methods.

    History (like ``train.train_zo``): lists ``step``, ``lr``, ``loss`` (mean training loss of
    the sampled examples: a diagnostic on private data, not covered by the DP guarantee),
    ``examples`` and ``clipped_fraction`` every ``log_every`` steps and at the last step; and
    ``steps_run``, ``releases``, ``train_seconds``, ``ms_per_step``, ``trainable_parameters``;
    ``curve`` adds the test-loss points (``evaluate.TestLossCurve``).
    """
    n, sigma = len(train_set), float(sigma)
    private = _check_run(method, hp, n, sigma, secret)
    model = clf.model
    model.eval()  # dropout off, as for the zeroth-order methods
    params = _trained_parameters(model, method, hp, run_seed)
    optimizer = _make_optimizer(list(params.values()), hp)
    q = hp.batch_size / n
    expected_batch_size = float(hp.batch_size)  # q * n, public
    public_rng = np.random.default_rng([int(run_seed), 1])  # ft's batches: no privacy claim
    lengths = train_set.lengths

    history: dict[str, list] = {"step": [], "lr": [], "loss": [], "examples": [], "clipped_fraction": []}
    window = _Window()
    steps_run, examples_sampled = 0, 0  # counted, for the end-of-training check against the ledger
    started = time.perf_counter()
    progress = Progress(hp.steps)
    for step in range(hp.steps):
        if private:
            index = secret.poisson_batch(n, q)
        else:
            index = public_rng.choice(n, size=hp.batch_size, replace=False)
        # Physical micro-batches of similar lengths (less padding); the sums do not depend on it.
        index = index[np.argsort(lengths[index].numpy(), kind="stable")]
        chunks = [index[i : i + hp.physical_batch_size] for i in range(0, len(index), hp.physical_batch_size)]
        optimizer.zero_grad(set_to_none=True)
        if private:
            step_losses, clipped = _private_gradient(
                clf,
                params,
                train_set,
                chunks,
                hp,
                sigma=sigma,
                expected_batch_size=expected_batch_size,
                secret=secret,
                step=step,
            )
        else:
            step_losses, clipped = _plain_gradient(clf, train_set, chunks, hp, step=step)
        optimizer.step()
        window.add(step_losses, len(index), clipped)
        examples_sampled += len(index)
        steps_run += 1
        if (step + 1) % hp.log_every == 0 or step + 1 == hp.steps:
            window.close(history, step + 1, hp.lr, progress)
        if curve is not None:
            curve.after_step(step + 1, history)
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    return history | {
        "steps_run": steps_run,
        "releases": steps_run if private else 0,  # one noisy gradient per step
        "examples_sampled": examples_sampled,
        "n": n,
        "sampling_rate": q,
        "noise_scale_on_sum": sigma * hp.clip if private and sigma > 0 else 0.0,
        "noise_divisor": expected_batch_size,
        "train_seconds": elapsed,
        "ms_per_step": 1000.0 * elapsed / max(hp.steps, 1),
        "trainable_parameters": int(sum(p.numel() for p in params.values())),
    }
