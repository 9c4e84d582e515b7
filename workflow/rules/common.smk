# Helpers shared by all .smk files: config validation, the cell grid and input functions.

import re
from pathlib import Path

from snakemake.utils import validate

from dpzo.pipeline.config import check_config, grid_cells
from dpzo.data.inputs import model_files_in
from dpzo.privacy.ledger import cell_noise
from dpzo.privacy.secret import noise_source
from dpzo.methods import TRAINER_ZO, get_method
from dpzo.masks.settings import MaskSettings, ratio_label
from dpzo.pipeline.preflight import require_inputs
from dpzo.pipeline.tuning import TuneSettings, privately_tuned, publicly_tuned
from dpzo.fileio import read_json_output
from dpzo.data.tasks import TASKS

SCHEMA = Path(workflow.current_basedir) / ".." / "schemas" / "config.schema.yaml"
check_config(config, SCHEMA)  # every problem at once, phrased for a person
validate(config, schema=SCHEMA)  # also fills in the schema's defaults


onstart:
    # A real run (not a dry-run) stops here, before any job, listing every missing model/dataset
    # (and, when the jobs run on this machine, a device it does not have).
    require_inputs(config, local=workflow.local_exec)


DEMO_DIR = "results/demo"
# the published values ship with the workflow, not with a run: found next to the Snakefile
REFERENCE_ACCURACY = str(Path(workflow.basedir) / "config" / "reference" / "accuracy.csv")
REFERENCE_MEMORY = str(Path(workflow.basedir) / "config" / "reference" / "memory_time.csv")
FIGURES = ("accuracy-bars", "memory-time", "privacy-utility", "training-curves", "ablation")
TABLE_FORMATS = ("csv", "md", "tex", "html")
RUN = "{model}/{task}/{method}/eps{eps}/seed{seed}"
MASK = "results/masks/{model}/{task}/{scorer}-{selection}-{scope}-{mode}-seed{mseed}-r{ratio}.pt"
AUDIT = "results/audit/{model}/{task}/{method}/eps{eps}/audit.json"


# Methods whose cells are a private selection (tune: {mode: private}): tuning.smk makes their
# metrics from candidate runs; the train rule makes every other cell's.
TUNED_NAMES = "|".join(re.escape(m) for m, p in config["methods"].items() if privately_tuned(p)) or "(?!)"
TUNED_METHOD = rf"(?:{TUNED_NAMES})"
TRAINED_METHOD = rf"(?!{TUNED_METHOD}/)[a-z0-9\-]+(\+[A-Za-z0-9.\-]+)?"
PUBLIC_NAMES = "|".join(re.escape(m) for m, p in config["methods"].items() if publicly_tuned(p)) or "(?!)"
PUBLIC_METHOD = rf"(?:{PUBLIC_NAMES})"


def audit_cfg(key):
    """A setting of the audit block; the model and task default to the first configured ones."""
    cfg = config.get("audit", {})
    first = {"model": next(iter(config["models"])), "task": config["tasks"][0]}
    return cfg.get(key, first.get(key))


def all_audits(wildcards=None):
    """The audit records of `audit.epsilons` (an input function: only the audit target needs it)."""
    if audit_cfg("method") not in config["methods"]:
        raise ValueError(
            f"config key 'audit.method': {audit_cfg('method')!r} is not one of `methods`; set audit.method "
            "to a private zeroth-order method of `methods` (its hyperparameters define the audited cell)"
        )
    return [
        AUDIT.format(model=audit_cfg("model"), task=audit_cfg("task"), method=audit_cfg("method"), eps=e)
        for e in audit_cfg("epsilons")
    ]


CELLS = grid_cells(config)  # every (model, task, method, eps, seed) cell of the configured grid


def cells():
    return CELLS


def all_metrics():
    return [f"results/runs/{RUN}/metrics.json".format(**c) for c in cells()]


def all_ledgers():
    return [f"results/runs/{RUN}/privacy.json".format(**c) for c in cells()]


