"""What a run leaves behind: the terminal table, the JSON (bench/results/ schema: benchmark, env, config, peak,
checks, rows with per-callable dicts), the CSV (one line per row and callable), and ``--compare`` of two JSONs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from subq.profile.errors import ProfileError

COLUMNS = (  # (key in a flat row, header, width, format)
    ("op", "op", 16, "s"), ("size", "size", 28, "s"), ("pass", "pass", 7, "s"), ("impl", "impl", 15, "s"),
    ("ms", "ms", 9, ".4g"), ("tflops", "TFLOP/s", 8, ".4g"), ("pct_peak", "%peak", 6, ".1f"),
    ("useful_tflops", "useful", 8, ".4g"), ("gbs", "GB/s", 8, ".4g"), ("pct_bandwidth", "%bw", 6, ".1f"),
    ("intensity", "FLOP/B", 7, ".4g"), ("speedup", "speedup", 7, ".3g"),
)
LEGEND = ("TFLOP/s: matmul FLOPs executed / time; %peak: of the measured matmul peak; useful: TFLOP/s of the "
          "math computed;\nGB/s: minimum bytes / time; %bw: of the measured copy bandwidth; FLOP/B: matmul FLOPs "
          "per minimum byte;\nspeedup: this baseline's time / subq's (> 1: subq is faster)")
CSV_FIELDS = ("op", "size", "pass", "impl", "ms", "tflops", "pct_peak", "useful_tflops", "gbs", "pct_bandwidth",
              "intensity", "speedup", "matmul_flops", "useful_flops", "min_bytes", "input_sets", "error")


def flat(rows: list[dict]) -> list[dict]:
    """One dict per (row, callable): what the table, the CSV and the roofline plot show."""
    out = []
    for row in rows:
        for impl in row["impls"]:
            out.append({
                "op": row["op"], "size": row["size_label"], "pass": row["pass"], "impl": impl,
                **{key: row[key][impl] for key in ("ms", "tflops", "pct_peak", "useful_tflops", "gbs",
                                                   "pct_bandwidth", "intensity", "matmul_flops", "useful_flops",
                                                   "min_bytes")},
                "speedup": row["speedup_subq_vs"].get(impl), "input_sets": row["input_sets"],
                "error": row["errors"].get(impl),
            })
    return out


def _cell(value: object, width: int, spec: str) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if spec == "s":
        return f"{str(value):<{width}}"
    text = format(value, spec) + ("x" if spec == ".3g" else "")
    return f"{text:>{width}}"


def _check_line(row: dict) -> str | None:
    check = row.get("check_subq_vs")
    if not check or check["ok"]:
        return None
    what = check.get("error") or check["errors"] or (
        f"max rel err {check['max_rel_err']:.2e} > tol {check['tol']:.1e} ({check['by_impl']})")
    return f"!!! CHECK FAILED {row['op']} {row['size_label']} vs float64 {check['against']}: {what}"


def table(rows: list[dict]) -> str:
    points = flat(rows)
    # text columns as wide as their longest entry (callable names such as flash_chunked_ref_compiled), numbers fixed
    columns = [(key, h, max([w] + [len(str(r[key])) for r in points]) if f == "s" else w, f)
               for key, h, w, f in COLUMNS]
    header = " ".join(_cell(h, w, "s") if f == "s" else f"{h:>{w}}" for _, h, w, f in columns)
    lines = [header]
    previous = None
    for r in points:
        group = (r["op"], r["size"], r["pass"])
        if previous is not None and group[:2] != previous[:2]:
            lines.append("")
        previous = group
        lines.append(" ".join(_cell(r[key], w, f) for key, _, w, f in columns).rstrip())
    errors = [f"!!! {r['op']} {r['size']} {r['pass']} {r['impl']}: {r['error']}" for r in points if r["error"]]
    failed = dict.fromkeys(line for row in rows if (line := _check_line(row)))  # one line per size, not per pass
    return "\n".join(lines + errors + list(failed))


def skipped_lines(rows: list[dict]) -> list[str]:
    """One line per callable that did not run on this device, and why."""
    reasons = {(row["op"], impl): why for row in rows for impl, why in row.get("skipped", {}).items()}
    return [f"not run: {op} {impl}: {why}" for (op, impl), why in reasons.items()]


def checks_summary(rows: list[dict]) -> dict:
    checks = {(row["op"], row["size_label"]): row["check_subq_vs"] for row in rows if row.get("check_subq_vs")}
    valid = [c["max_rel_err"] for c in checks.values() if c["max_rel_err"] is not None]
    return {"what": "max |subq - baseline in float64| / max |baseline in float64|, forward output and gradients; "
                    "tol: 2x the baseline's own error in the run's dtype, at least 1e-2 (16-bit) or 1e-4 (fp32)",
            "max_rel_err": max(valid) if valid else None,
            "failed": sum(not c["ok"] for c in checks.values()),
            "all_ok": all(c["ok"] for c in checks.values())}


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(flat(rows))


# ---- --compare -------------------------------------------------------------------------------------------------------


def load(path: Path) -> dict:
    try:
        payload = json.loads(Path(path).read_text())
    except OSError as err:
        raise ProfileError(f"--compare: cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ProfileError(f"--compare: {path} is not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
        raise ProfileError(f"--compare: {path} has no 'rows' list (not a subq-profile or bench/results JSON)")
    return payload


def _key(row: dict, benchmark: str) -> tuple:
    """What identifies a row across runs: its op, size and pass (every int or str field but the input set count),
    so runs of other GPUs, commits, dtypes or settings line up."""
    fields = {k: v for k, v in row.items()
              if isinstance(v, (int, str)) and not isinstance(v, bool) and k != "input_sets"}
    fields.setdefault("op", benchmark)
    return tuple(sorted(fields.items()))


def _label(key: tuple) -> str:
    fields = dict(key)
    size = fields.get("size_label") or " ".join(f"{k}={v}" for k, v in key if k not in ("op", "pass"))
    return f"{fields['op']:<16} {size:<28} {fields.get('pass', ''):<7}"


def _describe(name: str, payload: dict) -> str:
    env, peak, config = payload.get("env", {}), payload.get("peak", {}), payload.get("config", {})
    return (f"{name}: {env.get('device_name', '?')} {config.get('dtype', '?')} | torch {env.get('torch', '?')} | "
            f"{env.get('date_utc', '?')} | peak {_num(peak.get('matmul_tflops'))} TFLOP/s, "
            f"{_num(peak.get('copy_gbs'))} GB/s")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def compare(path_a: Path, path_b: Path) -> str:
    """Per row and callable: A's ms, B's ms and B/A (< 1: B is faster); the peaks' ratios first."""
    a, b = load(path_a), load(path_b)
    rows_a = {_key(r, a.get("benchmark", "?")): r for r in a["rows"]}
    rows_b = {_key(r, b.get("benchmark", "?")): r for r in b["rows"]}
    lines = [_describe("A", a), _describe("B", b)]
    for what in ("matmul_tflops", "copy_gbs"):
        va, vb = a.get("peak", {}).get(what), b.get("peak", {}).get(what)
        if va and vb:
            lines.append(f"peak {what}: B/A = {vb / va:.3f}")
    lines.append(f"{'op':<16} {'size':<28} {'pass':<7} {'impl':<15} {'A ms':>9} {'B ms':>9} {'B/A':>7}")
    for key, ra in rows_a.items():
        rb = rows_b.get(key)
        if rb is None:
            continue
        for impl, ms_a in ra.get("ms", {}).items():
            ms_b = rb.get("ms", {}).get(impl)
            ratio = None if ms_a is None or ms_b is None else ms_b / ms_a
            lines.append(f"{_label(key)} {impl:<15} {_num(ms_a):>9} {_num(ms_b):>9} {_num(ratio):>7}")
    only_a, only_b = len(rows_a.keys() - rows_b.keys()), len(rows_b.keys() - rows_a.keys())
    if only_a or only_b:
        lines.append(f"unmatched rows: {only_a} only in A, {only_b} only in B")
    if not rows_a.keys() & rows_b.keys():
        lines.append("no rows in common (different ops or sizes)")
    return "\n".join(lines)
