# Helpers shared by all .smk files: config validation, the cell grid and input functions.

from pathlib import Path

from snakemake.utils import validate

from dpzo.config import check_config
from dpzo.methods import ZO, MaskSettings, base_method, is_private, ratio_label
from dpzo.tasks import TASKS

SCHEMA = Path(workflow.current_basedir) / ".." / "schemas" / "config.schema.yaml"
check_config(config, SCHEMA)  # every problem at once, phrased for a person
validate(config, schema=SCHEMA)  # also fills in the schema's defaults

DEMO_DIR = "results/demo"
RUN = "{model}/{task}/{method}/eps{eps}/seed{seed}"
MASK = "results/masks/{model}/{task}/{scorer}-{selection}-{scope}-{mode}-seed{mseed}-r{ratio}.pt"


def method_epsilons(method):
    """Private methods run at every configured epsilon, the others only without noise."""
    return config["epsilons"] if is_private(method) else ["inf"]


def cells():
    """Every (model, task, method, eps, seed) cell of the configured grid."""
    return [
        dict(model=m, task=t, method=meth, eps=e, seed=s)
        for m in config["models"]
        for t in config["tasks"]
        for meth in config["methods"]
        for e in method_epsilons(meth)
        for s in config["seeds"]
    ]


def all_metrics():
    return [f"results/runs/{RUN}/metrics.json".format(**c) for c in cells()]


def all_ledgers():
    return [f"results/runs/{RUN}/privacy.json".format(**c) for c in cells()]


def demo_task_files():
    """The LM-BFF-layout files the demo data rule writes (all demo tasks, always)."""
    out = []
    for spec in TASKS.values():
        if spec.demo:
            folder = f"{DEMO_DIR}/data/original/{spec.lmbff_dir}"
            out += [f"{folder}/{spec.train_file}", f"{folder}/{spec.test_file}"]
    return out


def task_data_dir(wildcards):
    return f"{DEMO_DIR}/data" if TASKS[wildcards.task].demo else config["data_dir"]


def task_files(wildcards):
    spec = TASKS[wildcards.task]
    folder = f"{task_data_dir(wildcards)}/original/{spec.lmbff_dir}"
    return [f"{folder}/{spec.train_file}", f"{folder}/{spec.test_file}"]


def model_path(wildcards):
    cfg = config["models"][wildcards.model]
    return f"{DEMO_DIR}/models/{wildcards.model}" if "demo" in cfg else cfg["path"]


def model_input(wildcards):
    """Demo models are built by the pipeline; real ones are read where the config points."""
    cfg = config["models"][wildcards.model]
    return [model_path(wildcards)] if "demo" in cfg else []


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


def method_params(wildcards):
    return config["methods"][wildcards.method]


def mask_files(wildcards):
    """DP-ZOPO: the precomputed mask of every distinct stage ratio of this method's strategy."""
    if not ZO.get(base_method(wildcards.method), None) or not ZO[base_method(wildcards.method)].masked:
        return []
    params = config["methods"][wildcards.method]
    settings = MaskSettings.from_config(params["mask"])
    ratios = dict.fromkeys(settings.stage_ratios(params.get("stages", 1)))
    return [
        MASK.format(
            model=wildcards.model, task=wildcards.task, scorer=settings.scorer, selection=settings.selection,
            scope=settings.scope, mode=settings.mode, mseed=settings.seed, ratio=ratio_label(r),
        )
        for r in ratios
    ]
