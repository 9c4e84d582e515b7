"""What a benchmark record is judged by: the ratios of every run, the issue's targets, a table.

:func:`annotate` gives each run its ratio to two forwards, its speed-up over the official
style and its peak over the inference peak; :func:`targets_for` picks the issue's targets a run
is judged by (:data:`TARGETS` for the full-size models on a GPU, :data:`CPU_TARGETS` for the
CPU-sized ones on one thread) and :func:`evaluate_targets` checks them; :func:`annotate_z` and
:func:`evaluate_z_targets` do the same for z alone; :func:`summary_lines` prints a record for
people.
"""

from __future__ import annotations

from dpzo.bench.catalogue import run_name

Target = tuple[str, str, str, float]

# The issue's targets, each (label, quantity, comparison, limit).  They are stated for the
# full-size models at their default shapes and dtypes on an H100.
TARGETS: dict[str, list[Target]] = {
    "roberta-large": [
        ("dp-zoso step / two forwards (fp32)", "ratio_fp32", "<=", 1.15),
        ("dp-zoso speed-up over the official style (fp32)", "speedup_fp32", ">=", 2.5),
        ("dp-zoso speed-up over the official style (fp32), bf16 autocast", "speedup_bf16", ">=", 3.5),
        ("peak memory / inference peak, dp-zoso (lambda = 0)", "memory_dense", "<=", 1.05),
        ("peak memory / inference peak, dp-zopo (1 %)", "memory_masked", "<=", 1.10),
        ("SST-2-sized cell, 6000 steps at B = 64 (minutes of steps)", "sst2_minutes", "<=", 8.0),
    ],
    "opt-6.7b": [
        ("streamed / resident dp-zoso step time (in place)", "streamed_ratio", "<=", 1.3),
        ("streamed peak / (3 blocks + resident modules + activations)", "streamed_memory", "<=", 1.0),
    ],
    "opt-30b": [
        ("streamed / resident dp-zoso step time (in place)", "streamed_ratio", "<=", 1.3),
        ("streamed peak / (3 blocks + resident modules + activations)", "streamed_memory", "<=", 1.0),
    ],
    "opt-2.7b": [
        ("dp-zoso speed-up over the official style (fp16)", "speedup_fp32", ">=", 2.0),
        ("peak memory / inference peak, dp-zoso (lambda = 0)", "memory_dense", "<=", 1.05),
        ("peak memory / inference peak, dp-zopo (1 %)", "memory_masked", "<=", 1.10),
    ],
}


#: The CPU targets (issue 30), for the CPU-sized models in float32 on :data:`CPU_TARGET_THREADS`
#: thread, each (label, quantity, comparison, limit, (batch size, tokens)): the batch shape it is
#: stated for.  ``dpzo bench --device cpu`` runs each model once per shape (:func:`cpu_runs`).
CPU_TARGET_THREADS = 1
#: the methods the CPU targets read (what the CPU target run times unless --methods says more)
CPU_TARGET_METHODS = ("dp-zoso",)
_CPU_STEP_TARGETS = [
    ("dp-zoso speed-up over the official style (fp32, 1 thread, 8 x 64)", "speedup_fp32", ">=", 2.0, (8, 64)),
    ("dp-zoso step / two forwards (fp32, 1 thread, 16 x 128)", "ratio_fp32", "<=", 1.5, (16, 128)),
]
CPU_TARGETS: dict[str, list[tuple[str, str, str, float, tuple[int, int]]]] = {
    "opt-125m": _CPU_STEP_TARGETS,
    "roberta-base": _CPU_STEP_TARGETS,
}
#: z alone (:func:`dpzo.bench.timing.time_z`): Philox's throughput against torch.randn's on one thread
Z_TARGETS: list[Target] = [
    ("philox.normal_ / torch.randn throughput (float32, 1 thread)", "philox_over_randn_1", ">=", 0.5),
]


