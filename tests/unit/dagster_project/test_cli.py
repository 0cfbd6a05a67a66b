"""The `unicorn` CLI's shard summary (dagster_project/cli.py `summarise`), over real seed runs on
a real Dagster instance: lines read are lines of the seed files, apart from the seeds made."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from dagster_project.cli import summarise
from tests.support import coco_captions, make_resources, materialize_shard
from unicorn_assets.caption_seeds import read_caption_seeds


def seed_run(instance, resources, key: str) -> dict:
    result = materialize_shard(instance, resources, key, [read_caption_seeds],
                               raise_on_error=False)
    return {"run_id": result.run_id, "success": result.success, "seconds": 0.0,
            "failed_checks": []}


def test_the_summary_counts_seed_lines_as_lines_and_seeds_made_apart(tmp_path: Path, instance):
    seeds, data = tmp_path / "seeds", tmp_path / "data"
    seeds.mkdir()
    caps = [c["caption"] for c in coco_captions(5)]
    files = {
        # 3 captions, 2 labels (a label line makes one seed per template), a blank line
        "mixed.jsonl": "\n".join([json.dumps({"caption": caps[0]}),
                                  json.dumps({"label": "Atlantic Puffin"}), "",
                                  json.dumps({"caption": caps[1]}),
                                  json.dumps({"label": "Snowy Owl"}),
                                  json.dumps({"caption": caps[2]})]) + "\n",
        "table.csv": "caption,label\n" + "".join(f'"{c}",\n' for c in caps[3:]) + ",Blue Jay\n",
        # one seed and three malformed lines: over the reject gate, its seeds are not stored
        "broken.jsonl": json.dumps({"caption": caps[4]}) + "\n{oops\n{oops\n{oops\n",
    }
    for name, text in files.items():
        (seeds / name).write_text(text, encoding="utf-8")
    resources = make_resources(data, seeds, seeds={"templates_per_label": 4})
    runs = {key: seed_run(instance, resources, key) for key in ("mixed", "table", "broken")}
    assert [run["success"] for run in runs.values()] == [True, True, False]

    text = summarise({"runs": runs}, io=resources["io_manager"], instance=instance)

    lines_in_files = sum(len(t.splitlines()) for t in files.values())  # 6 + 4 + 4
    stored = {k: pl.read_parquet(data / "caption_seeds" / f"{k}.parquet") for k in ("mixed", "table")}
    assert not (data / "caption_seeds" / "broken.parquet").exists()
    made = sum(frame.height for frame in stored.values())
    from_labels = sum(frame.filter(pl.col("seed_kind") == "label").height
                      for frame in stored.values())
    assert (made, from_labels) == (3 + 2 + 3 * 4, 3 * 4)  # 5 captions, 3 labels x 4 templates
    assert lines_in_files == 14 and made > lines_in_files  # seeds cannot stand for lines
    assert (f"seed lines read: {lines_in_files}, seeds made: {made} "
            f"({from_labels} of them from label templates)") in text, text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ")}
    assert rows["mixed"][1:6] == ["ok", "lines", "6", "seeds", str(stored["mixed"].height)]
    assert rows["table"][1:6] == ["ok", "lines", "4", "seeds", str(stored["table"].height)]
    assert rows["broken"][1:6] == ["FAILED", "lines", "4", "seeds", "0"]
