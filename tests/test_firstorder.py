"""First-order baselines (dp-sgd, dp-prefix, ft) on tiny random-init RoBERTa/OPT models.

References are independent of the code under test: per-example gradients against one
``backward`` per example; the prefix against transformers' own key/value cache mechanism;
the noisy update against a replay of the seeded secret RNG.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import stats

from dpzo.baselines import firstorder as fo
from dpzo.data.tasks import TASKS  # noqa: F401
from dpzo.models.evaluate import evaluate
from dpzo.models.prefix import _attention_layers, install_prefix, prefix_modules, remove_prefix
from dpzo.privacy.secret import SecretRandom

from .tiny import FAMILIES, examples, make_clf  # noqa: F401 (tokenizer fixture: conftest)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def loop_clipped_sum(clf, params, data, index, clip):
    """Reference: each example alone, backward, clip the joint norm, accumulate."""
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in index:
        for p in params.values():
            p.grad = None
        clf.per_example_loss(data.batch([int(i)])).sum().backward()
        g = {k: p.grad.detach().clone() for k, p in params.items()}
        norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in g.values()))
        factor = min(1.0, clip / norm)
        for k in total:
            total[k] += factor * g[k]
    for p in params.values():
        p.grad = None
    return total


# --------------------------------------------------------------------------------------
# hyperparameters and argument checks
# --------------------------------------------------------------------------------------


def test_from_config_refuses_unknown_keys_and_reads_inf():
    hp = fo.FirstOrderHyperparameters.from_config({"steps": 3, "batch_size": 2, "lr": 1e-3, "clip": "inf"})
    assert hp.clip == math.inf and hp.optimizer == "adamw" and hp.physical_batch_size == 8 and hp.prefix_tokens == 5
    with pytest.raises(ValueError, match="allowed.*physical_batch_size"):
        fo.FirstOrderHyperparameters.from_config({"steps": 3, "batch_size": 2, "lr": 1e-3, "beta": 1})
    with pytest.raises(ValueError, match="optimizer"):
        fo.FirstOrderHyperparameters(steps=1, batch_size=1, lr=1.0, optimizer="adam")


def test_hyperparameters_fit_the_ledger_check():
    from dpzo.privacy.ledger import LedgerMismatch, check_counts

    hp = fo.FirstOrderHyperparameters(steps=7, batch_size=2, lr=1e-3, clip=0.5)
    ledger = {
        "n": 8,
        "steps": 7,
        "directions": 1,
        "compositions": 7,
        "expected_batch_size": 2.0,
        "clip": 0.5,
        "q": 0.25,
    }
    check_counts(ledger, n=8, hp=hp, method="dp-sgd")
    with pytest.raises(LedgerMismatch, match="steps"):
        check_counts({**ledger, "steps": 8}, n=8, hp=hp, method="dp-sgd")


def test_argument_checks(tokenizer):
    clf = make_clf(tokenizer, "causal")
    data = clf.encode(examples(8))
    hp = fo.FirstOrderHyperparameters(steps=1, batch_size=2, lr=1e-3, clip=1.0)
    for method in fo.PRIVATE_FIRST_ORDER_METHODS:
        with pytest.raises(ValueError, match="secret RNG"):
            fo.train_first_order(clf, data, hp, method=method, run_seed=0, sigma=1.0)
    with pytest.raises(ValueError, match="larger than the training set"):
        fo.train_first_order(
            clf,
            data,
            dataclasses.replace(hp, batch_size=9),
            method="dp-sgd",
            run_seed=0,
            sigma=1.0,
            secret=SecretRandom(insecure_test_seed=0),
        )
    with pytest.raises(ValueError, match="finite clip"):
        fo.train_first_order(
            clf,
            data,
            dataclasses.replace(hp, clip=math.inf),
            method="dp-sgd",
            run_seed=0,
            sigma=1.0,
            secret=SecretRandom(insecure_test_seed=0),
        )
    with pytest.raises(ValueError, match="clip must be inf"):
        fo.train_first_order(clf, data, hp, method="ft", run_seed=0)
    with pytest.raises(ValueError, match="runs"):
        fo.train_first_order(clf, data, hp, method="mezo", run_seed=0)


@pytest.mark.parametrize("method", fo.FIRST_ORDER_METHODS)
def test_non_finite_loss_names_the_step(tokenizer, method):
    clf = make_clf(tokenizer, "mlm")
    data = clf.encode(examples(8))
    with torch.no_grad():
        clf.model.lm_head.dense.weight.fill_(float("nan"))
    hp = fo.FirstOrderHyperparameters(steps=3, batch_size=8, lr=1e-3, clip=1.0 if method != "ft" else math.inf)
    kw = {} if method == "ft" else dict(sigma=1.0, secret=SecretRandom(insecure_test_seed=5))
    # q = 1: every example is in the (Poisson) batch, so the first step already sees NaN.
    with pytest.raises(FloatingPointError, match="at step 0"):
        fo.train_first_order(clf, data, hp, method=method, run_seed=0, **kw)


# --------------------------------------------------------------------------------------
# per-example clipping
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("clipping", ["all", "some", "none"])
def test_clipped_sum_equals_loop_over_examples(tokenizer, family, clipping):
    clf = make_clf(tokenizer, family)
    data = clf.encode(examples(8))
    params = fo.trainable_parameters(clf.model)
    index = np.array([0, 3, 4, 5, 7])  # different lengths: the vmapped batch is padded
    assert len(set(data.lengths[index].tolist())) > 1
    clip = math.inf
    if clipping != "none":
        _, _, raw_norms = fo.clipped_grad_sum(clf, params, data.batch(index), math.inf)
        clip = 0.05 if clipping == "all" else float(raw_norms.median())
    sums, losses, norms = fo.clipped_grad_sum(clf, params, data.batch(index), clip)
    ref = loop_clipped_sum(clf, params, data, index, clip)
    assert set(sums) == set(ref)
    scale = max(float(r.abs().max()) for r in ref.values())
    for k in ref:
        torch.testing.assert_close(sums[k], ref[k], rtol=0, atol=1e-9 * scale)
    with torch.no_grad():
        torch.testing.assert_close(losses, clf.per_example_loss(data.batch(index)), rtol=1e-12, atol=0)
    if clipping == "all":
        assert bool((norms > clip).all())  # the clip really binds
    if clipping == "some":
        assert bool((norms > clip).any()) and bool((norms < clip).any())


@pytest.mark.parametrize("family", FAMILIES)
def test_clipped_sum_on_prefix_parameters_equals_loop(tokenizer, family):
    clf = make_clf(tokenizer, family)
    data = clf.encode(examples(8))
    prefix = install_prefix(clf.model, 3, seed=0)
    for name, p in clf.model.named_parameters():
        p.requires_grad_(name in prefix)
    index = np.array([1, 2, 6])
    sums, _, norms = fo.clipped_grad_sum(clf, prefix, data.batch(index), 1e-4)
    ref = loop_clipped_sum(clf, prefix, data, index, 1e-4)
    assert bool((norms > 1e-4).all())
    for k in ref:
        torch.testing.assert_close(sums[k], ref[k], rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------------
# noise and sampling
# --------------------------------------------------------------------------------------


def test_noise_has_std_sigma_c_and_independent_coordinates():
    sigma, clip, expected = 1.7, 0.3, 4.0
    sums = {"a": torch.zeros(300, 200, dtype=torch.float64), "b": torch.zeros(60_000, dtype=torch.float64)}
    out = fo.privatize_gradients(
        sums, sigma=sigma, clip=clip, expected_batch_size=expected, secret=SecretRandom(insecure_test_seed=11)
    )
    z = torch.cat([out["a"].reshape(-1), out["b"]]).numpy() * expected / (sigma * clip)
    n = z.size
    assert abs(z.mean()) < 4 / math.sqrt(n)
    assert abs(z.std() - 1.0) < 4 / math.sqrt(2 * n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    for lag in (1, 2, 200):  # neighbours in a row, across rows, and across the two tensors
        r = np.corrcoef(z[:-lag], z[lag:])[0, 1]
        assert abs(r) < 4 / math.sqrt(n)
    r = np.corrcoef(out["a"].reshape(-1)[:60_000].numpy(), out["b"].numpy())[0, 1]
    assert abs(r) < 4 / math.sqrt(60_000)
    # the same seed gives the same noise, another seed another one
    again = fo.privatize_gradients(
        sums, sigma=sigma, clip=clip, expected_batch_size=expected, secret=SecretRandom(insecure_test_seed=11)
    )
    assert torch.equal(again["b"], out["b"])
    other = fo.privatize_gradients(
        sums, sigma=sigma, clip=clip, expected_batch_size=expected, secret=SecretRandom(insecure_test_seed=12)
    )
    assert not torch.equal(other["b"], out["b"])


def test_secret_normals_vectorised_and_scalar_paths_agree():
    class ScalarOnly:  # a secret RNG exposing only the scalar draw
        def __init__(self, seed):
            self._rng = SecretRandom(insecure_test_seed=seed)

        def standard_normal(self):
            return self._rng.standard_normal()

    fast = fo.secret_normals(SecretRandom(insecure_test_seed=8), 1000)
    slow = fo.secret_normals(ScalarOnly(8), 1000)
    assert fast.shape == (1000,) and np.array_equal(fast, slow)


def test_no_noise_at_sigma_zero():
    sums = {"a": torch.arange(6.0)}
    out = fo.privatize_gradients(sums, sigma=0.0, clip=math.inf, expected_batch_size=2.0, secret=None)
    assert torch.equal(out["a"], torch.arange(6.0) / 2)


def _seed_with_first_batch(n, q, empty):
    for seed in range(1000):
        if (len(SecretRandom(insecure_test_seed=seed).poisson_batch(n, q)) == 0) == empty:
            return seed
    raise AssertionError("no seed found")


@pytest.mark.parametrize(
    "family,method,empty",
    [("mlm", "dp-sgd", False), ("causal", "dp-sgd", False), ("causal", "dp-prefix", False), ("mlm", "dp-sgd", True)],
)
def test_private_step_replays_poisson_batch_clipping_and_noise(tokenizer, family, method, empty):
    """One SGD step (lr 1) moves theta by exactly -(clipped sum + sigma C z) / (q n).

    The replay draws the Poisson batch and then the noise from a SecretRandom with the same
    test seed, in the documented order (batch, then one normal per coordinate, tensor by tensor).
    An empty Poisson batch gives a noise-only update.
    """
    n, batch_size, sigma, clip = 8, 3, 0.7, 0.5
    seed = _seed_with_first_batch(n, batch_size / n, empty)
    clf = make_clf(tokenizer, family)
    data = clf.encode(examples(n))
    hp = fo.FirstOrderHyperparameters(
        steps=1, batch_size=batch_size, lr=1.0, clip=clip, optimizer="sgd", physical_batch_size=2, prefix_tokens=2
    )
    reference = copy.deepcopy(clf)  # model, tokenizer and head of the untouched copy
    fo.train_first_order(
        clf, data, hp, method=method, run_seed=3, sigma=sigma, secret=SecretRandom(insecure_test_seed=seed)
    )

    replay = SecretRandom(insecure_test_seed=seed)
    index = replay.poisson_batch(n, batch_size / n)
    assert (len(index) == 0) == empty
    if method == "dp-prefix":
        install_prefix(reference.model, hp.prefix_tokens, seed=3)  # same public initialisation
        for name, p in reference.model.named_parameters():
            p.requires_grad_(".dpzo_prefix." in name)
    params = fo.trainable_parameters(reference.model)
    sums = loop_clipped_sum(reference, params, data, index, clip)
    after = dict(clf.model.named_parameters())
    for name, p in params.items():
        z = torch.from_numpy(np.array([replay.standard_normal() for _ in range(p.numel())])).view(p.shape)
        expected = p.detach() - (sums[name] + sigma * clip * z) / batch_size
        torch.testing.assert_close(after[name].detach(), expected, rtol=0, atol=1e-12)


def test_poisson_inclusion_rate_matches_q(tokenizer):
    n, batch_size, steps = 16, 4, 40
    clf = make_clf(tokenizer, "causal", dtype=torch.float32)
    data = clf.encode(examples(n))
    hp = fo.FirstOrderHyperparameters(
        steps=steps, batch_size=batch_size, lr=1e-3, clip=1.0, log_every=1, prefix_tokens=1
    )
    history = fo.train_first_order(
        clf, data, hp, method="dp-prefix", run_seed=0, sigma=1.0, secret=SecretRandom(insecure_test_seed=2024)
    )
    sizes = np.array(history["examples"])
    q = batch_size / n
    # Binomial(n, q) per step: mean q n, variance n q (1 - q); the sizes vary (not fixed-size).
    assert abs(sizes.sum() - steps * n * q) < 4 * math.sqrt(steps * n * q * (1 - q))
    assert len(set(sizes.tolist())) > 1
    # direct check of the sampler on many draws
    secret = SecretRandom(insecure_test_seed=1)
    counts = np.zeros(n)
    for _ in range(4000):
        counts[secret.poisson_batch(n, q)] += 1
    assert np.all(np.abs(counts / 4000 - q) < 4 * math.sqrt(q * (1 - q) / 4000))


# --------------------------------------------------------------------------------------
# prefix tuning
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_matches_transformers_cache_reference(tokenizer, family, attn):
    """The installed prefix computes exactly what transformers computes when the same keys/values
    are given as a past key/value cache (with the mask extended and the positions kept)."""
    from transformers import DynamicCache

    clf = make_clf(tokenizer, family, attn=attn)
    data = clf.encode(examples(6))
    batch = data.batch(np.arange(6))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not bool(mask.all())  # padded batch
    base = clf.model.base_model
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).last_hidden_state
        prefix = install_prefix(clf.model, 3, seed=1)
        assert len(prefix) == 2 * 2  # key and value in each of the 2 layers
        with_prefix = base(input_ids=ids, attention_mask=mask).last_hidden_state
        kv = [(m.key.clone(), m.value.clone()) for m in prefix_modules(clf.model)]
        remove_prefix(clf.model)
        assert torch.equal(base(input_ids=ids, attention_mask=mask).last_hidden_state, plain)

        b, s, p = ids.shape[0], ids.shape[1], 3
        cache = DynamicCache(config=clf.model.config)
        for layer, (k, v) in enumerate(kv):
            cache.update(k[None].expand(b, -1, -1, -1).clone(), v[None].expand(b, -1, -1, -1).clone(), layer)
        if family == "causal":
            positions = (mask.cumsum(1) * mask - 1).long()  # OPT's own positions without the prefix
            extended = torch.cat([torch.ones(b, p, dtype=mask.dtype), mask], dim=1)
            ref = base(input_ids=ids, attention_mask=extended, past_key_values=cache, position_ids=positions)
        else:
            positions = base.embeddings.create_position_ids_from_input_ids(ids, clf.model.config.pad_token_id)
            visible = torch.cat([torch.ones(b, p, dtype=torch.bool), mask.bool()], dim=1)
            additive = torch.zeros(b, 1, s, s + p, dtype=plain.dtype).masked_fill(
                ~visible[:, None, None, :], torch.finfo(plain.dtype).min
            )
            ref = base(input_ids=ids, attention_mask=additive, past_key_values=cache, position_ids=positions)
    real = mask.bool()
    torch.testing.assert_close(with_prefix[real], ref.last_hidden_state[real], rtol=1e-12, atol=1e-12)
    assert float((with_prefix - plain)[real].abs().max()) > 1e-5  # the prefix is really attended to


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_initialised_from_real_activations_and_padding_invariant(tokenizer, family):
    clf = make_clf(tokenizer, family)
    captured = {}
    layers = _attention_layers(clf.model)
    k_lin = layers[1][2]
    handle = k_lin.register_forward_hook(lambda m, i, o: captured.setdefault("k", o.detach()))
    ids = torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        clf.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))
    handle.remove()
    install_prefix(clf.model, 4, seed=9)
    heads, head_dim = layers[1][4], layers[1][5]
    expected = captured["k"].reshape(4, heads, head_dim).transpose(0, 1)
    assert torch.equal(prefix_modules(clf.model)[1].key.detach(), expected)
    data = clf.encode(examples(6))
    with torch.no_grad():
        together = clf.label_logits(data.batch(np.arange(6)))
        alone = torch.cat([clf.label_logits(data.batch([i])) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_dp_prefix_keeps_model_weights_bit_identical_and_changes_outputs(tokenizer, family):
    clf = make_clf(tokenizer, family, dtype=torch.float32)
    data = clf.encode(examples(8))
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    with torch.no_grad():
        logits_before = clf.label_logits(data.batch(np.arange(8)))
    hp = fo.FirstOrderHyperparameters(steps=3, batch_size=4, lr=0.05, clip=1.0, prefix_tokens=2)
    history = fo.train_first_order(
        clf, data, hp, method="dp-prefix", run_seed=1, sigma=1.0, secret=SecretRandom(insecure_test_seed=3)
    )
    after = clf.model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    new = sorted(set(after) - set(before))
    assert new and all(".dpzo_prefix." in k for k in new)
    assert history["trainable_parameters"] == 2 * 2 * 2 * 16  # layers x (key, value) x P x hidden
    assert all(not p.requires_grad for n, p in clf.model.named_parameters() if ".dpzo_prefix." not in n)
    with torch.no_grad():
        logits_after = clf.label_logits(data.batch(np.arange(8)))  # evaluation goes through the prefix
    # random-init weights (std 0.02) make the prefix's effect small but far above float32 noise
    assert float((logits_after - logits_before).abs().max()) > 1e-6
    with pytest.raises(RuntimeError, match="already has a prefix"):
        fo.train_first_order(
            clf, data, hp, method="dp-prefix", run_seed=1, sigma=1.0, secret=SecretRandom(insecure_test_seed=3)
        )


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,method", [("causal", "ft"), ("mlm", "ft"), ("causal", "dp-sgd"), ("mlm", "dp-sgd")])
def test_training_reduces_the_loss_on_a_separable_task(tokenizer, family, method):
    clf = make_clf(tokenizer, family, dtype=torch.float32)
    data = clf.encode(examples(16))
    start = evaluate(clf, data)
    private = method == "dp-sgd"
    hp = fo.FirstOrderHyperparameters(steps=40, batch_size=8, lr=1e-2, clip=1e6 if private else math.inf)
    kw = dict(sigma=0.0, secret=SecretRandom(insecure_test_seed=0)) if private else {}
    history = fo.train_first_order(clf, data, hp, method=method, run_seed=0, **kw)
    end = evaluate(clf, data)
    assert end["loss"] < 0.5 * start["loss"], (start, end)
    assert end["accuracy"] >= 0.75 > start["accuracy"]
    assert history["clipped_fraction"] == [0.0] * len(history["step"])
    assert history["trainable_parameters"] == sum(p.numel() for p in clf.model.parameters())


@pytest.mark.parametrize("method", fo.FIRST_ORDER_METHODS)
def test_exactly_steps_updates_and_history_shape(tokenizer, method):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    clf = make_clf(tokenizer, "causal", dtype=torch.float32)
    data = clf.encode(examples(8))
    private = method != "ft"
    hp = fo.FirstOrderHyperparameters(
        steps=7, batch_size=2, lr=1e-3, clip=1.0 if private else math.inf, log_every=3, prefix_tokens=1
    )
    kw = dict(sigma=0.5, secret=SecretRandom(insecure_test_seed=4)) if private else {}
    calls = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    try:
        history = fo.train_first_order(clf, data, hp, method=method, run_seed=0, **kw)
    finally:
        handle.remove()
    assert len(calls) == 7
    assert history["steps_run"] == 7
    assert history["releases"] == (7 if private else 0)
    assert history["step"] == [3, 6, 7]
    for key in ("loss", "examples", "clipped_fraction"):
        assert len(history[key]) == 3
    if not private:
        assert history["examples"] == [6, 6, 2]
    assert history["train_seconds"] > 0 and history["ms_per_step"] > 0
