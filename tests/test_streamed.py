"""Streamed training (blocks in host memory, one upload per block per step) equals resident training.

On the CPU the host and the compute device are the same machine, but the blocks still go
through the whole cycle: theta copied to a fresh buffer at each upload, the pending update
applied there, the 2P groups run, theta copied home and the working weights dropped.  Float64:
the weights and the history equal the resident trainer's to 1e-12 (the streamed pass runs all
groups of a step in one forward, so only the padding width of a batch differs).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers

from dpzo.data.tasks import TASKS
from dpzo.masks.settings import Mask, MaskSettings
from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.models.classifier import PromptClassifier
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.zo import flat as flat_module
from dpzo.zo.loop import train_zo
from dpzo.zo.streamed import StreamedParameters, find_blocks

from .tiny import examples, make_clf, tiny_llama

FAMILIES = ["opt", "llama", "roberta", "gpt2"]
SETTINGS = {
    # stages (beta moves, lr halves), the proximal anchor, two directions per step
    "dp-zoso": dict(
        steps=7, batch_size=6, lr=5e-2, stages=2, stage_steps=3, beta_start=1e-3, beta_end=1e-2, lam=0.3, clip=2.0
    ),
    "dp-zoso-2": dict(steps=5, batch_size=6, lr=5e-2, stages=2, stage_steps=2, lam=0.3, clip=2.0, directions=2),
    "dp-zopo": dict(
        steps=6,
        batch_size=6,
        lr=5e-2,
        stages=2,
        stage_steps=3,
        clip=2.0,
        mask=MaskSettings(scorer="magnitude", ratio=0.2, strategy="incremental", mode="rank", rank_update=True),
    ),
    "mezo": dict(steps=6, batch_size=6, lr=5e-2),
}


def make(tokenizer, family: str, seed: int = 4) -> PromptClassifier:
    if family in ("opt", "roberta"):
        return make_clf(tokenizer, "mlm" if family == "roberta" else "causal", seed=seed)
    torch.manual_seed(seed)
    task = dataclasses.replace(TASKS["SST-2"], label_words={"0": "bad", "1": "good"})
    if family == "gpt2":  # fused c_attn (Conv1D), learned positions, tied head
        cfg = transformers.GPT2Config(
            vocab_size=50,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=40,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = transformers.GPT2LMHeadModel(cfg).to(torch.float64).eval()
        return PromptClassifier(model, tokenizer, "causal", task)
    model = tiny_llama(seed=seed, layers=3, hidden=16)
    return PromptClassifier(model, tokenizer, "causal", task)


def growing_masks(model):
    """A mask per stage from the initial weights, growing as DP-ZOPO's incremental strategy (a
    streamed model's weights live in host memory: masks come from files, not from the model)."""
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    order = torch.argsort(theta.abs(), descending=True)

    def masks(stage: int) -> Mask:
        keep = theta.numel() // 5 + 7 * stage
        return Mask(torch.sort(order[:keep]).values, theta.numel(), scales=torch.linspace(1.2, 0.8, keep))

    return masks


def train(tokenizer, family: str, case: str, *, streamed: bool, master_dtype=torch.float64):
    clf = make(tokenizer, family)
    data = clf.encode(examples(24, seed=2))
    method = case.split("-2")[0]
    hp = ZOHyperparameters(**SETTINGS[case], log_every=1)
    masks = growing_masks(clf.model) if method == "dp-zopo" else None
    theta0 = torch.cat([p.detach().reshape(-1) for p in clf.model.parameters() if p.requires_grad])
    flat = None
    if streamed:
        flat = StreamedParameters(clf.model, master_dtype, device="cpu", direction_cache_size=hp.directions)
    private = method != "mezo"
    history = train_zo(
        clf.model,
        lambda index: clf.per_example_loss(data.batch(index, clf.device)),
        len(data),
        hp,
        method=method,
        run_seed=11,
        noise=NoisySum("gaussian", 0.5 * hp.clip, hp.batch_size) if private else None,
        secret=SecretRandom(insecure_test_seed=7) if private else None,
        masks=masks,
        master_dtype=master_dtype,
        store=flat,
    )
    with torch.no_grad():  # evaluation runs through the streamed forward too
        logits = clf.label_logits(data.batch(np.arange(len(data)), clf.device))
    theta = torch.cat([p.detach().reshape(-1) for _, p in sorted_parameters(clf.model, flat)])
    return theta, history, logits, theta0


def sorted_parameters(model, flat):
    """The trainable parameters in flat order; a streamed model's blocks read from their host copy."""
    if flat is None:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(str(i), part.master) for i, part in enumerate(flat.placed.parts)]


