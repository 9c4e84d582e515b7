"""The method registry: the schema agrees with the methods' classes, and a new method needs one module."""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dpzo import methods
from dpzo.masks import settings as mask_settings
from dpzo.methods import hyperparameters_for, register, unregister
from dpzo.methods.base import Method, PrivateZOMethod, ZOMethod
from dpzo.privacy.ledger import AccountingSettings, Cell, cell_ledger, check_ledger_after, verify_ledger
from dpzo.privacy.secret import SecretRandom
from dpzo.zo.loop import train_zo

from .test_zo import Quadratic, TwoTensorModel

SCHEMA = yaml.safe_load((Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml").read_text())
DEFS = SCHEMA["$defs"]
METHOD_BLOCKS = SCHEMA["properties"]["methods"]


def block_entry(name: str) -> dict:
    """The schema entry a config block of ``name`` (or ``name+variant``) must follow."""
    matching = [
        entry for pattern, entry in METHOD_BLOCKS["patternProperties"].items() if re.match(pattern, name + "+v")
    ]
    assert len(matching) == 1, (name, matching)
    return matching[0]


def allowed_keys(entry: dict) -> set[str]:
    """Property names a schema entry allows, following ``$ref`` and ``allOf``-style composition."""
    keys = set(entry.get("properties", {}))
    if "$ref" in entry:
        keys |= allowed_keys(DEFS[entry["$ref"].rsplit("/", 1)[1]])
    return keys


def required_keys(entry: dict) -> set[str]:
    keys = set(entry.get("required", []))
    if "$ref" in entry:
        keys |= required_keys(DEFS[entry["$ref"].rsplit("/", 1)[1]])
    return keys


def test_the_schema_names_exactly_the_registered_methods():
    names = re.match(r"\^\(([^)]*)\)", METHOD_BLOCKS["propertyNames"]["pattern"]).group(1).split("|")
    assert sorted(names) == sorted(methods.method_names())
    described = METHOD_BLOCKS["propertyNames"]["description"]
    assert all(name in described for name in names)
    assert len(METHOD_BLOCKS["patternProperties"]) == len(names)


@pytest.mark.parametrize("name", methods.method_names())
def test_each_method_block_follows_its_declared_schema_block(name):
    method = methods.get_method(name)
    entry = block_entry(name)
    assert entry.get("$ref") == f"#/$defs/{method.config_block}", (name, entry)
    keys = allowed_keys(entry)
    if method.hyperparameters is None:
        assert keys == set()
        return
    fields = {f.name for f in dataclasses.fields(method.hyperparameters)}
    if isinstance(method, ZOMethod):
        fields |= {"beta"}  # shorthand for beta_start = beta_end
        fields |= {"tune"}  # how the values are chosen, not a hyperparameter (pipeline.tuning)
        if not method.masked:
            fields -= {"mask"}
        if not method.staged:  # a constant schedule: the stagewise keys are refused
            fields -= {"beta_start", "beta_end", "stages", "stage_steps", "lr_decay", "lam"}
    assert keys == fields, (name, sorted(keys ^ fields))
    # a private method cannot run without a finite clip: the schema says so too
    assert ("clip" in required_keys(entry)) == method.private, name


def test_mask_block_allows_exactly_the_mask_settings():
    mask = DEFS["zopo"]["properties"]["mask"]["properties"]
    assert set(mask) == {f.name for f in dataclasses.fields(mask_settings.MaskSettings)}
    for key, allowed in (
        ("scorer", mask_settings.SCORERS),
        ("selection", mask_settings.SELECTIONS),
        ("scope", mask_settings.SCOPES),
        ("mode", mask_settings.MODES),
        ("strategy", mask_settings.STRATEGIES),
    ):
        assert tuple(mask[key]["enum"]) == allowed, key


def test_registry_refuses_a_duplicate_or_a_variant_name():
    with pytest.raises(ValueError, match="already registered"):
        register(methods.get_method("dp-zoso"))
    with pytest.raises(ValueError, match="unknown method 'dp-zosoo'"):
        methods.get_method("dp-zosoo")


@pytest.mark.parametrize("name", methods.method_names())
def test_what_a_method_says_of_itself_agrees_with_the_registry(name):
    """``Method.trainer`` and what derives from it: the other layers ask these instead of names."""
    method = methods.get_method(name)
    assert method.trainer in methods.TRAINERS
    assert (method.trainer == methods.TRAINER_ZO) == (name in methods.ZO) == isinstance(method, ZOMethod)
    assert (method.trainer == methods.TRAINER_FIRST_ORDER) == (name in methods.FIRST_ORDER)
    assert (method.trainer == methods.TRAINER_ICL) == (name == methods.ICL)
    assert (method.trainer == methods.TRAINER_NONE) == (name == methods.ZERO_SHOT)
    assert method.trains == (name in methods.ZO or name in methods.FIRST_ORDER)
    assert method.reads_training_data == (name != methods.ZERO_SHOT)
    assert not (method.private and not method.trains)  # only a trained method releases anything
    assert method.installs_prefix == (name == "dp-prefix")
    assert not method.installs_prefix or method.trainer == methods.TRAINER_FIRST_ORDER
    # a masked method is zeroth-order, and its dense counterpart is the same release without the mask
    assert method.masked == (name == "dp-zopo")
    if method.masked:
        dense = methods.get_method(method.dense_counterpart)
        assert method.trainer == methods.TRAINER_ZO and dense.trainer == methods.TRAINER_ZO and not dense.masked
        assert isinstance(method, type(dense)) and type(method).release is type(dense).release
    else:
        assert method.dense_counterpart is None
    # variants ask the method they vary
    assert methods.find_method(name + "+variant") is method and methods.find_method("no-such-method") is None


@pytest.mark.parametrize("name", methods.method_names())
def test_run_cell_picks_its_trainer_by_method_trainer(name):
    """``Method.trainer`` names a trainer of ``pipeline.cell.TRAINERS``, consistent with the registry's groups."""
    from dpzo.pipeline import cell

    trainer = methods.get_method(name).trainer
    assert trainer in cell.TRAINERS and set(cell.TRAINERS) == set(methods.TRAINERS)
    expected = {methods.ICL: methods.TRAINER_ICL, methods.ZERO_SHOT: methods.TRAINER_NONE}.get(name)
    if expected is None:
        expected = methods.TRAINER_FIRST_ORDER if name in methods.FIRST_ORDER else methods.TRAINER_ZO
    assert trainer == expected and methods.find_method(name + "+variant").trainer == trainer


def test_the_report_order_names_registered_methods_once():
    assert len(set(methods.REPORT_ORDER)) == len(methods.REPORT_ORDER)
    assert set(methods.REPORT_ORDER) <= set(methods.method_names())
    assert methods.REPORT_ORDER[0] == methods.ZERO_SHOT  # the pretrained model's reference first


def test_a_method_class_must_say_who_trains_it():
    class Untrained(Method):
        name = "toy-no-trainer"
        config_block = "none"

    with pytest.raises(ValueError, match="trainer = one of"):
        register(Untrained())
    assert "toy-no-trainer" not in methods.REGISTRY


#: Code outside ``methods/`` that may still name methods: the benchmark (``bench/`` picks the
#: methods it times and the rows it compares).
NAMES_ALLOWED_IN = ("src/dpzo/bench/",)


def test_no_layer_outside_methods_compares_method_names():
    """docs/architecture.md: other layers read a method through the registry, never by name."""
    names = "|".join(re.escape(name) for name in methods.method_names())
    comparison = re.compile(
        rf"""(==|!=)\s*["']({names})["']|["']({names})["']\s*(==|!=)|isin\(\[[^\]]*["']({names})["']"""
        rf"""|\bin\s+\(["']({names})["']|base_method\([^)]*\)\s+(not\s+)?in\s+(ZO|FIRST_ORDER)\b"""
        r"|[!=]=\s*(ZERO_SHOT|ICL)\b"
    )
    root = Path(__file__).parents[1]
    files = [p for p in (root / "src" / "dpzo").rglob("*.py") if "methods" not in p.relative_to(root / "src").parts]
    files += [*(root / "workflow").rglob("*.smk"), *(root / "workflow").rglob("*.py"), root / "Snakefile"]
    found = []
    for path in files:
        where = path.relative_to(root).as_posix()
        if where.startswith(NAMES_ALLOWED_IN):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            # ``published_accounting == "dpzero"`` compares an accounting convention, not a method
            if comparison.search(line) and "published_accounting" not in line:
                found.append(f"{where}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


TOY_MODULE = '''
"""A toy private method: clips half the quotient at C and doubles the release.

Exactly DP-ZOSO at clip 2C (scaling by 2 is exact in binary floating point), so a test can tell
that the trainer and the ledger used this module's rule.
"""

from dpzo.methods.base import PrivateZOMethod


class HalvedZO(PrivateZOMethod):
    name = "toy-halved"

    def clipped_value(self, d, beta):
        return 0.5 * d

    def gradient_from(self, released, beta):
        return 2.0 * released


METHOD = HalvedZO()
'''


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    """A new method in a module of its own, registered for the test and removed after."""
    (tmp_path / "toy_method.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("toy_method")
    register(module.METHOD)
    yield module.METHOD
    unregister(module.METHOD.name)
    sys.modules.pop("toy_method", None)


def run(method: str, clip: float, settings: AccountingSettings, n: int = 16):
    """Account a cell of ``method``, verify its ledger, train on a quadratic, check the counts."""
    hp = hyperparameters_for(
        method, {"steps": 4, "batch_size": 8, "lr": 0.05, "beta": 1e-3, "clip": clip, "directions": 2, "log_every": 1}
    )
    cell = Cell(model="quadratic", task="SST-2", method=method, eps="4", seed=0)
    ledger = cell_ledger(cell, hp, n=n, settings=settings)
    verified = verify_ledger(ledger, cell=cell, hp=hp, n=n, settings=settings)
    model = TwoTensorModel(seed=2)
    history = train_zo(
        model,
        Quadratic(n=n, dim=10).loss_fn(model),
        n,
        hp,
        method=method,
        run_seed=5,
        noise=verified.release,
        secret=SecretRandom(insecure_test_seed=11),
        master_dtype=torch.float64,
        record_releases=True,
    )
    check_ledger_after(ledger, history)
    return ledger, history, model.theta().detach()


def test_a_new_method_in_its_own_module_runs_through_the_ledger_and_the_trainer(toy_method):
    assert isinstance(toy_method, PrivateZOMethod) and methods.is_private("toy-halved+variant")
    settings = AccountingSettings(delta=1e-5, noise="insecure test seed 11")
    ledger, history, theta = run("toy-halved", 0.5, settings)
    assert ledger["method"] == "toy-halved" and ledger["compositions"] == 8 and ledger["sensitivity"] == 0.5
    # the oracle: DP-ZOSO at clip 2C with the same σ, batches and noise draws
    ref_ledger, ref_history, ref_theta = run("dp-zoso", 1.0, settings)
    assert ledger["sigma"] == ref_ledger["sigma"]
    assert history["released"] == ref_history["released"]
    assert torch.equal(theta, ref_theta)
