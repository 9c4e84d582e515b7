"""One contract for where theta lives (``dpzo.zo.store``): every store implements all of it, the
factory is the one place a store is chosen, and the stores agree when driven through it alone."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from dpzo.zo import flat as flat_module
from dpzo.zo.flat import FlatParameters
from dpzo.zo.placed import PlacedParameters
from dpzo.zo.store import STATE_KEYS, ParameterStore, ResidentStore, build_store
from dpzo.zo.streamed import StreamedParameters

from .test_zo import TwoTensorModel
from .tiny import tiny_llama

ZO = Path(__file__).parents[1] / "src" / "dpzo" / "zo"
STORES = (FlatParameters, PlacedParameters, StreamedParameters)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch, one_thread):
    monkeypatch.setattr(flat_module, "DIRECTION_CHUNK", 500)  # z in several blocks, parts cut inside them


def members(protocol: type) -> dict[str, object]:
    """The protocol's members, its bases' included: name -> its declaration (None: a data member)."""
    out: dict[str, object] = {}
    for base in reversed(protocol.__mro__):
        if base is object or not getattr(base, "_is_protocol", False):
            continue
        out.update({name: None for name in getattr(base, "__annotations__", {})})
        out.update(
            {n: v for n, v in vars(base).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
        )
    return out


def cut_in_thirds(model):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [list(a) for a in np.array_split(names, 3)]


def stores() -> dict[str, tuple[torch.nn.Module, ParameterStore]]:
    """Every kind of store, each over its own copy of the same model."""
    built = {}
    for name, settings in {
        "flat": dict(master_dtype=torch.float64),
        "flat-in-place": dict(master_dtype=None),
        "placed": dict(master_dtype=torch.float64, parts="thirds"),
        "placed-in-place": dict(master_dtype=None, parts="thirds"),
        "streamed": dict(master_dtype=torch.float64, offload="streamed", device="cpu"),
    }.items():
        model = tiny_llama(seed=3, layers=2, hidden=16)
        if settings.get("parts") == "thirds":
            settings["parts"] = cut_in_thirds(model)
        built[name] = (model, build_store(model, **settings))
    return built


@pytest.mark.parametrize("cls", STORES, ids=lambda c: c.__name__)
def test_every_store_class_implements_every_method_of_the_protocol_itself(cls):
    protocol = ResidentStore if cls is not StreamedParameters else ParameterStore
    for name, declared in members(protocol).items():
        if declared is None or isinstance(declared, property):  # data: checked on instances below
            continue
        owner = next((base for base in cls.__mro__ if name in vars(base)), None)
        assert owner is cls, f"{cls.__name__}.{name} is {'missing' if owner is None else 'inherited'}"
        mine = vars(cls)[name]
        assert list(inspect.signature(mine).parameters) == list(inspect.signature(declared).parameters), name
        assert "NotImplementedError" not in inspect.getsource(mine), f"{cls.__name__}.{name} is a stub"


def test_every_store_satisfies_the_protocol_and_only_resident_ones_perturb():
    built = {name: store for name, (_, store) in stores().items()}
    for name, store in built.items():
        assert isinstance(store, ParameterStore), name
        assert isinstance(store, ResidentStore) == (name != "streamed"), name
        for member, declared in members(ParameterStore).items():
            if declared is None or isinstance(declared, property):  # its own property, or set by its constructor
                assert member in vars(type(store)) or member in vars(store), f"{name}: {member}"
        assert isinstance(store.numel, int) and isinstance(store.device, torch.device), name
        assert isinstance(store.master_dtype, torch.dtype) and isinstance(store.work_dtype, torch.dtype), name
        assert isinstance(store.master, torch.Tensor) and store.master.numel() == store.numel, name
    assert {type(store) for store in built.values()} == set(STORES)


def test_the_factory_chooses_the_store_from_the_settings():
    assert type(build_store(TwoTensorModel())) is FlatParameters
    assert type(build_store(TwoTensorModel(), parts=[["w"], ["b"]])) is PlacedParameters
    assert build_store(TwoTensorModel(), master_dtype=None).in_place
    assert build_store(TwoTensorModel(), directions=3).direction_cache_size == 3
    with pytest.raises(ValueError, match="offload"):
        build_store(TwoTensorModel(), offload="disk")
    with pytest.raises(ValueError, match="compute device"):
        build_store(tiny_llama(layers=2, hidden=16), offload="streamed")


# No hasattr steering and no function over 80 code lines: tests/test_layers.py, over the whole package.


def test_the_stores_agree_when_driven_through_the_protocol_alone():
    """Two steps, the second masked with scales: the losses, theta and the saved state of every
    store are the one buffer's with a master copy (float64: in place the restores round, to
    about 1e-16; the streamed forward groups the rows of both passes)."""
    ids = torch.randint(3, 50, (8, 6), generator=torch.Generator().manual_seed(0))
    results = {name: _drive(model, store, ids) for name, (model, store) in stores().items()}
    ref = results.pop("flat")
    for name, got in results.items():
        for key in ("losses", "theta", "anchor"):
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-12, msg=f"{name}: {key}")
        assert got["state"].keys() == set(STATE_KEYS)
        assert torch.equal(got["state"]["mask"], ref["state"]["mask"]), name
    assert float((ref["theta"] - ref["theta0"]).abs().max()) > 1e-4  # the steps moved theta


def _drive(model: torch.nn.Module, store: ParameterStore, ids: torch.Tensor) -> dict:
    """Two steps through the protocol's members only (the second masked, with scales)."""
    per_example = lambda index: model(input_ids=ids[torch.as_tensor(index)]).logits[:, -1].logsumexp(-1)  # noqa: E731
    theta0 = store.master.clone()
    losses = []
    anchor = store.snapshot()
    with torch.no_grad():
        for step, beta in enumerate((1e-3, 2e-3)):
            if step == 1:
                store.restore()
                index = torch.arange(0, store.numel, 3)
                store.set_mask(index, perturb_scales=torch.linspace(1.2, 0.8, index.numel()))
                anchor = store.snapshot()
            passes = [(np.arange(0, 4), 10 + step), (np.arange(4, 8), 20 + step)]
            out = store.two_point_losses(per_example, passes, beta)
            losses += [torch.cat([d, plus, minus]) for d, plus, minus in out]
            store.pull_toward(anchor, 0.1)
            store.add_directions([(10 + step, -1e-2 * out[0][0].mean()), (20 + step, 3e-3)])
        store.restore()
    assert store.weights_finite()
    assert store.strided_theta(7).numel() >= store.numel // 7
    return dict(
        losses=torch.cat(losses).cpu(),
        theta=store.master.cpu(),
        theta0=theta0.cpu(),
        anchor=store.snapshot().cpu(),
        state=store.state_dict(),
    )