@pytest.mark.parametrize("kind", ["lora", "prefix"])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_streamed_adapters_equal_resident(tokenizer, family, kind):
    """tuning: lora / prefix: the frozen weights of a block travel with it, the adapters are its parts."""
    from dpzo.methods.hyperparameters import TuningSettings
    from dpzo.models.adapters import apply_tuning

    hp = ZOHyperparameters(steps=4, batch_size=6, lr=5e-2, clip=2.0, directions=2, log_every=1)
    results = []
    for streamed in (False, True):
        clf = make(tokenizer, family)
        apply_tuning(clf.model, TuningSettings(kind=kind, rank=2, tokens=2), seed=1)
        clf.model.to(torch.float64)
        data = clf.encode(examples(24, seed=2))
        with torch.no_grad():
            before = clf.label_logits(data.batch(np.arange(len(data)), clf.device))
        flat = StreamedParameters(clf.model, torch.float64, device="cpu", direction_cache_size=2) if streamed else None
        train_zo(
            clf.model,
            lambda index: clf.per_example_loss(data.batch(index, clf.device)),  # noqa: B023
            len(data),
            hp,
            method="dp-zoso",
            run_seed=11,
            noise=NoisySum("gaussian", 1.0, hp.batch_size),
            secret=SecretRandom(insecure_test_seed=7),
            master_dtype=torch.float64,
            store=flat,
        )
        with torch.no_grad():
            results.append(clf.label_logits(data.batch(np.arange(len(data)), clf.device)))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-12)
    assert float((results[0] - before).abs().max()) > 1e-6  # the adapters trained


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch, one_thread):
    monkeypatch.setattr(flat_module, "DIRECTION_CHUNK", 1000)  # z in several blocks, parts cut inside them


