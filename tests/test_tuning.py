"""Private hyperparameter selection through the DAG: the draw, the candidate runs as jobs of their
own, the selection that publishes only the best, its ledger and its checks."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import yaml

from dpzo.methods import hyperparameters_for
from dpzo.pipeline.config import ConfigError, check_config
from dpzo.pipeline.tuning import TuneSettings, best_candidate, split_rows, tune_problems
from dpzo.privacy.ledger import AccountingSettings, Cell, LedgerMismatch
from dpzo.privacy.selection import Repetitions, selection_epsilon
from dpzo.privacy.selection_ledger import selection_ledger, verify_selection_ledger

from .pipeline import ROOT, snakemake
from .test_workflow import TINY

TUNE = {"mode": "private", "grid": {"lr": [1.0e-4, 1.0e-3], "clip": [2.0, 5.0]}, "mean": 3.0, "validation": 0.25}
METHOD = "dp-zoso+tuned"
CELL = "demo-roberta/demo-sst2/dp-zoso+tuned/eps8/seed13"


def tuned_config() -> dict:
    config = copy.deepcopy(TINY)
    config["methods"] = {"zero-shot": {}, METHOD: {**TINY["methods"]["dp-zoso"], "tune": TUNE}}
    return config


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tuned")
    (workdir / "config.yaml").write_text(yaml.safe_dump(tuned_config()))
    snakemake(workdir)
    return workdir


def read(path):
    return json.loads(path.read_text())


def test_the_selection_runs_its_drawn_candidates_and_publishes_only_the_best(tuned_run):
    tuning, run = tuned_run / "results/tuning" / CELL, tuned_run / "results/runs" / CELL
    draws, record = read(tuning / "draws.json"), read(tuning / "selection.json")
    ledger, metrics = read(run / "privacy.json"), read(run / "metrics.json")
    runs = draws["runs"]
    assert runs >= 1 and len(draws["points"]) == runs
    candidates = [read(tuning / f"cand{i}" / "metrics.json") for i in range(runs)]
    assert not (tuning / f"cand{runs}").exists()
    scores = [c["candidate"]["score"] for c in candidates]
    best = int(np.argmax(scores))
    assert record["runs"] == runs and record["best"] == best
    # each candidate trained its drawn point on the rows left after the validation split
    kept, held = split_rows(32, TUNE["validation"], 13)
    for i, c in enumerate(candidates):
        assert c["candidate"]["point"] == draws["grid_points"][draws["points"][i]]
        assert c["n_train"] == len(kept) and c["candidate"]["n_validation"] == len(held)
        assert c["privacy"]["ledger_sha256"] == candidates[0]["privacy"]["ledger_sha256"]
    # the cell's result is the best candidate's test evaluation, with the selection's accounting
    assert metrics["score"] == candidates[best]["score"]
    assert metrics["selection"]["selected"] == candidates[best]["candidate"]["point"]
    assert metrics["selection"]["epsilon"] == ledger["epsilon_achieved"]["selection"] <= 8.0
    assert metrics["selection"]["epsilon_training_alone"] < metrics["selection"]["epsilon"]
    # the number of runs and the run's index are not published
    assert "candidate" not in metrics and "runs" not in metrics["selection"]
    assert metrics["selection"]["runs_published"] is False
    assert ledger["n"] == len(kept) and ledger["n_validation"] == len(held)
    assert ledger["score_sigma"] == pytest.approx(2.0 * ledger["sigma"])


def test_a_plain_rerun_repeats_no_finished_candidate(tuned_run):
    (tuned_run / "results/runs" / CELL / "metrics.json").unlink()
    dry = snakemake(tuned_run, "-n")
    assert "tune_select" in dry.stdout
    assert "tune_candidate" not in dry.stdout and "tune_draw" not in dry.stdout
    snakemake(tuned_run)
    assert (tuned_run / "results/runs" / CELL / "metrics.json").exists()


def test_a_candidate_refuses_a_ledger_that_is_not_its_cells(tuned_run):
    ledger = tuned_run / "results/runs" / CELL / "privacy.json"
    original = ledger.read_text()
    edited = json.loads(original)
    edited["sigma"] = edited["sigma"] / 2
    edited["noise_std_on_sum"] = edited["noise_std_on_sum"] / 2
    edited["score_sigma"] = edited["score_sigma"] / 2
    try:
        ledger.write_text(json.dumps(edited))
        proc = snakemake(tuned_run, "-f", f"results/tuning/{CELL}/cand0/metrics.json", check=False)
        assert proc.returncode != 0
        assert "epsilon of its selection" in proc.stderr + proc.stdout
    finally:
        ledger.write_text(original)


def _ledger(cell: Cell, tune: TuneSettings, hp, settings):
    return selection_ledger(
        cell,
        hp,
        n_total=64,
        n_validation=16,
        selection=tune.as_dict(),
        settings=settings,
    )


def test_verify_selection_ledger_refuses_another_cell_or_selection():
    tune = TuneSettings(**TUNE)
    params = {**TINY["methods"]["dp-zoso"]}
    hp = hyperparameters_for("dp-zoso", params)
    settings = AccountingSettings(delta=1e-5)
    cell = Cell("m", "t", "dp-zoso+tuned", "8", 13)
    ledger = _ledger(cell, tune, hp, settings)
    args = dict(
        hp=hp,
        n=48,
        n_validation=16,
        selection=tune.as_dict(),
        settings=settings,
    )
    noise, score_sigma = verify_selection_ledger(ledger, cell=cell, **args)
    assert noise.release.scale == pytest.approx(ledger["sigma"] * hp.clip)
    assert score_sigma == pytest.approx(2.0 * ledger["sigma"])
    with pytest.raises(LedgerMismatch, match="cell.seed"):
        verify_selection_ledger(ledger, cell=Cell("m", "t", "dp-zoso+tuned", "8", 42), **args)
    more_runs = TuneSettings(**{**TUNE, "mean": 10.0})
    with pytest.raises(LedgerMismatch, match="selection"):
        verify_selection_ledger(ledger, cell=cell, **{**args, "selection": more_runs.as_dict()})
    with pytest.raises(LedgerMismatch, match="n is 48 in the ledger but 40"):
        verify_selection_ledger(ledger, cell=cell, **{**args, "n": 40, "n_validation": 24})
    # the ledger of the same cell without selection is refused: it does not account the selection
    plain = dict(ledger, calibrated_with="pld")
    with pytest.raises(LedgerMismatch, match="calibrated_with"):
        verify_selection_ledger(plain, cell=cell, **args)
    # its σ really buys the target with the selection, and only just
    run_args = (ledger["q"], ledger["compositions"])
    from dpzo.privacy.selection import CandidateRun

    run = CandidateRun(*run_args, score_noise=2.0)
    assert selection_epsilon(run, Repetitions("truncated-negative-binomial", 3.0), ledger["sigma"], 1e-5) <= 8.0
    assert selection_epsilon(run, Repetitions("truncated-negative-binomial", 3.0), ledger["sigma"] * 0.99, 1e-5) > 8.0


def test_a_searched_clip_is_accounted_alike_and_must_be_one_of_the_grid():
    """σ is a noise multiplier: a candidate with the grid's C adds σ·C to its sum, and no other C passes."""
    import dataclasses

    tune = TuneSettings(**TUNE)
    hp = hyperparameters_for("dp-zoso", {**TINY["methods"]["dp-zoso"]})
    settings = AccountingSettings(delta=1e-5)
    cell = Cell("m", "t", "dp-zoso+tuned", "8", 13)
    ledger = _ledger(cell, tune, hp, settings)
    args = dict(n=48, n_validation=16, selection=tune.as_dict(), settings=settings)
    for clip in (2.0, 5.0):
        noise, _ = verify_selection_ledger(ledger, cell=cell, hp=dataclasses.replace(hp, clip=clip), **args)
        assert noise.release.scale == pytest.approx(ledger["sigma"] * clip)
    with pytest.raises(LedgerMismatch, match="one of the grid"):
        verify_selection_ledger(ledger, cell=cell, hp=dataclasses.replace(hp, clip=3.0), **args)
    fixed = TuneSettings(**{**TUNE, "grid": {"lr": [1.0e-4, 1.0e-3]}})
    fixed_ledger = _ledger(cell, fixed, hp, settings)
    with pytest.raises(LedgerMismatch, match="clip"):
        verify_selection_ledger(
            fixed_ledger, cell=cell, hp=dataclasses.replace(hp, clip=2.0), **{**args, "selection": fixed.as_dict()}
        )


