"""Merge `eval --tasks` results written by several runs (one per length or per seed, so that a run
cut short loses only itself) into one results file, table and heatmaps:
python benchmarks/tasks_merge.py OUT_DIR FILE [FILE ...] (each FILE a tasks.json).

Records of the same (method label, task, length, depth) from different runs are one record: their
samples concatenated in the order of the files, the score their mean, the kept fraction the mean of
the runs' weighted by samples, the seconds summed. The merged file keeps every run's config and
provenance stamp under "runs" and is stamped itself; runs of different models, calibrations or
method settings are refused."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from lokitool import results as results_file
from lokitool.evals.longctx import TaskResult, plot_heatmaps, table_markdown
from lokitool.fileio import write_text_atomic

SAME = ("model", "calibration")  # what every merged run must share
SAME_EVAL = ("methods", "kf", "df", "bytes", "basis", "budget", "sink", "group", "page")


def merge(documents: list[dict]) -> list[TaskResult]:
    first = documents[0]
    for doc in documents[1:]:
        for key in SAME:
            if doc.get(key) != first.get(key):
                raise SystemExit(f"runs differ in {key}; merge only runs of one setting")
        for key in SAME_EVAL:
            if doc["config"]["eval"].get(key) != first["config"]["eval"].get(key):
                raise SystemExit(f"runs differ in --{key}; merge only runs of one setting")
    merged: dict[tuple, TaskResult] = {}
    for doc in documents:
        for record in doc["results"]:
            r = TaskResult(**record)
            key = (r.label, r.task, r.length, r.depth)
            old = merged.get(key)
            if old is None:
                merged[key] = r
                continue
            n_old, n_new = len(old.scores), len(r.scores)
            scores = old.scores + r.scores
            kept = None
            if old.kept_fraction is not None and r.kept_fraction is not None:
                kept = (old.kept_fraction * n_old + r.kept_fraction * n_new) / (n_old + n_new)
            merged[key] = TaskResult(**{
                **asdict(old), "tokens": old.tokens + r.tokens, "scores": scores, "score": sum(scores) / len(scores),
                "answers": old.answers + r.answers, "expected": old.expected + r.expected, "kept_fraction": kept,
                "seconds": old.seconds + r.seconds,
            })
    tasks = list(first["config"]["tasks"])  # rows task by task, then by length and depth; full first
    return sorted(merged.values(), key=lambda r: (tasks.index(r.task) if r.task in tasks else len(tasks), r.length,
                                                  -1 if r.depth is None else r.depth, r.method != "full"))


def main(out_dir: Path, files: list[str]) -> None:
    documents = [json.loads(Path(f).read_text()) for f in files]
    rows = merge(documents)
    runs = [{"file": f, "config": d["config"], **{k: d.get(k) for k in ("versions", "git_hash", "date")}}
            for f, d in zip(files, documents)]
    document = {"model": documents[0]["model"], "calibration": documents[0]["calibration"], "runs": runs,
                "results": [asdict(r) for r in rows]}
    path = results_file.write_results(out_dir, "tasks", document, keep_dated=False)
    write_text_atomic(out_dir / "tasks.md", table_markdown(rows) + "\n")
    plot_heatmaps(rows, out_dir, documents[0]["model"]["model_id"])
    print(f"wrote {path}, tasks.md and heatmaps ({len(rows)} records from {len(files)} runs)")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2:])
