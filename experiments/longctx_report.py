"""Tables and the plot of the long-context study from its JSONL records (`longctx_study.py report`).

Each table is written between `<!-- NAME:begin -->` / `<!-- NAME:end -->` markers of
docs/results/longctx_study.md, so the prose around them stays; accuracies carry their trial counts and a
Wilson 95 % interval, perplexities the spread of their windows.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def accuracy_table(records: list[dict], methods: list[str], what: str) -> tuple[str, dict]:
    rows, summary = [], {}
    evidence = any("key_kept" in r for r in records)
    lengths = sorted({r["length"] for r in records})
    for length in lengths:
        for m in methods:
            rs = [r for r in records if r["method"] == m and r["length"] == length]
            if not rs:
                continue
            k, n = sum(r["correct"] for r in rs), len(rs)
            lo, hi = wilson(k, n)
            summary[(m, length)] = (k, n)
            secs = sum(r["seconds"] for r in rs) / n
            row = f"| {m} | {length} | {k}/{n} | {k / n:.2f} | {lo:.2f}-{hi:.2f} | {secs:.0f} |"
            rows.append(row + (f" {kept_cell(rs)} |" if evidence else ""))
    if not rows:  # a run not made yet keeps its placeholder rather than an empty table
        return "(not measured yet)", summary
    head = f"| {what} | length | correct / trials | accuracy | 95 % interval (Wilson) | s per trial |"
    rule = "|---|---|---|---|---|---|"
    if evidence:
        head, rule = head + " key kept in the reduced prompt |", rule + "---|"
    return f"{head}\n{rule}\n" + "\n".join(rows), summary


def kept_cell(records: list[dict]) -> str:
    """How often the reduction kept the key (a miss with the key kept is a reading failure), and for XL3M the
    ranks of the key's segment by certainty (0 = the most certain of all segments)."""
    cell = f"{sum(r['key_kept'] for r in records)}/{len(records)}"
    ranks = [r["key_segment_rank"] for r in records if r.get("key_segment_rank") is not None]
    if ranks:
        cell += f"; key segment ranked {', '.join(map(str, sorted(ranks)))} of {records[0]['segments']}"
    return cell


def retention_table(records: list[dict]) -> str:
    if not records:
        return "(not measured yet)"
    base = next((r for r in records if r["method"] == "none"), None)
    rows = []
    for r in records:
        nll = r["window_nll"]
        spread = f"{math.exp(min(nll)):.2f}-{math.exp(max(nll)):.2f}"
        ratio = f"{base['ppl'] / r['ppl']:.3f}" if base else ""
        rows.append(f"| {r['method']} | {r['seq_len']} | {r['windows']} ({r['tokens']} tokens) | {r['ppl']:.2f} | "
                    f"{spread} | {ratio} |")  # fmt: skip
    head = "| method | window | windows | perplexity | per-window range | unscaled ppl / this ppl |\n"
    return head + "|---|---|---|---|---|---|\n" + "\n".join(rows)


def search_table(paths: dict[str, Path], heldout: list[dict]) -> str:
    """One row per finished search; `heldout` adds the fitness on needle documents the search never saw."""
    rows = []
    other = {r["method"]: r["needle_ppl"] for r in heldout}
    for name, path in paths.items():
        if not path.exists():
            continue
        written = json.loads(path.read_text())
        data, s = written["longrope_search"], written["longrope_search"]["settings"]
        curve = ", ".join(f"{x:.4f}" for x in data["curve"])
        su = math.sqrt(
            1 + math.log(s["target_len"] / s["original"]) / math.log(s["original"])
        )  # longrope default
        attn = written["rope_scaling"].get("attention_factor") or su
        seen = f"{other[name]:.4f} / {other['yarn']:.4f}" if name in other and "yarn" in other else "-"
        rows.append(
            f"| {name} | {s.get('space', 'v2')}, attention x{attn:.4f} | {s['population']} / "
            f"{s['iterations']} / {s['parents']} / {s['mutations']} / {s['crossovers']} | {data['evaluations']} | "
            f"{s['samples']} x {s['target_len']} | {data['best']:.4f} | {data['yarn']:.4f} | {curve} | {seen} |"
        )
    if not rows:
        return "(the search has not finished)"
    return (
        "| factors | space, attention factor | population / iterations / parents / mutations / crossovers "
        "| evaluations | needle documents x tokens | best needle ppl | plain yarn (same documents) "
        "| best per iteration | other documents: this / yarn |\n|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
    )


def plot(summary: dict, reduced: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    labels, values, errs = [], [], []
    for (m, length), (k, n) in list(summary.items()) + list(reduced.items()):
        lo, hi = wilson(k, n)
        labels.append(f"{m} {length // 1024}K (n={n})")
        values.append(k / n)
        errs.append([[k / n - lo], [hi - k / n]])
    colors = ["tab:blue"] * len(summary) + ["tab:orange"] * len(reduced)
    ax.bar(range(len(values)), values, color=colors)
    for i, e in enumerate(errs):
        ax.errorbar(i, values[i], yerr=e, color="black", capsize=3)
    ax.set_xticks(range(len(values)), labels, fontsize=8, rotation=35, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("passkey accuracy")
    ax.set_title(
        "SmolLM2-135M (8K) beyond its context: RoPE scaling (blue), reading <= 2K tokens (orange)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(\n<!-- {name}:end -->)", re.S)
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def write_report(records: Path, out: Path, searched: dict[str, Path]) -> None:
    methods = ["none", "linear", "dynamic", "yarn", "longrope2", "longrope-v1"]
    passkey, summary = accuracy_table(read(records / "passkey.jsonl"), methods, "RoPE scaling")
    red_methods = ["xl3m", "xl3m-q32", "rag-bm25", "rag-dense", "truncation"]
    reduced, red_summary = accuracy_table(
        read(records / "reduced.jsonl"), red_methods, "method (unscaled model)"
    )
    md = out / "longctx_study.md"
    text = md.read_text()
    for name, body in [
        ("passkey", passkey),
        ("retention", retention_table(read(records / "retention.jsonl"))),
        ("search", search_table(searched, read(records / "search_heldout.jsonl"))),
        ("reduced", reduced),
    ]:
        text = replace_block(text, name, body)
    md.write_text(text)
    if not summary and not red_summary:  # no accuracy measured: no plot rather than an empty one
        print(f"wrote {md} (no passkey records: no plot)")
        return
    plot(summary, red_summary, out / "longctx_study.png")
    print(f"wrote {md} and {out / 'longctx_study.png'}")