@pytest.mark.parametrize(
    ("method", "tune", "expected"),
    [
        ("dp-zoso", {"mode": "private", "grid": {"batch_size": [4, 8]}}, "batch_size changes what"),
        ("mezo", {"mode": "private", "grid": {"lr": [1e-4]}}, "needs a private zeroth-order method"),
        ("dp-zoso", {"mode": "private"}, "needs a grid"),
        ("dp-zoso", {"mode": "private", "grid": {"lr": [1e-4]}, "distribution": "poisson"}, "can be 0"),
        ("dp-zoso", {"mode": "private", "grid": {"lr": [1e-4]}, "mean": 1.0}, "tune.mean"),
        ("dp-zoso", {"mode": "none", "grid": {"lr": [1e-4]}}, "only read in modes private and public"),
        ("dp-zoso", {"mode": "public", "grid": {"lr": [1e-4]}}, "public_task"),
        (
            "dp-zoso",
            {"mode": "public", "grid": {"directions": [1, 2]}, "public_task": "demo-trec"},
            "directions changes",
        ),
    ],
)
def test_a_tune_block_that_cannot_run_is_refused_before_any_job(method, tune, expected):
    params = {**TINY["methods"]["dp-zoso"], "tune": tune}
    if method == "mezo":
        params = {**TINY["methods"]["mezo"], "tune": tune}
    problems = tune_problems(method, params)
    assert any(expected in p for p in problems), problems
    config = copy.deepcopy(TINY)
    config["methods"][method] = params
    with pytest.raises(ConfigError, match="tune"):
        check_config(config, ROOT / "workflow" / "schemas" / "config.schema.yaml")


