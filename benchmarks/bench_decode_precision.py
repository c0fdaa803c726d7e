"""Greedy decoding of one E2E adapter over a bf16 base and over a float32 base (issue 32, item 3).

For each adapter, ``scripts/predict.py experiment=e2e_smollm2`` generates for the 60 distinct MRs of ``val.csv``
twice, once per ``model.compute_dtype``, each in its own process. This script then counts the MRs whose
generation differs between the two and scores each side with the app's corpus BLEU against all references of an
MR (the metric of the E2E table). It answers "how much of bf16's BLEU is decoding?": the adapters are trained
once; only the base's precision at decoding changes.

    python benchmarks/bench_decode_precision.py --adapters outputs/e2e_kept/*/adapter --out /tmp/decode

Predictions already in ``--out`` (``<name>-<dtype>.jsonl``) are reused, so an interrupted run resumes. The
per-adapter figures and their totals are printed and written to ``<out>/decode.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("bf16", "fp32")


def distinct_mrs(val_csv: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The MRs of ``val_csv`` in first-seen order, and every reference of each."""
    refs: dict[str, list[str]] = {}
    with val_csv.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            refs.setdefault(row["mr"], []).append(row["ref"])
    return list(refs), refs


def predict(adapter: Path, dtype: str, prompts: Path, output: Path, threads: int) -> None:
    """One ``scripts/predict.py`` run in its own process (the output is written last by predict itself)."""
    if output.exists():
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, str(ROOT / "scripts" / "predict.py"), "experiment=e2e_smollm2", f"adapter={adapter}",
               f"input={prompts}", f"output={output}", f"model.compute_dtype={dtype}", "progress=false",
               f"hydra.run.dir={output.parent / ('.run-' + output.stem)}"]
    subprocess.run(command, check=True, cwd=ROOT, env=env)


def read_generations(path: Path) -> list[str]:
    return [json.loads(line)["generation"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", nargs="+", required=True, help="adapter directories (e.g. bench_e2e --keep's)")
    parser.add_argument("--out", required=True, help="folder for the predictions and decode.json")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "e2e"), help="the E2E folder")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    from vera_lightning.app.generation.textmetrics import score_generations

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mrs, refs = distinct_mrs(Path(args.data_dir) / "val.csv")
    prompts = out / "val_mrs.csv"
    if not prompts.exists():
        with prompts.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["mr"])
            writer.writerows([mr] for mr in mrs)
    references = [refs[mr] for mr in mrs]
    rows = []
    for adapter in map(Path, args.adapters):
        name = adapter.parent.name if adapter.name == "adapter" else adapter.name
        generations = {}
        for dtype in DTYPES:
            path = out / f"{name}-{dtype}.jsonl"
            predict(adapter.resolve(), dtype, prompts.resolve(), path.resolve(), args.threads)
            generations[dtype] = read_generations(path)
        differ = sum(a != b for a, b in zip(generations["bf16"], generations["fp32"], strict=True))
        bleu = {dtype: score_generations(generations[dtype], references)["bleu"] for dtype in DTYPES}
        rows.append({"adapter": str(adapter), "prompts": len(mrs), "differ": differ,
                     "bleu_bf16": bleu["bf16"], "bleu_fp32": bleu["fp32"]})
        print(f"{name}: {differ}/{len(mrs)} generations differ; BLEU decoding in bf16 {bleu['bf16']:.2f}, "
              f"in float32 {bleu['fp32']:.2f}", flush=True)
    total = sum(row["differ"] for row in rows)
    mean = {dtype: sum(row[f"bleu_{dtype}"] for row in rows) / len(rows) for dtype in DTYPES}
    print(f"all: {total}/{len(rows) * len(mrs)} differ; mean BLEU bf16 {mean['bf16']:.2f}, fp32 {mean['fp32']:.2f}")
    partial = out / ".decode.json.partial"
    partial.write_text(json.dumps({"runs": rows, "differ": total, "mean_bleu": mean}, indent=1), encoding="utf-8")
    partial.replace(out / "decode.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
