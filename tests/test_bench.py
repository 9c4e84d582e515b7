"""The fast step against the released code's style, and ``dpzo bench`` on CPU.

The oracle is :func:`dpzo.bench.official.official_style_train`: a second implementation of the same
mathematics in the released code's mechanics (a Python loop over the parameter tensors, four
passes per step, per-example losses one ``.item()`` at a time, clip and sum in Python floats),
fed the same z (:class:`dpzo.bench.official.FlatZ`).  ``train_zo`` instead merges passes, defers the
restore, keeps the released scalar on the device and, in place, folds restore + update + next
perturbation into one pass; none of that may change the trajectory.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from dpzo import cli
from dpzo.bench.official import FlatZ, official_style_train
from dpzo.masks.settings import Mask, MaskSettings
from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.zo import flat as flat_module
from dpzo.zo.flat import FlatParameters
from dpzo.zo.loop import train_zo
from dpzo.zo.step import apply_update

from .tiny import examples, make_clf

N = 16


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch, one_thread):
    """z in blocks of 1000 elements, so the tiny models span several blocks (and masks cross
    block boundaries), as full-size models do with the default block."""
    monkeypatch.setattr(flat_module, "DIRECTION_CHUNK", 1000)


def setup(tokenizer, family, dtype):
    clf = make_clf(tokenizer, family, dtype=dtype, seed=3)
    data = clf.encode(examples(N, seed=1))
    return clf, data


def trainable(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def random_masks(numel: int, stages: int, *, scaled: bool) -> dict[int, Mask]:
    """A different mask for every stage (as the dynamic strategy gives), some with rank scales."""
    gen = torch.Generator().manual_seed(11)
    out = {}
    for s in range(stages):
        idx = torch.randperm(numel, generator=gen)[: numel // 3].sort().values
        scales = torch.linspace(1.2, 0.8, idx.numel()) if scaled else None
        out[s] = Mask(indices=idx, numel=numel, scales=scales)
    return out


def run_both(tokenizer, family, dtype, method, hp, *, master_dtype, masks=None, noise_scale=0.5):
    """(theta after train_zo, theta after the official-style reference, theta before)."""
    clf, data = setup(tokenizer, family, dtype)
    ref_clf = copy.deepcopy(clf)  # one deepcopy: the copy's head stays a module of the copy's model
    theta0 = trainable(clf.model).clone()
    private = method != "mezo"

    def privacy():
        # the same insecure seed on both sides: the same Poisson batches and the same noise
        return (
            dict(
                noise=NoisySum("gaussian", noise_scale, N * hp.batch_size / N),
                secret=SecretRandom(insecure_test_seed=7),
            )
            if private
            else {}
        )

    mask_fn = (lambda stage: masks[stage]) if masks is not None else None
    train_zo(
        clf.model,
        lambda index: clf.per_example_loss(data.batch(index)),
        N,
        hp,
        method=method,
        run_seed=5,
        master_dtype=master_dtype,
        masks=mask_fn,
        **privacy(),
    )

    def logits_and_labels(index):
        batch = data.batch(index)
        return ref_clf.label_logits(batch), batch["labels"]

    numel = theta0.numel()
    z_dtype = master_dtype or dtype
    official_style_train(
        ref_clf.model,
        logits_and_labels,
        N,
        hp,
        method=method,
        run_seed=5,
        masks=mask_fn,
        z=FlatZ(numel, dtype=z_dtype, device=torch.device("cpu")),
        **privacy(),
    )
    return trainable(clf.model), trainable(ref_clf.model), theta0


STAGED = dict(
    steps=16, batch_size=6, lr=2e-2, stages=3, stage_steps=2, beta_start=1e-2, beta_end=1e-4, clip=1.0, log_every=3
)


@pytest.mark.parametrize("family", ["mlm", "causal"])
@pytest.mark.parametrize("master_dtype", [torch.float64, None], ids=["master", "in-place"])
@pytest.mark.parametrize("directions,lam", [(1, 0.0), (2, 0.5)])
def test_dense_dpzoso_equals_the_official_style_step_float64(tokenizer, family, master_dtype, directions, lam):
    hp = ZOHyperparameters(directions=directions, lam=lam, **STAGED)
    ours, ref, theta0 = run_both(tokenizer, family, torch.float64, "dp-zoso", hp, master_dtype=master_dtype)
    assert (ref - theta0).abs().max() > 1e-3  # the model really moved (stages, lr decay, beta schedule)
    assert (ours - ref).abs().max() <= 1e-12


@pytest.mark.parametrize("family", ["mlm", "causal"])
@pytest.mark.parametrize("master_dtype", [torch.float64, None], ids=["master", "in-place"])
@pytest.mark.parametrize("scaled", [False, True], ids=["normal", "rank"])
def test_masked_dpzopo_equals_the_official_style_step_float64(tokenizer, family, master_dtype, scaled):
    hp = ZOHyperparameters(
        lam=0.5, directions=2, mask=MaskSettings(mode="rank" if scaled else "normal", rank_update=scaled), **STAGED
    )
    numel = sum(p.numel() for p in make_clf(tokenizer, family).model.parameters())
    masks = random_masks(numel, 3, scaled=scaled)
    ours, ref, theta0 = run_both(
        tokenizer, family, torch.float64, "dp-zopo", hp, master_dtype=master_dtype, masks=masks
    )
    assert (ours - ref).abs().max() <= 1e-12
    ever_masked = torch.zeros(numel, dtype=torch.bool)
    for m in masks.values():
        ever_masked[m.indices] = True
    assert torch.equal(ours[~ever_masked], theta0[~ever_masked])  # bit-identical outside every mask
    assert (ours[ever_masked] - theta0[ever_masked]).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["mezo", "dp-zo-gauss", "dpzero"])
@pytest.mark.parametrize("master_dtype", [torch.float64, None], ids=["master", "in-place"])
def test_other_methods_equal_the_official_style_step_float64(tokenizer, method, master_dtype):
    settings = dict(STAGED, stages=1, beta_end=STAGED["beta_start"], clip=math.inf if method == "mezo" else 1.0)
    if method == "dp-zo-gauss":
        settings["clip"] = 0.02  # Tang et al. clip the raw loss difference
    hp = ZOHyperparameters(**settings)
    ours, ref, theta0 = run_both(
        tokenizer, "mlm", torch.float64, method, hp, master_dtype=master_dtype, noise_scale=0.01
    )
    assert (ref - theta0).abs().max() > 1e-4
    assert (ours - ref).abs().max() <= 1e-12


@pytest.mark.parametrize("master_dtype", [torch.float32, None], ids=["master", "in-place"])
def test_float32_step_stays_within_a_stated_tolerance_of_the_official_style(tokenizer, master_dtype):
    """float32: the two orders of rounding differ, and each finite difference divides float32
    round-off (~6e-8 of the loss) by 2 beta = 2e-2.  Stated tolerance: 5e-6 absolute after 16
    steps that move the weights by up to 7e-2 (measured: 7e-7)."""
    hp = ZOHyperparameters(**dict(STAGED, beta_end=1e-2))
    ours, ref, theta0 = run_both(tokenizer, "mlm", torch.float32, "dp-zoso", hp, master_dtype=master_dtype)
    assert (ref - theta0).abs().max() > 2e-3
    assert (ours - ref).abs().max() <= 5e-6


def test_fused_in_place_step_equals_the_master_copy_step(tokenizer):
    """In float64 the in-place path (restore, update and next perturbation in one pass) and the
    master-copy path (exact restore) give the same trajectory."""
    hp = ZOHyperparameters(**dict(STAGED, lam=0.5))
    results = []
    for master_dtype in (torch.float64, None):
        clf, data = setup(tokenizer, "causal", torch.float64)
        train_zo(
            clf.model,
            lambda index: clf.per_example_loss(data.batch(index)),
            N,
            hp,
            method="dp-zoso",
            run_seed=1,
            master_dtype=master_dtype,
            noise=NoisySum("gaussian", 0.5, 6.0),
            secret=SecretRandom(insecure_test_seed=2),
        )
        results.append(trainable(clf.model))
    assert (results[0] - results[1]).abs().max() <= 1e-12


@pytest.mark.parametrize(
    "master_dtype,masked,passes,draws",
    [
        # in place: (restore + update + next perturbation) and (-2 beta): 2 passes, 3 z streams
        (None, False, 2, 3),
        # master copy: +beta, -beta, update: 3 passes, 3 z streams (no restore pass)
        (torch.float64, False, 3, 3),
        # masked: z on the mask is gathered once per step and reused by every pass
        (None, True, None, 1),
        (torch.float64, True, None, 1),
    ],
)
@pytest.mark.parametrize("compiled", [False, True], ids=["torch-passes", "compiled-passes"])
def test_passes_and_z_draws_per_step(tokenizer, monkeypatch, master_dtype, masked, passes, draws, compiled):
    clf, data = setup(tokenizer, "mlm", torch.float64)
    calls = []
    if compiled:  # a fused pass draws each of its terms' z once, in registers
        kernels = pytest.importorskip("dpzo.zo.cpu_kernels")
        if masked:
            passes, draws = 2 if master_dtype is None else 3, 3  # nothing is cached between passes
        for name in ("dense_pass", "masked_pass"):
            inner = getattr(kernels, name)
            monkeypatch.setattr(kernels, name, lambda *a, inner=inner, **k: calls.append(len(a[-2])) or inner(*a, **k))
    else:
        monkeypatch.setenv("DPZO_FUSED", "0")
        blocks = FlatParameters._blocks

        def counting(self, seeds):
            calls.append(len(seeds))
            return blocks(self, seeds)

        monkeypatch.setattr(FlatParameters, "_blocks", counting)
    numel = sum(p.numel() for p in clf.model.parameters())
    mask = random_masks(numel, 1, scaled=False)[0] if masked else None
    hp = ZOHyperparameters(
        steps=6, batch_size=6, lr=1e-2, clip=1.0, log_every=6, mask=MaskSettings() if masked else None
    )
    train_zo(
        clf.model,
        lambda index: clf.per_example_loss(data.batch(index)),
        N,
        hp,
        method="dp-zopo" if masked else "dp-zoso",
        run_seed=0,
        master_dtype=master_dtype,
        noise=NoisySum("gaussian", 0.5, 6.0),
        secret=SecretRandom(insecure_test_seed=4),
        masks=(lambda stage: mask) if masked else None,
    )
    steps = hp.steps
    if passes is not None:
        # the final restore is one more pass in place (it undoes the last perturbation)
        assert len(calls) == passes * steps + (1 if master_dtype is None else 0)
    assert sum(calls) == draws * steps  # in place: the first step draws one z less, the final restore one more


def test_a_second_flattening_adopts_the_buffer_instead_of_copying(tokenizer):
    clf, _ = setup(tokenizer, "mlm", torch.float32)
    first = FlatParameters(clf.model, master_dtype=None)
    second = FlatParameters(clf.model)
    assert second.work.data_ptr() == first.work.data_ptr() and second.work.numel() == first.numel
    assert second.master.data_ptr() != second.work.data_ptr()  # the master is still a real copy
    second.perturb(3, 0.1)
    assert not torch.equal(first.work, second.master.float())  # one buffer, seen by both
    second.restore()
    assert torch.equal(first.work, second.master)


def test_sixteen_bit_in_place_pass_rounds_once(tokenizer):
    """bf16 weights in place: undo + update + next perturbation is summed in float32 and rounded
    to bf16 once, so every weight is within half a bf16 ulp of the exact result (two roundings,
    one per term, are not)."""
    clf, _ = setup(tokenizer, "causal", torch.float32)
    model = clf.model.to(torch.bfloat16)
    flat = FlatParameters(model, master_dtype=None)
    assert flat.z_dtype == torch.float32
    flat.perturb(1, 1e-2)
    before = flat.work.double().clone()
    flat.add_directions([(1, -3e-3)])  # deferred to the next pass
    flat.perturb(2, 1e-2)  # one pass: -1e-2 z1 (undo) - 3e-3 z1 (update) + 1e-2 z2
    z1, z2 = (flat_module.gaussian_direction(s, flat.numel, dtype=torch.float32).double() for s in (1, 2))
    exact = before - 1.3e-2 * z1 + 1e-2 * z2
    half_ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 8)  # bf16: 8 significant bits
    # the float32 sum itself may be off by a few float32 ulps of its largest term
    slack = 4 * 2.0**-24 * (before.abs() + 1.3e-2 * z1.abs() + 1e-2 * z2.abs())

    def worst(w):  # > 1: more than half a bf16 ulp (plus the float32 slack) away
        return float(((w.double() - exact).abs() / (half_ulp + slack)).max())

    assert worst(flat.work) <= 1.0
    twice = (before - 1.3e-2 * z1).to(torch.bfloat16).double() + 1e-2 * z2
    assert worst(twice.to(torch.bfloat16)) > 1.2  # the check can tell the two apart


def test_device_scalars_and_floats_give_the_same_update(tokenizer):
    clf, _ = setup(tokenizer, "mlm", torch.float64)
    other = copy.deepcopy(clf.model)
    a, b = FlatParameters(clf.model, master_dtype=None), FlatParameters(other, master_dtype=None)
    for flat, grads in (
        (a, [0.3, -0.2]),
        (b, [torch.tensor(0.3, dtype=torch.float64), torch.tensor(-0.2, dtype=torch.float64)]),
    ):
        flat.perturb(9, -1e-3)  # what the last forward saw; the update below undoes it in the same pass
        apply_update(flat, [9, 10], grads, lr=0.1)
    assert (a.work - b.work).abs().max() <= 1e-15


def test_non_finite_difference_is_reported_with_its_step(tokenizer):
    clf, data = setup(tokenizer, "mlm", torch.float64)
    calls = []

    def loss(index):
        calls.append(1)
        out = clf.per_example_loss(data.batch(index))
        return out * math.nan if len(calls) == 7 else out  # step 3's first forward

    hp = ZOHyperparameters(steps=8, batch_size=6, lr=1e-2, clip=1.0, log_every=5)
    with pytest.raises(FloatingPointError, match="at step 3"):
        train_zo(clf.model, loss, N, hp, method="mezo", run_seed=0)


# ------------------------------------------------------------------------------------------
# dpzo bench on CPU
# ------------------------------------------------------------------------------------------
def test_bench_cli_tiny_mode_writes_the_expected_json(tmp_path, capsys):
    out = tmp_path / "bench" / "tiny.json"
    code = cli.main(
        [
            "bench",
            "--device",
            "cpu",
            "--models",
            "tiny-roberta,tiny-opt,tiny-llama",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--batch-size",
            "4",
            "--seq-len",
            "12",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(out.read_text())
    assert json.loads(captured.out) == record  # stdout and the file agree
    assert record["device"]["type"] == "cpu" and record["settings"]["steps"] == 2
    assert set(record["models"]) == {"tiny-roberta", "tiny-opt", "tiny-llama"}
    for model in record["models"].values():
        assert model["batch_size"] == 4 and model["seq_len"] == 12 and model["parameters"] > 0
        assert 0 < model["mask_size"] < model["parameters"]
        fwd = model["forward_ms"]["none"]
        assert fwd > 0
        seen = {(r["method"], r["impl"]) for r in model["runs"]}
        assert seen == {(m, i) for m in ("dp-zoso", "dp-zopo", "mezo") for i in ("official-style", "dpzo")}
        official = {r["method"]: r["ms_per_step"] for r in model["runs"] if r["impl"] == "official-style"}
        for r in model["runs"]:
            assert set(r) >= {
                "ms_per_step",
                "ratio_to_two_forwards",
                "speedup_vs_official",
                "peak_mb",
                "peak_over_inference",
                "copied_mb_per_step",
                "host_syncs_per_step",
            }
            assert r["ms_per_step"] > 0
            assert r["ratio_to_two_forwards"] == pytest.approx(r["ms_per_step"] / (2 * fwd))
            assert r["speedup_vs_official"] == pytest.approx(official[r["method"]] / r["ms_per_step"])
            # tracked on the CPU: the weights and the batch at least, and the ratio to inference
            assert r["peak_mb"] == r["tracked_peak_mb"] > model["inference_peak_mb"]["none"] * 0.99
            assert r["peak_over_inference"] == pytest.approx(r["peak_mb"] / model["inference_peak_mb"]["none"])
            assert r["copied_mb_per_step"] == 0  # one device: nothing crosses
            assert r["host_syncs_per_step"] >= 0.5  # the closing log line reads the loss at least
        assert model["inference_peak_mb"]["none"] * 2**20 > 4 * model["parameters"]  # fp32 weights and more
        assert model["targets"] == []  # targets are for the full-size models on a GPU
    assert "tiny-opt" in captured.err and "ms/step" in captured.err  # the table for people


def test_bench_times_the_streamed_step_beside_the_resident_one(tmp_path, capsys):
    out = tmp_path / "streamed.json"
    args = ["bench", "--device", "cpu", "--models", "tiny-opt", "--methods", "dp-zoso,mezo", "--out", str(out)]
    code = cli.main([*args, "--offload", "none,streamed", "--steps", "2", "--warmup", "1"])
    assert code == 0, capsys.readouterr().err
    runs = json.loads(out.read_text())["models"]["tiny-opt"]["runs"]
    resident = {r["method"]: r for r in runs if r["impl"] == "dpzo" and r["master"] == "none"}
    streamed = {r["method"]: r for r in runs if r["impl"] == "dpzo-streamed"}
    assert set(streamed) == {"dp-zoso", "mezo"}
    for method, r in streamed.items():
        assert r["uploads_per_block"] == 2 + 1  # each timed step, and the flush of the last update
        # the home copies count as host memory: each block goes up and comes home once per step
        assert r["copied_mb_per_step"] > 0
        assert r["streamed_over_resident"] == pytest.approx(r["ms_per_step"] / resident[method]["ms_per_step"])


def test_bench_quick_mode_times_the_issue_grid(tmp_path, capsys):
    out = tmp_path / "quick.json"
    assert cli.main(["bench", "--device", "cpu", "--quick", "--models", "tiny-opt", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["settings"]["steps"] == 10 and record["settings"]["warmup"] == 2
    assert {r["method"] for r in record["models"]["tiny-opt"]["runs"]} == {"dp-zoso", "dp-zopo"}
    capsys.readouterr()


# ------------------------------------------------------------------------------------------
# The CPU targets: z alone, and the step at the batch shape each target is stated for
# ------------------------------------------------------------------------------------------
def test_z_alone_times_philox_and_randn_on_one_thread_and_on_every_core(monkeypatch):
    from dpzo.bench import run, timing

    monkeypatch.setattr(run, "available_cores", lambda: 2)  # two rows even on a one-core runner
    seen = []  # (implementation, threads, coordinates) of every fill

    def recording(name, fill):
        return lambda out: seen.append((name, torch.get_num_threads(), out.numel())) or fill(out)

    monkeypatch.setattr(timing, "Z_FILLS", {k: recording(k, f) for k, f in timing.Z_FILLS.items()})
    before = torch.get_num_threads()
    z = run.z_alone(20_000, repeats=2)
    assert torch.get_num_threads() == before  # restored
    assert z["numel"] == 20_000 and z["dtype"] == "float32" and z["repeats"] == 2
    assert [r["threads"] for r in z["rows"]] == [1, 2]
    for r in z["rows"]:
        assert r["philox_normals_per_s"] > 0 and r["randn_normals_per_s"] > 0
        assert r["philox_over_randn"] == pytest.approx(r["philox_normals_per_s"] / r["randn_normals_per_s"])
        for name in ("philox", "randn"):  # one short untimed fill, then the timed full ones, on that thread count
            fills = [n for k, t, n in seen if k == name and t == r["threads"]]
            assert fills == [min(timing.Z_WARMUP_NUMEL, 20_000)] + [20_000] * 2
    one, two = z["rows"]
    assert z["scaling"]["threads"] == 2
    assert z["scaling"]["philox"] == pytest.approx(two["philox_normals_per_s"] / one["philox_normals_per_s"])
    assert z["scaling"]["randn"] == pytest.approx(two["randn_normals_per_s"] / one["randn_normals_per_s"])
    [target] = z["targets"]
    assert target["value"] == one["philox_over_randn"] and target["limit"] == ">= 0.5"
    assert target["met"] is (one["philox_over_randn"] >= 0.5)


def test_philox_fill_is_the_z_the_step_draws():
    from dpzo.bench import timing
    from dpzo.zo import philox

    out = torch.empty(1000)
    timing.Z_FILLS["philox"](out)
    assert torch.equal(out, philox.normal_(torch.empty(1000), 0, 0))


def _z_record(rows):
    return {
        "device": "cpu",
        "numel": 1000,
        "dtype": "float32",
        "repeats": 1,
        "rows": [{"threads": t, "philox_normals_per_s": p, "randn_normals_per_s": r} for t, p, r in rows],
    }


@pytest.mark.parametrize(
    "rows,ratio,met,scaling",
    [
        ([(1, 60.0, 100.0), (4, 180.0, 150.0)], 0.6, True, (4, 3.0, 1.5)),
        ([(1, 50.0, 100.0)], 0.5, True, (None, None, None)),  # the limit is met on equality
        ([(1, 49.0, 100.0), (2, 98.0, 100.0)], 0.49, False, (2, 2.0, 1.0)),
        ([(2, 98.0, 100.0)], None, None, (None, None, None)),  # one thread not measured
    ],
)
def test_z_target_and_scaling_from_a_synthetic_record(rows, ratio, met, scaling):
    from dpzo.bench import targets

    z = _z_record(rows)
    targets.annotate_z(z)
    z["targets"] = targets.evaluate_z_targets(z)
    [target] = z["targets"]
    assert target["value"] == (None if ratio is None else pytest.approx(ratio)) and target["met"] is met
    assert (z["scaling"]["threads"], z["scaling"]["philox"], z["scaling"]["randn"]) == scaling
    lines = "\n".join(targets.z_lines(z))
    assert {True: " met", False: "NOT met", None: "not measured"}[met] in lines.splitlines()[-1]


def _model_record(official_ms, dpzo_ms, forward_ms, batch):
    from dpzo.bench import targets

    runs = [
        {"method": "dp-zoso", "impl": "official-style", "autocast": "none", "master": None, "peak_mb": None},
        {"method": "dp-zoso", "impl": "dpzo", "autocast": "none", "master": "none", "peak_mb": None},
    ]
    runs[0]["ms_per_step"], runs[1]["ms_per_step"] = official_ms, dpzo_ms
    targets.annotate(runs, {"none": forward_ms}, {"none": None})
    return {"runs": runs, "batch_size": batch}


@pytest.mark.parametrize(
    "shape,official,step,forward,key,value,met",
    [
        ((8, 64), 100.0, 40.0, 30.0, "speed-up", 2.5, True),
        ((8, 64), 100.0, 50.0, 10.0, "speed-up", 2.0, True),
        ((8, 64), 100.0, 60.0, 40.0, "speed-up", 100 / 60, False),
        ((16, 128), 100.0, 45.0, 15.0, "two forwards", 1.5, True),
        ((16, 128), 100.0, 46.0, 15.0, "two forwards", 46 / 30, False),
    ],
)
def test_cpu_step_targets_are_judged_at_the_batch_shape_they_are_stated_for(
    shape, official, step, forward, key, value, met
):
    from dpzo.bench import targets

    for model in ("opt-125m", "roberta-base"):
        table = targets.targets_for(
            model, device_type="cpu", shape=shape, default_shape=False, default_dtype=True, threads=1
        )
        [target] = targets.evaluate_targets(table, _model_record(official, step, forward, shape[0]))
        assert key in target["target"] and f"{shape[0]} x {shape[1]}" in target["target"]
        assert target["value"] == pytest.approx(value) and target["met"] is met


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("opt-125m", dict(threads=2)),  # stated for one thread
        ("opt-125m", dict(default_dtype=False)),  # stated for float32, the model's dtype
        ("opt-125m", dict(shape=(8, 32))),  # no target at this shape
        ("opt-125m", dict(device_type="cuda")),  # the CPU targets are not the GPU's
        ("tiny-opt", dict()),  # no targets for the stand-ins
    ],
)
def test_cpu_step_targets_apply_only_where_they_are_stated(name, kwargs):
    from dpzo.bench import targets

    where = dict(device_type="cpu", shape=(8, 64), default_shape=False, default_dtype=True, threads=1) | kwargs
    assert targets.targets_for(name, **where) == []


def test_the_cpu_target_runs_are_each_model_at_each_targets_shape():
    from dpzo.bench import catalogue, targets

    runs = targets.cpu_runs()
    assert runs == ["opt-125m@8x64", "opt-125m@16x128", "roberta-base@8x64", "roberta-base@16x128"]
    for run in runs:
        name, b, s = catalogue.split_run(run)
        assert catalogue.MODELS[name].dtype == "float32" and s <= catalogue.MODELS[name].max_seq_len


@pytest.mark.parametrize(
    "args,models,methods,threads,z_numel",
    [
        (
            [],
            ["opt-125m@8x64", "opt-125m@16x128", "roberta-base@8x64", "roberta-base@16x128"],
            ["dp-zoso"],
            1,
            1 << 25,
        ),
        (["--threads", "2", "--z-numel", "0"], None, ["dp-zoso"], 2, 0),
        (["--models", "tiny-opt"], ["tiny-opt"], ["dp-zoso", "dp-zopo", "mezo"], 1, 0),
        (["--models", "tiny-opt@4x12", "--z-numel", "1000"], ["tiny-opt@4x12"], None, 1, 1000),
        (["--quick"], ["tiny-roberta", "tiny-opt"], ["dp-zoso", "dp-zopo"], 1, 0),
        (["--methods", "mezo"], None, ["mezo"], 1, 1 << 25),
    ],
)
def test_bench_cli_on_cpu_runs_the_cpu_targets_unless_told_otherwise(
    monkeypatch, capsys, args, models, methods, threads, z_numel
):
    from dpzo.bench import run, targets

    seen = {}

    def fake_run_bench(runs, **kwargs):
        seen.update(kwargs, models=list(runs))
        return {
            "device": {"name": "cpu", "type": "cpu", "threads": kwargs["threads"]},
            "z_throughput": None,
            "models": {},
        }

    monkeypatch.setattr(run, "run_bench", fake_run_bench)
    assert cli.main(["bench", "--device", "cpu", *args]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert seen["models"] == (models or targets.cpu_runs())
    assert seen["methods"] == (methods or ["dp-zoso", "dp-zopo", "mezo"])
    assert seen["threads"] == threads and seen["z_numel"] == z_numel


def test_bench_cli_judges_a_cpu_target_at_its_shape_on_one_thread_beside_z_alone(monkeypatch, tmp_path, capsys):
    """The CPU target run end to end at toy size: a target of tiny-opt stated at 4 x 12 is judged
    in the run at that shape only, and z alone is timed, recorded and printed."""
    from dpzo.bench import targets

    monkeypatch.setitem(targets.CPU_TARGETS, "tiny-opt", [("toy speed-up", "speedup_fp32", ">=", 0.0, (4, 12))])
    out = tmp_path / "cpu.json"
    code = cli.main(
        ["bench", "--device", "cpu", "--models", "tiny-opt@4x12,tiny-opt@4x8", "--methods", "dp-zoso"]
        + ["--steps", "1", "--warmup", "0", "--z-numel", "20000", "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(out.read_text())
    assert record["settings"]["threads"] == 1 and record["device"]["threads"] == 1
    assert list(record["models"]) == ["tiny-opt@4x12", "tiny-opt@4x8"]
    at, other = record["models"]["tiny-opt@4x12"], record["models"]["tiny-opt@4x8"]
    assert (at["batch_size"], at["seq_len"], other["seq_len"]) == (4, 12, 8) and at["threads"] == 1
    [target] = at["targets"]
    dpzo_run = next(r for r in at["runs"] if r["impl"] == "dpzo")
    assert target["value"] == dpzo_run["speedup_vs_official"] > 0 and target["met"] is True
    assert other["targets"] == []
    z = record["z_throughput"]
    assert z["numel"] == 20_000 and z["rows"][0]["threads"] == 1 and len(z["targets"]) == 1
    assert "z alone: 20,000 float32 normals" in captured.err
    assert "target: philox.normal_ / torch.randn throughput" in captured.err
    assert "target: toy speed-up" in captured.err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--offload", "disk"], "argument --offload: unknown ['disk']"),
        (["--models", "gpt-5"], "argument --models: unknown ['gpt-5']"),
        (["--models", "tiny-opt@4"], "argument --models: 'tiny-opt@4': expected a model or model@BxS"),
        (["--models", "tiny-opt@4x500"], "seq_len must be in [2, 128]"),
        (["--methods", "dp-sgd"], "argument --methods: unknown ['dp-sgd']"),
        (["--autocast", "int8"], "argument --autocast: unknown ['int8']"),
        (["--device", "tpu"], "argument --device"),
        (["--seq-len", "500", "--models", "tiny-opt"], "seq_len must be in [2, 128]"),
    ],
)
def test_bench_cli_bad_input_is_one_clear_error_and_no_file(tmp_path, capsys, args, message):
    out = tmp_path / "b.json"
    code = cli.main(["bench", "--device", "cpu", "--out", str(out), *args])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert message in captured.err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_bench_cli_asks_for_cpu_where_there_is_no_gpu(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    assert "use --device cpu" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# The benchmark's code stays readable
# ------------------------------------------------------------------------------------------


def test_the_cli_and_the_bench_parser_load_without_torch():
    """``dpzo --help`` stays instant: the parsers import neither torch nor the benchmark's modules."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
    code = (
        "import sys, dpzo.cli; dpzo.cli.build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('dpzo.bench.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "['dpzo.bench.cli']"