def all_benchmarks():
    """The train jobs' benchmark files, in the order of all_metrics() (read when present)."""
    return [f"benchmarks/train/{RUN}.tsv".format(**c) for c in cells()]


def all_diagnostics():
    return [f"results/runs/{RUN}/private_diagnostics.json".format(**c) for c in cells()]


def private_report_targets():
    """The private diagnostics (training loss, batch sizes, clipped fractions: not covered by the
    guarantee), made and put in the report only when `report.private_diagnostics` is true."""
    if not config.get("report", {}).get("private_diagnostics", False):
        return []
    return ["results/private/diagnostics.csv", "results/private/training-loss.png", "results/private/training-loss.pdf"]


def report_targets():
    """Every table and figure of the report."""
    tables = [f"results/tables/accuracy-eps{e}.{ext}" for e in config["epsilons"] for ext in TABLE_FORMATS]
    tables += [f"results/tables/{name}.{ext}" for name in ("privacy", "versions") for ext in TABLE_FORMATS]
    names = [*FIGURES, "tuning-cost"] if TUNED_NAMES != "(?!)" else FIGURES  # a private selection's cost
    figures = [f"results/figures/{name}.{ext}" for name in names for ext in ("png", "pdf")]
    collected = ["results/tables/cells.csv", "results/tables/curves.csv", "results/tables/summary.csv"]
    return [*collected, *tables, *figures]


def demo_task_files():
    """The LM-BFF-layout files the demo data rule writes (all demo tasks, always)."""
    out = []
    for spec in TASKS.values():
        if spec.demo:
            out += spec.source_files(f"{DEMO_DIR}/data")
    return out


def task_data_dir(wildcards):
    return f"{DEMO_DIR}/data" if TASKS[wildcards.task].demo else config["data_dir"]


def task_files(wildcards):
    """A task's raw files: demo ones are built by the pipeline; a user's are tracked when present.

    A missing user file is left out of the DAG so that a dry-run still lists the whole grid;
    the onstart check reports it (with every other missing input) before any job runs.
    """
    spec = TASKS[wildcards.task]
    # none for a task read from a cache (the Hugging Face tasks: hf_datasets.cache_dir)
    files = spec.source_files(task_data_dir(wildcards))
    return files if spec.demo else [f for f in files if Path(f).is_file()]


def model_path(wildcards):
    cfg = config["models"][wildcards.model]
    return f"{DEMO_DIR}/models/{wildcards.model}" if "demo" in cfg else cfg["path"]


def model_input(wildcards):
    """Demo models are built by the pipeline; real ones are read where the config points."""
    cfg = config["models"][wildcards.model]
    return [model_path(wildcards)] if "demo" in cfg else []


def model_files(wildcards):
    """The files of a user's model (config, weights, tokenizer) when they are on disk: replacing
    the weights reruns that model's cells.  Demo models are a directory output instead."""
    cfg = config["models"][wildcards.model]
    return [] if "demo" in cfg else model_files_in(cfg["path"])


# Where the secret noise comes from, as this run sees it ("secure", or the test-only seed).
NOISE = noise_source()


def cell_noise_source(wildcards):
    """The noise source of a cell: part of its identity for private methods (a cell made with
    the test-only seed reruns under secure noise); "none" for the others, which never rerun."""
    return cell_noise(wildcards.method, NOISE)


def model_cfg(wildcards):
    return config["models"][wildcards.model]


def demo_arch(wildcards):
    return config["models"][wildcards.model]["demo"]


def cuda_gpus(wildcards):
    """GPUs a model job asks for: one when it runs the model on CUDA (config `device`), none on CPU.

    Snakemake never sets CUDA_VISIBLE_DEVICES; locally the `gpu` resource only limits how many
    such jobs run at once, on SLURM it becomes `sbatch --gpus=1`.
    """
    return 1 if str(config["device"]).startswith("cuda") else 0


