"""The GLUE benchmark's report: table (mean ± std per task and the average), CSV, plot, docs block.

Used by ``benchmarks/bench_glue.py``; reads only its records (one dict per (task, method, seed) run).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

#: task -> (label, the metric the VeRA paper reports); smallest tasks first (the order runs are queued in)
TASKS = {"rte": ("RTE", "acc"), "mrpc": ("MRPC", "acc"), "stsb": ("STS-B", "Pearson"), "cola": ("CoLA", "MCC"),
         "sst2": ("SST-2", "acc")}
METHOD_ORDER = ["head", "vera_r256", "lora_r8", "full"]
COLORS = {"head": "tab:gray", "vera_r256": "tab:red", "lora_r8": "tab:blue", "full": "tab:green"}
START, END = "<!-- bench_glue:start -->", "<!-- bench_glue:end -->"


def cells(records: list[dict]) -> dict[tuple[str, str], dict]:
    """(task, method) -> mean, std (x100), seeds, trainable params, saved bytes, wall time."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["task"], record["method"])].append(record)
    out = {}
    for key, rs in groups.items():
        values = [100 * r["metric"] for r in sorted(rs, key=lambda r: r["seed"])]
        out[key] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "seeds": sorted(r["seed"] for r in rs), "trainable": rs[0]["trainable_params"],
                    "saved": rs[0]["saved_bytes"], "wall": statistics.mean(r["wall_s"] for r in rs),
                    "cpu": statistics.mean(r.get("cpu_s", float("nan")) for r in rs),
                    "metric": rs[0]["metric_name"], "values": values}
    return out


def _fmt(cell: dict | None) -> str:
    if cell is None:
        return "—"
    n = len(cell["seeds"])
    return f"{cell['mean']:.1f} ± {cell['std']:.1f}" + ("" if n == 3 else f" ({n} seed{'s' if n > 1 else ''})")


def table(records: list[dict]) -> str:
    stats = cells(records)
    tasks = [t for t in TASKS if any(k[0] == t for k in stats)]
    methods = [m for m in METHOD_ORDER if any(k[1] == m for k in stats)]
    head = ["method", "trainable params", *(f"{TASKS[t][0]} {TASKS[t][1]}" for t in tasks), "average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        row = [stats.get((t, method)) for t in tasks]
        counts = sorted({c["trainable"] for c in row if c})
        params = f"{counts[0]:,}" + (f"–{counts[-1]:,}" if len(counts) > 1 else "")
        have = [c["mean"] for c in row if c]
        average = f"{statistics.mean(have):.1f}" if len(have) == len(TASKS) else f"— ({len(have)}/{len(TASKS)} tasks)"
        lines.append("| " + " | ".join([method, params, *(_fmt(c) for c in row), average]) + " |")
    vera, lora = [{t: stats.get((t, m)) for t in tasks} for m in ("vera_r256", "lora_r8")]
    gaps = [(t, vera[t]["mean"] - lora[t]["mean"]) for t in tasks if vera[t] and lora[t]]
    if gaps:
        lines += ["", "VeRA − LoRA (points): " + ", ".join(f"{TASKS[t][0]} {g:+.1f}" for t, g in gaps)
                  + (f"; average {statistics.mean(g for _, g in gaps):+.1f} over {len(gaps)} task(s)")]
        ratios = [lora[t]["trainable"] / vera[t]["trainable"] for t, _ in gaps]
        span = f"{min(ratios):.1f}" + (f"–{max(ratios):.1f}" if f"{min(ratios):.1f}" != f"{max(ratios):.1f}" else "")
        lines.append(f"LoRA trains {span}× VeRA's parameters (heads included).")
    return "\n".join(lines) + "\n"


def status(records: list[dict], missing: list[dict], command: str) -> str:
    measured = defaultdict(list)
    for r in records:
        measured[(r["task"], r["method"])].append(r["seed"])
    todo = defaultdict(list)
    for spec in missing:
        todo[(spec["task"], spec["method"])].append(spec["seed"])
    key = lambda k: (list(TASKS).index(k[0]), METHOD_ORDER.index(k[1]))  # noqa: E731
    say = lambda d: "; ".join(f"{TASKS[t][0]} {m} seeds {sorted(s)}" for (t, m), s in sorted(d.items(), key=lambda i: key(i[0])))  # noqa: E731,E501
    lines = [f"Measured ({len(records)} runs): {say(measured) or 'none'}.", ""]
    if todo:
        lines += [f"Not yet measured ({len(missing)} runs): {say(todo)}.", "",
                  f"Complete the table (runs already recorded are reused): `{command}`"]
    else:
        lines.append(f"Every planned cell is measured. Command: `{command}`")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = cells(records)
    tasks = [t for t in TASKS if any(k[0] == t for k in stats)]
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(tasks), figsize=(max(3.2 * len(tasks), 5.0), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in METHOD_ORDER:
            cell = stats.get((task, method))
            if cell is None:
                continue
            ax.errorbar(cell["trainable"], cell["mean"], yerr=cell["std"], fmt="o", capsize=3,
                        color=COLORS[method], label=method)
            ax.annotate(f"{cell['mean']:.1f}", (cell["trainable"], cell["mean"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.25, y=0.15)
        ax.set_title(f"{TASKS[task][0]} ({TASKS[task][1]})", fontsize=9)
        ax.set_xlabel("trainable parameters", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("dev score (x100)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("GLUE dev, all-MiniLM-L6-v2: mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(records: list[dict], missing: list[dict], out: Path, command: str) -> str:
    """Write glue.md, glue.csv and glue.png into ``out``; return the Markdown (table + cell status)."""
    report = table(records) + "\n" + status(records, missing, command)
    (out / "glue.md").write_text(report)
    with (out / "glue.csv").open("w") as fh:
        fh.write("task,method,metric,mean,std,seeds,trainable_params,saved_bytes,wall_s,cpu_s\n")
        for (task, method), c in sorted(cells(records).items()):
            fh.write(f"{task},{method},{c['metric']},{c['mean']:.4f},{c['std']:.4f},{' '.join(map(str, c['seeds']))},"
                     f"{c['trainable']},{c['saved']},{c['wall']:.1f},{c['cpu']:.1f}\n")
    if records:
        plot(records, out / "glue.png")
    return report


def write_docs(path: Path, report: str) -> None:
    """Replace the block between the ``bench_glue`` markers of ``path`` with ``report``."""
    text = path.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{path} has no {START} ... {END} block to write the table into; add the two markers")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    path.write_text(f"{before}{START}\n{report}{END}{after}")