def test_best_candidate_is_the_highest_noisy_score_and_refuses_a_damaged_record():
    records = [{"candidate": {"score": s}} for s in (3.0, 7.5, 7.5, -1.0)]
    assert best_candidate(records) == 1
    assert best_candidate([]) is None
    with pytest.raises(ValueError, match="damaged"):
        best_candidate([{"candidate": {"score": math.nan}}])


def test_validation_rows_depend_on_the_public_seed_only():
    kept, held = split_rows(100, 0.2, 13)
    assert len(held) == 20 and len(kept) == 80 and not set(kept) & set(held)
    assert np.array_equal(split_rows(100, 0.2, 13)[1], held)
    assert not np.array_equal(split_rows(100, 0.2, 42)[1], held)
    with pytest.raises(ValueError, match="tune.validation"):
        split_rows(3, 0.01, 13)


def test_a_second_draw_of_a_selection_is_refused(tmp_path, monkeypatch):
    """Drawing again would run the selection twice on the same data (only with secure noise: a
    test-noise cell claims nothing)."""
    from dpzo.pipeline.tuning import DrawnBefore, write_draws

    monkeypatch.delenv("DPZO_INSECURE_TEST_NOISE_SEED", raising=False)
    cell = Cell("m", "t", METHOD, "8", 13)
    ledger = tmp_path / "privacy.json"
    ledger.write_text(json.dumps({"cell": cell.as_dict()}))
    params = {**TINY["methods"]["dp-zoso"], "tune": TUNE}
    history = tmp_path / "checkpoints" / "drawn"
    first = write_draws(cell, params, ledger=ledger, path=tmp_path / "draws.json", history=history)
    assert first["runs"] >= 1 and history.exists()
    with pytest.raises(DrawnBefore, match="second time"):
        write_draws(cell, params, ledger=ledger, path=tmp_path / "draws.json", history=history)
    history.unlink()  # starting over knowingly
    write_draws(cell, params, ledger=ledger, path=tmp_path / "draws.json", history=history)