def cell_ranks(wildcards):
    """Data-parallel processes of a cell: the model's `ranks` for a zeroth-order method, else 1."""
    trainer = get_method(wildcards.method).trainer
    return config["models"][wildcards.model].get("ranks", 1) if trainer == TRAINER_ZO else 1


def train_threads(wildcards):
    """Cores a train job holds: `threads` per rank."""
    return config["threads"] * cell_ranks(wildcards)


def train_gpus(wildcards):
    """GPUs a train job asks for: `gpus_per_rank` per rank on CUDA, none on CPU."""
    per_rank = config["models"][wildcards.model].get("gpus_per_rank", 1)
    return cuda_gpus(wildcards) * per_rank * cell_ranks(wildcards)


def slurm_tasks(wildcards):
    """SLURM tasks of a train job: one per rank (a GPU job gets one task per GPU instead)."""
    return cell_ranks(wildcards) if not cuda_gpus(wildcards) else 1


def candidate_outputs(name):
    """An input function: the `name` file of every candidate run the cell's draw job drew."""

    def files(wildcards):
        draws = checkpoints.tune_draw.get(**wildcards).output.draws
        runs = read_json_output(draws)["runs"]
        return [f"results/tuning/{RUN}/cand{i}/{name}".format(**wildcards, i=i) for i in range(runs)]

    return files


def public_task_of(wildcards):
    """The public task a method chooses its hyperparameters on (tune: {mode: public}), or None."""
    return publicly_tuned(config["methods"][wildcards.method])


def public_choice(wildcards):
    """A publicly tuned cell's choice, made from its grid's runs on the public task."""
    if public_task_of(wildcards) is None:
        return []
    return f"results/tuning/{RUN}/public/choice.json".format(**wildcards)


def public_split(name):
    """An input function: the `name` split of the public task for the cell's seed."""

    def split(wildcards):
        return f"results/data/{public_task_of(wildcards)}/k{config['k']}-seed{wildcards.seed}/{name}.jsonl"

    return split


def public_points(wildcards):
    """The metrics of every grid point's run on the public task."""
    points = len(TuneSettings.from_params(config["methods"][wildcards.method]).points())
    return [f"results/tuning/{RUN}/public/point{i}/metrics.json".format(**wildcards, i=i) for i in range(points)]


def method_params(wildcards):
    return config["methods"][wildcards.method]


def is_masked(method):
    return get_method(method).masked


def masked_pairs():
    """One (demo model, task) pair per demo model that some masked-method cell trains on.

    The exact SynFlow score needs float64 Hessian-vector products over every parameter: a
    reference for small models, so the agreement is reported for the demo models only (build
    it for any other model by naming results/masks/<model>/<task>/synflow-agreement.json).
    The score is data-free, so a task changes it only through its label words: the model's
    first such task stands for all of them.
    """
    pairs = sorted(
        {(c["model"], c["task"]) for c in cells() if is_masked(c["method"]) and "demo" in config["models"][c["model"]]}
    )
    first = {}
    for model, task in pairs:
        first.setdefault(model, task)
    return sorted(first.items())


def agreement_files():
    return [f"results/masks/{m}/{t}/synflow-agreement.json" for m, t in masked_pairs()]


def agreement_tables():
    """The SynFlow ZO-vs-exact agreement table, when some configured cell trains on a mask."""
    return ["results/tables/synflow_agreement.csv"] if masked_pairs() else []


def mask_files(wildcards):
    """DP-ZOPO: the precomputed mask of every distinct stage ratio of this method's strategy."""
    if not is_masked(wildcards.method):
        return []
    params = config["methods"][wildcards.method]
    settings = MaskSettings.from_config(params["mask"])
    ratios = dict.fromkeys(settings.stage_ratios(params.get("stages", 1)))
    return [
        MASK.format(
            model=wildcards.model,
            task=wildcards.task,
            scorer=settings.scorer,
            selection=settings.selection,
            scope=settings.scope,
            mode=settings.mode,
            mseed=settings.seed,
            ratio=ratio_label(r),
        )
        for r in ratios
    ]
