"""A model split over several buffers (one per device when placed) trains exactly as one buffer.

On the CPU the split is made by hand (``parts``) and through a real accelerate device map; z
is drawn in small blocks here so that parts start and end inside blocks.  Float64, master copy
and in place: the weights and the whole history are bit for bit those of the single buffer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpzo.masks.settings import Mask
from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.zo import flat as flat_module
from dpzo.zo.checkpoint import CheckpointPolicy, TrainingCheckpoint
from dpzo.zo.flat import FlatParameters, gaussian_direction
from dpzo.zo.loop import train_zo
from dpzo.zo.placed import PlacedParameters
from dpzo.zo.store import build_store

from .test_checkpoint import CASES, N, top_magnitude_masks
from .test_zo import Quadratic, TwoTensorModel
from .tiny import examples, make_clf


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch, one_thread):
    monkeypatch.setattr(flat_module, "DIRECTION_CHUNK", 4)  # TwoTensorModel: 10 coordinates, 3 blocks


def train(method, *, parts=None, master_dtype=torch.float64, checkpoint=None, die_after=None):
    case = CASES[method]
    quad, model = Quadratic(n=N), TwoTensorModel()
    inner, calls = quad.loss_fn(model), []

    def loss(index):
        calls.append(1)
        if die_after is not None and len(calls) > die_after:
            raise KeyboardInterrupt
        return inner(index)

    history = train_zo(
        model,
        loss,
        N,
        ZOHyperparameters(**case["hp"]),
        method=method,
        run_seed=13,
        noise=NoisySum("gaussian", 2.0, 8.0) if case["private"] else None,
        secret=SecretRandom(insecure_test_seed=5) if case["private"] else None,
        masks=top_magnitude_masks(model) if method == "dp-zopo" else None,
        master_dtype=master_dtype,
        parts=parts,
        checkpoint=checkpoint,
    )
    return model.theta().detach().clone(), history


def comparable(history):
    return {k: v for k, v in history.items() if k not in ("train_seconds", "ms_per_step", "resumed_from")}


def test_z_of_a_part_is_its_coordinates_of_the_whole_z():
    model = TwoTensorModel()
    placed = build_store(model, master_dtype=torch.float64, parts=[["w"], ["b"]])
    assert isinstance(placed, PlacedParameters) and [p.offset for p in placed.parts] == [0, 6]
    whole = gaussian_direction(99, 10, dtype=torch.float64)
    assert torch.equal(placed.direction(99), whole)
    # ... and the blocks really are seeded by their index: a block's z is not the next draws of the previous one
    assert not torch.equal(
        whole[4:8], torch.randn(10, generator=torch.Generator().manual_seed(99), dtype=torch.float64)[4:8]
    )


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("master_dtype", [torch.float64, None], ids=["master", "in-place"])
def test_a_split_model_trains_bit_for_bit_as_one_buffer(method, master_dtype):
    theta, history = train(method, master_dtype=master_dtype)
    split_theta, split_history = train(method, parts=[["w"], ["b"]], master_dtype=master_dtype)
    assert torch.equal(split_theta, theta)
    assert comparable(split_history) == comparable(history)


def test_a_mask_that_leaves_a_part_out_never_writes_it():
    model = TwoTensorModel()
    placed = build_store(model, master_dtype=torch.float64, parts=[["w"], ["b"]])
    b_before = model.b.detach().clone()
    placed.set_mask(torch.tensor([0, 3, 5]))  # all in w
    assert [p is placed.parts[0] for p in placed.active] == [True]
    placed.perturb(7, 0.1)
    placed.add_directions([(7, -0.5)])
    placed.restore()
    assert torch.equal(model.b.detach(), b_before)
    state = placed.state_dict()
    assert state["mask"].tolist() == [0, 3, 5]


def test_a_split_run_resumes_from_a_snapshot_to_the_uninterrupted_result(tmp_path):
    theta, history = train("dp-zoso")
    path = tmp_path / "state.pt"
    snapshots = lambda: TrainingCheckpoint(CheckpointPolicy(path, every_steps=3, every_seconds=0), {"cell": 1})  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        train("dp-zoso", parts=[["w"], ["b"]], checkpoint=snapshots(), die_after=30)
    # the snapshot of the split run is the whole vector's: one buffer resumes it as well
    resumed, resumed_history = train("dp-zoso", checkpoint=snapshots())
    assert resumed_history["resumed_from"] and torch.equal(resumed, theta)
    assert comparable(resumed_history) == comparable(history)


def _trainable(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def _train_clf(clf, data, hp, parts=None, masks=None):
    loss = lambda index: clf.per_example_loss(data.batch(index, clf.device))  # noqa: E731
    return train_zo(
        clf.model,
        loss,
        len(data),
        hp,
        method="dp-zopo" if masks else "dp-zoso",
        run_seed=3,
        noise=NoisySum("gaussian", 1.0, hp.batch_size),
        secret=SecretRandom(insecure_test_seed=2),
        masks=masks,
        master_dtype=torch.float64,
        parts=parts,
    )


@pytest.mark.parametrize("masked", [False, True], ids=["dp-zoso", "dp-zopo"])
def test_a_transformer_in_three_parts_trains_as_one(tokenizer, monkeypatch, masked):
    monkeypatch.setattr(flat_module, "DIRECTION_CHUNK", 1000)  # several blocks, parts cut inside them
    hp = ZOHyperparameters(steps=5, batch_size=8, lr=1e-2, stages=2, stage_steps=2, clip=2.0, log_every=1)
    if masked:
        from dpzo.masks.settings import MaskSettings

        hp = ZOHyperparameters(**{**hp.__dict__, "mask": MaskSettings(scorer="magnitude", ratio=0.3)})
    results = []
    for parts in (None, "thirds"):
        clf = make_clf(tokenizer, "mlm", seed=4)
        data = clf.encode(examples(16, seed=2))
        names = [n for n, p in clf.model.named_parameters() if p.requires_grad]
        cut = None if parts is None else [list(a) for a in np.array_split(names, 3)]
        numel = sum(p.numel() for p in clf.model.parameters() if p.requires_grad)
        gen = torch.Generator().manual_seed(1)
        index = torch.randperm(numel, generator=gen)[: numel // 3].sort().values
        masks = (lambda stage, index=index, numel=numel: Mask(index, numel)) if masked else None
        history = _train_clf(clf, data, hp, cut, masks)
        results.append((_trainable(clf.model), comparable(history)))
    assert torch.equal(results[1][0], results[0][0])
    assert results[1][1] == results[0][1]


def test_the_store_of_an_unplaced_model_is_one_buffer():
    assert type(build_store(TwoTensorModel())) is FlatParameters


@pytest.mark.parametrize("master_dtype", [torch.float32, None], ids=["master", "in-place"])
def test_a_model_whose_device_map_offloaded_modules_is_refused(master_dtype):
    """What accelerate leaves of a module a device map sent to cpu or disk beside a GPU: weights on
    meta (brought back by hooks at each forward). A store would hold meta buffers: refused by name."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2, device="meta"))
    with pytest.raises(ValueError, match=r"2 trainable parameters have no weights on a device \(1\.weight, 1\.bias"):
        build_store(model, master_dtype=master_dtype)