@pytest.mark.parametrize("case", sorted(SETTINGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_training_equals_resident(tokenizer, family, case):
    theta, history, logits, theta0 = train(tokenizer, family, case, streamed=False)
    s_theta, s_history, s_logits, _ = train(tokenizer, family, case, streamed=True)
    torch.testing.assert_close(s_theta, theta, rtol=0, atol=1e-12)
    torch.testing.assert_close(s_logits, logits, rtol=0, atol=1e-12)
    assert s_history["releases"] == history["releases"] and s_history["examples"] == history["examples"]
    np.testing.assert_allclose(s_history["loss"], history["loss"], rtol=0, atol=1e-12)
    assert float((theta - theta0).abs().max()) > 1e-3  # training moved the weights


def test_one_upload_per_block_per_step(tokenizer):
    clf = make(tokenizer, "opt")
    data = clf.encode(examples(24, seed=2))
    steps = 5
    hp = ZOHyperparameters(steps=steps, batch_size=6, lr=5e-2, clip=2.0, directions=2, log_every=steps)
    flat = StreamedParameters(clf.model, torch.float64, device="cpu", direction_cache_size=2)
    blocks = find_blocks(clf.model)
    assert len(blocks) == 2 and len(flat.uploads) == 2
    forwards = []
    train_zo(
        clf.model,
        lambda index: forwards.append(len(index)) or clf.per_example_loss(data.batch(index, clf.device)),
        len(data),
        hp,
        method="dp-zoso",
        run_seed=11,
        noise=NoisySum("gaussian", 1.0, 6),
        secret=SecretRandom(insecure_test_seed=7),
        master_dtype=torch.float64,
        store=flat,
    )
    # one forward per step over both directions' batches, each twice (+ and -); one upload of each
    # block per step, and one more at the end that applies the last step's update
    assert len(forwards) == steps
    assert flat.uploads == [steps + 1, steps + 1]
    # between uploads a block's working weights are a zero-stride placeholder: theta lives on the host
    weight = blocks[0].self_attn.k_proj.weight
    assert weight.stride() == (0, 0) and not any(flat._pending)
    assert not flat._fetched  # every block fetched ahead (the next one, during a block's compute) was used


def test_streamed_refuses_a_forward_that_splits_the_step(tokenizer):
    clf = make(tokenizer, "roberta")
    data = clf.encode(examples(24, seed=2))
    flat = StreamedParameters(clf.model, torch.float64, device="cpu")

    def two_forwards(index):  # a loss computed in two halves cannot be grouped
        half = len(index) // 2
        return torch.cat([clf.per_example_loss(data.batch(i, clf.device)) for i in (index[:half], index[half:])])

    with pytest.raises(RuntimeError, match="one forward per step"):
        flat.two_point_losses(two_forwards, [(np.arange(4), 9)], 1e-3)


def test_offload_config_is_checked_before_any_job():
    from dpzo.pipeline.config import _offload_problems

    config = {
        "models": {
            "big": {"path": "x", "offload": "streamed", "placement": "auto", "ranks": 2},
            "small": {"path": "y"},
        },
        "methods": {
            "dp-zoso": {},
            "dp-sgd": {},
            "dp-zopo": {"mask": {"strategy": "dynamic"}},
            "dp-zopo+static": {"mask": {"strategy": "static"}},
        },
    }
    problems = _offload_problems(config)
    assert len(problems) == 4, problems
    assert any("remove 'models.big.placement'" in p for p in problems)
    assert any("set ranks and gpus_per_rank to 1" in p for p in problems)
    assert any("dp-sgd backpropagates" in p for p in problems)
    assert any("dp-zopo rescores its mask" in p for p in problems)
    config["models"]["big"] = {"path": "x", "offload": "streamed", "grid": {"methods": ["dp-zoso", "dp-zopo+static"]}}
    assert _offload_problems(config) == []


@pytest.mark.slow
def test_streamed_cells_through_the_dag_equal_resident_ones(tiny_run, tmp_path):
    """models.<key>.offload: streamed on the tiny grid: the zeroth-order cells rerun streamed and
    give the resident run's results (float32 model: equal up to rounding)."""
    import json
    import shutil

    import yaml

    from .pipeline import snakemake
    from .test_workflow import TINY

    workdir = tmp_path / "streamed"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    config = dict(TINY, models={"demo-roberta": {"demo": "roberta", "offload": "streamed"}})
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(workdir)
    for cell in ("mezo/epsinf/seed13", "dp-zoso/eps8/seed13"):
        resident = json.loads((tiny_run / "results/runs/demo-roberta/demo-sst2" / cell / "metrics.json").read_text())
        streamed = json.loads((workdir / "results/runs/demo-roberta/demo-sst2" / cell / "metrics.json").read_text())
        assert streamed["accuracy"] == resident["accuracy"], cell
        assert streamed["test_loss"] == pytest.approx(resident["test_loss"], rel=1e-4), cell
        assert streamed["releases"] == resident["releases"], cell


def test_a_streamed_run_resumes_from_its_snapshot_to_the_uninterrupted_result(tokenizer, tmp_path):
    from dpzo.zo.checkpoint import CheckpointPolicy, TrainingCheckpoint

    path = tmp_path / "state.pt"
    hp = ZOHyperparameters(**SETTINGS["dp-zoso-2"], log_every=1)

    def run(checkpoint=None, die_after=None):
        clf = make(tokenizer, "llama")
        data = clf.encode(examples(24, seed=2))
        flat = StreamedParameters(clf.model, torch.float64, device="cpu", direction_cache_size=hp.directions)
        calls = []

        def loss(index):
            calls.append(1)
            if die_after is not None and len(calls) > die_after:
                raise KeyboardInterrupt
            return clf.per_example_loss(data.batch(index, clf.device))

        history = train_zo(
            clf.model,
            loss,
            len(data),
            hp,
            method="dp-zoso",
            run_seed=11,
            noise=NoisySum("gaussian", 0.5 * hp.clip, hp.batch_size),
            secret=SecretRandom(insecure_test_seed=7),
            master_dtype=torch.float64,
            store=flat,
            checkpoint=checkpoint,
        )
        return flat.master, history

    snapshots = lambda: TrainingCheckpoint(CheckpointPolicy(path, every_steps=2, every_seconds=0), {"cell": 1})  # noqa: E731
    theta, history = run()
    with pytest.raises(KeyboardInterrupt):
        run(snapshots(), die_after=3)  # dies in step 3, after the snapshot of step 2
    resumed, resumed_history = run(snapshots())
    assert resumed_history["resumed_from"]
    torch.testing.assert_close(resumed, theta, rtol=0, atol=1e-12)
    assert resumed_history["releases"] == history["releases"]


def test_a_step_of_empty_batches_releases_the_noise_alone_as_the_resident_store(tokenizer):
    """B = 1 of 24, secret seed 28: the second step's two Poisson batches are both empty (sizes
    [0, 1], [0, 0], [1, 2]).  Streamed, that step runs no forward and its releases are the noise
    alone, its update pending with the first step's until the third step's uploads: theta ends
    where the resident store's does."""
    hp = ZOHyperparameters(steps=3, batch_size=1, lr=5e-2, clip=2.0, lam=0.3, directions=2, log_every=1)
    thetas, forwards = [], []
    for streamed in (False, True):
        clf = make(tokenizer, "llama")
        data = clf.encode(examples(24, seed=2))
        flat = StreamedParameters(clf.model, torch.float64, device="cpu", direction_cache_size=2) if streamed else None
        forwards.append([])
        train_zo(
            clf.model,
            lambda index: forwards[-1].append(len(index)) or clf.per_example_loss(data.batch(index, clf.device)),  # noqa: B023
            len(data),
            hp,
            method="dp-zoso",
            run_seed=11,
            noise=NoisySum("gaussian", 1.0, hp.batch_size),
            secret=SecretRandom(insecure_test_seed=28),
            master_dtype=torch.float64,
            store=flat,
        )
        thetas.append(torch.cat([p.detach().reshape(-1) for _, p in sorted_parameters(clf.model, flat)]))
    assert forwards == [[1, 1, 1, 1, 2, 2], [2, 6]]  # the batches: resident two forwards each, streamed one per step
    torch.testing.assert_close(thetas[1], thetas[0], rtol=0, atol=1e-12)
