"""What a benchmark record is judged by: the ratios of every run, the issue's targets, a table.

:func:`annotate` gives each run its ratio to two forwards, its speed-up over the official
style and its peak over the inference peak; :func:`evaluate_targets` checks the issue's targets
for the full-size models; :func:`summary_lines` prints a record for people.
"""

from __future__ import annotations

# The issue's targets, each (label, quantity, comparison, limit).  They are stated for the
# full-size models at their default shapes and dtypes on an H100.
TARGETS: dict[str, list[tuple[str, str, str, float]]] = {
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


def evaluate_targets(name: str, record: dict) -> list[dict]:
    """The issue's targets for this model, from the runs of this record (None: not measured)."""
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
    out = []
    for label, key, op, limit in TARGETS.get(name, []):
        value = values[key]
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        out.append({"target": label, "value": value, "limit": f"{op} {limit}", "met": met})
    return out


def summary_lines(record: dict) -> list[str]:
    """A plain-text table of the record, for people."""
    lines = [f"device: {record['device']['name']} ({record['device']['type']})"]
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
        for t in m["targets"]:
            status = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            value = "-" if t["value"] is None else f"{t['value']:.3f}"
            lines.append(f"  target: {t['target']}: {value} ({t['limit']}) {status}")
    return lines