@pytest.mark.parametrize("placement", ["auto", {"": "cpu"}], ids=["auto", "module-map"])
def test_a_model_loaded_through_a_device_map_trains_and_scores_as_the_plain_one(tmp_path, placement):
    """Loading through accelerate's device map on the CPU (all a CPU machine has: transformers
    resolves it to the one device) gives the same losses, trajectory and candidate scores; the
    several-device machinery itself is tested above with parts cut by hand."""
    from dpzo.data.tasks import get_task
    from dpzo.models.candidates import make_scorer
    from dpzo.models.classifier import load_model

    from .hf_fixtures import corpus, tiny_opt

    path = tiny_opt(tmp_path / "opt", corpus())
    task = get_task("mezo-sst2")  # candidate scoring: multi-token label words through the head
    runs = []
    for how in (None, placement):
        lm, tokenizer, family = load_model(path, placement=how)
        clf = make_scorer(lm, tokenizer, family, task)
        data = clf.encode(examples(16, seed=3))
        hp = ZOHyperparameters(steps=4, batch_size=8, lr=1e-3, clip=2.0, log_every=1)
        history = _train_clf(clf, data, hp)
        runs.append((_trainable(lm), comparable(history), clf.per_example_loss(data.batch(range(16), clf.device))))
    assert torch.equal(runs[1][0], runs[0][0]) and runs[1][1] == runs[0][1]
    assert torch.equal(runs[1][2], runs[0][2])