def cpu_runs() -> list[str]:
    """The step runs of the CPU targets: each model of :data:`CPU_TARGETS` at each batch shape
    its targets are stated for (``opt-125m@8x64``, ...)."""
    return [
        run_name(name, *shape) for name, table in CPU_TARGETS.items() for shape in dict.fromkeys(t[4] for t in table)
    ]


def targets_for(
    name: str, *, device_type: str, shape: tuple[int, int], default_shape: bool, default_dtype: bool, threads: int
) -> list[Target]:
    """The targets a run of model ``name`` is judged by: on a GPU the full-size models' at their
    default shape and dtype; on the CPU those stated for this batch shape, in the model's default
    dtype on :data:`CPU_TARGET_THREADS` thread; none otherwise."""
    if not default_dtype:
        return []
    if device_type == "cuda":
        return TARGETS.get(name, []) if default_shape else []
    if device_type != "cpu" or threads != CPU_TARGET_THREADS:
        return []
    return [t[:4] for t in CPU_TARGETS.get(name, []) if t[4] == tuple(shape)]


def _judge(table: list[Target], values: dict) -> list[dict]:
    out = []
    for label, key, op, limit in table:
        value = values[key]
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        out.append({"target": label, "value": value, "limit": f"{op} {limit}", "met": met})
    return out


def annotate(runs: list[dict], forward_ms: dict, inference_mb: dict) -> None:
    """Ratio to two forwards (same autocast), speed-up over the official style (same method),
    peak over the inference peak (same autocast)."""
    official = {r["method"]: r["ms_per_step"] for r in runs if r["impl"] == "official-style"}
    resident = {
        r["method"]: r["ms_per_step"]
        for r in runs
        if r["impl"] == "dpzo" and r["autocast"] == "none" and r["master"] == "none"
    }
    for r in runs:
        if r["impl"] == "dpzo-streamed":
            r["streamed_over_resident"] = r["ms_per_step"] / resident[r["method"]] if r["method"] in resident else None
        r["ratio_to_two_forwards"] = r["ms_per_step"] / (2.0 * forward_ms[r["autocast"]])
        r["speedup_vs_official"] = official[r["method"]] / r["ms_per_step"] if r["method"] in official else None
        base = inference_mb.get(r["autocast"])
        r["peak_over_inference"] = r["peak_mb"] / base if r["peak_mb"] is not None and base else None


def _pick(runs: list[dict], **match) -> dict | None:
    for r in runs:
        if r["impl"] == "dpzo" and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def evaluate_targets(table: list[Target], record: dict) -> list[dict]:
    """The targets ``table`` (see :func:`targets_for`), from the runs of a model's record (None:
    not measured)."""
    runs = record["runs"]
    fp = _pick(runs, method="dp-zoso", autocast="none", master="none")
    bf = _pick(runs, method="dp-zoso", autocast="bf16", master="none")
    masked = _pick(runs, method="dp-zopo", autocast="none", master="none")
    streamed = next((r for r in runs if r["impl"] == "dpzo-streamed" and r["method"] == "dp-zoso"), None)
    limit_mb = record.get("streamed_limit_mb")
    dense_runs = [r for r in runs if r["impl"] == "dpzo" and r["method"] == "dp-zoso"]
    fastest = min(dense_runs, key=lambda r: r["ms_per_step"]) if dense_runs else None
    values = {
        "ratio_fp32": fp and fp["ratio_to_two_forwards"],
        "speedup_fp32": fp and fp["speedup_vs_official"],
        "speedup_bf16": bf and bf["speedup_vs_official"],
        "memory_dense": fp and fp["peak_over_inference"],
        "memory_masked": masked and masked["peak_over_inference"],
        "streamed_ratio": streamed and streamed["streamed_over_resident"],
        "streamed_memory": streamed and streamed["peak_mb"] and limit_mb and streamed["peak_mb"] / limit_mb,
        "sst2_minutes": fastest and (fastest["ms_per_step"] * 6000 / 60000.0 if record["batch_size"] == 64 else None),
    }
    return _judge(table, values)