def test_tables_and_the_figure_show_both_epsilons(tuned_run, tmp_path):
    from dpzo.report import collect, figures

    summary = collect.read_cells(tuned_run / "results/tables/summary.csv")
    tuned = summary[summary.method == METHOD].iloc[0]
    ledger = read(tuned_run / "results/runs" / CELL / "privacy.json")
    assert tuned.epsilon_selection == pytest.approx(ledger["epsilon_achieved"]["selection"], rel=1e-9)
    assert tuned.epsilon_training_alone == pytest.approx(ledger["epsilon_achieved"]["training_alone"], rel=1e-6)
    assert tuned.epsilon_training_alone < tuned.epsilon_selection <= 8.0
    table = (tuned_run / "results/tables/accuracy-eps8.md").read_text()
    assert "‡" in table and f"{tuned.epsilon_selection:.2f} with the selection" in table
    assert (tuned_run / "results/figures/tuning-cost.png").exists()
    fig = figures.tuning_cost(summary, tmp_path / "t.png", tmp_path / "t.pdf")
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert f"{METHOD}: ε with the selection" in labels and f"{METHOD}: ε of the training alone" in labels
    assert "dp-zoso: given hyperparameters" not in labels  # this grid has no untuned dp-zoso


PUBLIC = "dp-zoso+public"
PUBLIC_CELL = "demo-roberta/demo-sst2/dp-zoso+public/eps8/seed13"


@pytest.fixture(scope="module")
def public_run(tmp_path_factory):
    config = copy.deepcopy(TINY)
    tune = {"mode": "public", "grid": {"lr": [1.0e-4, 1.0e-3], "clip": [2.0]}, "public_task": "demo-trec"}
    config["methods"] = {
        "zero-shot": {},
        PUBLIC: {**TINY["methods"]["dp-zoso"], "tune": tune},
        # mode none: values given, said to come from a search on this data
        "dp-zoso+given": {**TINY["methods"]["dp-zoso"], "tune": {"mode": "none", "searched_on_private_data": True}},
    }
    workdir = tmp_path_factory.mktemp("public")
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(workdir)
    return workdir


def test_public_selection_trains_every_point_on_the_public_task_then_the_best_on_the_cell(public_run):
    tuning, run = public_run / "results/tuning" / PUBLIC_CELL / "public", public_run / "results/runs" / PUBLIC_CELL
    points = [read(tuning / f"point{i}" / "metrics.json") for i in range(2)]
    assert [p["candidate"]["point"] for p in points] == [{"lr": 1.0e-4, "clip": 2.0}, {"lr": 1.0e-3, "clip": 2.0}]
    public_split = public_run / "results/data/demo-trec/k16-seed13"
    n_public = sum(1 for line in (public_split / "train.jsonl").read_text().splitlines() if line.strip())
    n_dev = sum(1 for line in (public_split / "dev.jsonl").read_text().splitlines() if line.strip())
    for p in points:  # trained on the public task, scored without noise on its dev set
        assert p["task"] == "demo-trec" and p["n_train"] == n_public
        assert p["candidate"]["score_sigma"] == 0.0 and p["candidate"]["n_validation"] == n_dev
        assert float(p["candidate"]["score"]).is_integer()
    best = int(np.argmax([p["candidate"]["score"] for p in points]))
    metrics, ledger = read(run / "metrics.json"), read(run / "privacy.json")
    assert metrics["selection"]["mode"] == "public" and metrics["selection"]["public_task"] == "demo-trec"
    assert metrics["selection"]["selected"] == points[best]["candidate"]["point"]
    # the cell itself: its own data, its usual ledger (the choice read nothing private)
    assert metrics["task"] == "demo-sst2" and metrics["n_train"] == ledger["n"] == 32
    assert "selection" not in ledger and ledger["epsilon_target"] == 8.0
    assert ledger["clip"] == 2.0  # the chosen point's clip (the method's block says 5): what trained is accounted
    for i in range(2):  # each public run's own ledger, for its own point
        public_ledger = read(tuning / f"point{i}" / "privacy.json")
        assert public_ledger["cell"]["task"] == "demo-trec" and public_ledger["n"] == n_public
        assert public_ledger["clip"] == 2.0
    table = (public_run / "results/tables/accuracy-eps8.md").read_text()
    assert "◊" in table and "chosen on public data (demo-trec)" in table


def test_given_values_searched_on_the_same_data_are_marked_outside_the_guarantee(public_run):
    given = read(public_run / "results/runs/demo-roberta/demo-sst2/dp-zoso+given/eps8/seed13/metrics.json")
    assert "selection" not in given
    rows = [line for line in (public_run / "results/tables/accuracy-eps8.md").read_text().splitlines()]
    assert any("| dp-zoso+given |" in r and "§" in r for r in rows)
    assert any(r.startswith("§ tuned outside the guarantee") for r in rows)