def annotate_z(z: dict) -> None:
    """z alone: each row's Philox throughput over torch.randn's, and the scaling of each from one
    thread to the most threads measured (None when only one thread count ran)."""
    for row in z["rows"]:
        row["philox_over_randn"] = row["philox_normals_per_s"] / row["randn_normals_per_s"]
    one = next((r for r in z["rows"] if r["threads"] == 1), None)
    most = max(z["rows"], key=lambda r: r["threads"])
    scaled = one is not None and most["threads"] > 1
    z["scaling"] = {
        "threads": most["threads"] if scaled else None,
        **{k: most[f"{k}_normals_per_s"] / one[f"{k}_normals_per_s"] if scaled else None for k in ("philox", "randn")},
    }


def evaluate_z_targets(z: dict) -> list[dict]:
    """:data:`Z_TARGETS` from an annotated z record (None: one thread was not measured)."""
    one = next((r for r in z["rows"] if r["threads"] == 1), None)
    return _judge(Z_TARGETS, {"philox_over_randn_1": one and one["philox_over_randn"]})


def _target_lines(targets: list[dict]) -> list[str]:
    lines = []
    for t in targets:
        status = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"  target: {t['target']}: {value} ({t['limit']}) {status}")
    return lines


def z_lines(z: dict) -> list[str]:
    """z alone, for people: throughput per thread count, the scaling and the target."""
    lines = [
        f"\nz alone: {z['numel']:,} {z['dtype']} normals on the {z['device']}, best of {z['repeats']}",
        f"  {'threads':>7} {'philox.normal_ M/s':>19} {'torch.randn M/s':>16} {'philox/randn':>13}",
    ]
    for r in z["rows"]:
        lines.append(
            f"  {r['threads']:>7} {r['philox_normals_per_s'] / 1e6:>19.1f} {r['randn_normals_per_s'] / 1e6:>16.1f} "
            f"{r['philox_over_randn']:>13.3f}"
        )
    sc = z["scaling"]
    if sc["threads"] is not None:
        lines.append(
            f"  scaling, {sc['threads']} threads / 1 thread: philox.normal_ {sc['philox']:.2f}x, "
            f"torch.randn {sc['randn']:.2f}x"
        )
    return lines + _target_lines(z["targets"])


def summary_lines(record: dict) -> list[str]:
    """A plain-text table of the record, for people."""
    dev = record["device"]
    threads = f", {dev['threads']} thread{'s' * (dev['threads'] != 1)}" if "threads" in dev else ""
    lines = [f"device: {dev['name']} ({dev['type']}{threads})"]
    if record.get("z_throughput"):
        lines += z_lines(record["z_throughput"])
    for name, m in record["models"].items():
        lines.append(
            f"\n{name}: {m['parameters'] / 1e6:.1f}M parameters, {m['dtype']}, batch {m['batch_size']} x {m['seq_len']}"
        )
        for ac, ms in m["forward_ms"].items():
            mem = m["inference_peak_mb"][ac]
            lines.append(f"  forward (autocast {ac}): {ms:.2f} ms" + (f", inference peak {mem:.0f} MiB" if mem else ""))
        lines.append(
            f"  {'method':<8} {'impl':<15} {'autocast':<8} {'master':<8} {'ms/step':>9} {'/2 fwd':>7} {'speed-up':>9} {'peak/inf':>9} {'MiB/step':>9} {'syncs':>6}"
        )
        for r in m["runs"]:
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            lines.append(
                f"  {r['method']:<8} {r['impl']:<15} {r['autocast']:<8} {str(r['master'] or '-'):<8} "
                f"{r['ms_per_step']:>9.2f} {r['ratio_to_two_forwards']:>7.2f} {fmt(r['speedup_vs_official'], '>8.2f')}x "
                f"{fmt(r['peak_over_inference'], '>9.3f')} {fmt(r.get('copied_mb_per_step'), '>9.2f')} "
                f"{fmt(r.get('host_syncs_per_step'), '>6.1f')}"
            )
        lines += _target_lines(m["targets"])
    return lines
