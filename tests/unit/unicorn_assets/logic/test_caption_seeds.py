"""Seed shards: safe partition keys, tolerant parsing of JSONL / CSV / Parquet, and the
`caption_seeds` asset on a real Dagster instance. Every bad-input case asserts that the message
names the file, the line and the fix, and that nothing else was lost."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from dagster_project.profiles import BUNDLED_SEEDS
from tests.support import ROOT, coco_captions, make_resources, write_jsonl
from unicorn_assets.caption_seeds import read_caption_seeds, read_shard, seed_checks
from unicorn_assets.logic.caption_seeds import (
    BAD_LINE_REASONS,
    SeedReadOptions,
    read_seed_bytes,
)
from unicorn_assets.logic.prompts import load_lines
from unicorn_assets.logic.text import stable_id
from unicorn_resources.keys import SeedError, discover_shards, shard_key_for
from unicorn_resources.seed_source import SeedSource

OPTS = SeedReadOptions(label_templates=load_lines("seed_labels/v1.txt"))


def read(data: bytes, name: str = "shard.jsonl", **options):
    opts = SeedReadOptions(**{**OPTS.__dict__, **options})
    return read_seed_bytes(data, f"/seeds/{name}", name.rsplit(".", 1)[0], opts)


def jsonl(records: list) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n"
                    for r in records)


def parquet(frame: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.write_parquet(buf)
    return buf.getvalue()


def csv_bytes(rows: list[dict], columns: list[str]) -> bytes:
    buf = io.StringIO()
    pl.DataFrame(rows, schema={c: pl.String for c in columns}).write_csv(buf)
    return buf.getvalue().encode()


def only_reject(result, reason: str) -> dict:
    rejects = result.rejects.filter(pl.col("reason") == reason).to_dicts()
    assert len(rejects) == 1, result.rejects
    return rejects[0]


def assert_message(reject: dict, file: str, line: int, fix: str) -> None:
    """The reject's message names the file, the line and the fix."""
    assert reject["source_file"] == file and reject["source_line"] == line
    assert reject["detail"].startswith(f"{file}:{line}: "), reject["detail"]
    assert fix in reject["detail"], reject["detail"]


# ---------------------------------------------------------------- partition keys


def test_shard_key_is_the_file_name_without_extension():
    assert shard_key_for("s3://bucket/seeds/coco-val2017_a.v2.JSONL") == "coco-val2017_a.v2"
    assert shard_key_for("/x/birds.parquet") == "birds"
    assert shard_key_for("/x/" + "k" * 128 + ".csv") == "k" * 128


@pytest.mark.parametrize("name, suggestion", [
    ("my seeds.jsonl", "my-seeds.jsonl"),
    ("a..b.csv", "a.b.csv"),
    ("..parquet", "shard.parquet"),
    ("-dash.jsonl", "dash.jsonl"),
    ("k" * 129 + ".jsonl", "k" * 128 + ".jsonl"),
])
def test_unsafe_file_name_is_refused_with_a_safe_suggestion(name, suggestion):
    with pytest.raises(SeedError) as err:
        shard_key_for(f"/seeds/{name}")
    message = str(err.value)
    assert message.startswith(f"/seeds/{name}: ")
    assert "Rename the file" in message and repr(suggestion) in message
    assert shard_key_for(f"/seeds/{suggestion}")  # the suggestion itself is a safe name


def test_discovery_skips_unsafe_and_clashing_files_but_keeps_the_others():
    paths = ["/s/good.jsonl", "/s/my seeds.jsonl", "/s/up..dir.csv", "/s/twin.csv",
             "/s/twin.jsonl", "/s/notes.md", "/s/other.parquet"]
    shards, problems = discover_shards(paths)
    # neither twin becomes the shard: which file would win is not for the alphabet to decide
    assert shards == {"good": "/s/good.jsonl", "other": "/s/other.parquet"}
    assert len(problems) == 3  # notes.md is not a seed file, so not a problem
    by_file = {p.split(":")[0]: p for p in problems}
    assert "Rename the file" in by_file["/s/my seeds.jsonl"]
    assert "Rename the file" in by_file["/s/up..dir.csv"]
    twins = by_file["/s/twin.csv and /s/twin.jsonl"]
    assert "2 seed files would all be shard 'twin', so none of them is read" in twins
    assert "Rename all but one" in twins and "twin.jsonl -> twin-jsonl.jsonl" in twins
    assert discover_shards(["/s/twin-jsonl.jsonl", "/s/twin.csv"])[0] == {  # the fix works
        "twin-jsonl": "/s/twin-jsonl.jsonl", "twin": "/s/twin.csv"}


def test_three_files_of_one_key_are_all_refused_and_named():
    shards, problems = discover_shards(["/s/x.JSONL", "/s/x.parquet", "/s/x.csv", "/s/y.csv"])
    assert shards == {"y": "/s/y.csv"}
    assert problems == [problems[0]] and problems[0].startswith(
        "/s/x.JSONL, /s/x.csv and /s/x.parquet: 3 seed files would all be shard 'x'")


# ---------------------------------------------------------------- good input


def test_missing_id_becomes_a_stable_hash_of_the_text():
    data = jsonl([{"caption": "A dog runs on the beach."}, {"caption": "A cat.", "id": 7}])
    first, second = read(data), read(data)
    ids = first.seeds["seed_id"].to_list()
    assert ids == second.seeds["seed_id"].to_list()
    assert ids[0] == stable_id("caption", "A dog runs on the beach.") and len(ids[0]) == 16
    assert ids[1] == "7"


def test_missing_id_is_the_same_in_another_process(tmp_path: Path):
    data = jsonl([{"caption": "Two zebras  graze in tall grass."}])
    here = read(data).seeds["seed_id"][0]
    (tmp_path / "z.jsonl").write_bytes(data)
    code = ("import sys; from unicorn_resources.seed_source import SeedSource; "
            "from unicorn_assets.caption_seeds import read_shard; "
            "print(read_shard(SeedSource(location=sys.argv[1]), 'z').seeds['seed_id'][0])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == here


def test_whitespace_is_normalised():
    data = jsonl([{"caption": "  A  man\tin a\n suit\u00a0with a   tie.  "}])
    assert read(data).seeds["caption"].to_list() == ["A man in a suit with a tie."]


def test_empty_captions_and_exact_duplicates_are_dropped_and_counted():
    caps = [c["caption"] for c in coco_captions(3)]
    data = jsonl([{"caption": caps[0]}, {"caption": caps[1]}, {"caption": "  " + caps[0] + " "},
                  {"caption": caps[2]}, {"caption": "   "}, {"caption": caps[1]}])
    result = read(data)
    assert result.seeds["caption"].to_list() == caps
    assert result.counts == {"duplicate_caption": 2, "empty_caption": 1}
    dupes = result.rejects.filter(pl.col("reason") == "duplicate_caption")
    assert dupes["source_line"].to_list() == [3, 6]
    assert "same caption as line 1" in dupes["detail"][0]
    # dropped on purpose, not malformed: the tolerance does not apply to them
    assert read(data, on_bad_line="fail").seeds.height == 3


def test_a_reused_id_is_dropped_and_counted():
    result = read(jsonl([{"id": "x", "caption": "A red bus."}, {"id": "x", "caption": "A tram."}]))
    assert result.seeds["caption"].to_list() == ["A red bus."]
    assert "give every record its own id" in only_reject(result, "duplicate_id")["detail"]


def test_label_seeds_are_expanded_into_ten_templates():
    templates = load_lines("seed_labels/v1.txt")
    result = read(jsonl([{"label": "Blue Jay"}, {"label": "Snowy Owl", "id": "owl"}]))
    assert result.seeds.height == 20
    for label, frame in result.seeds.group_by("label"):
        captions = frame["caption"].to_list()
        assert len(set(captions)) == 10
        assert all(c in {t.replace("<label>", label[0]) for t in templates} for c in captions)
        assert frame["seed_kind"].unique().to_list() == ["label"]
    owl = result.seeds.filter(pl.col("label") == "Snowy Owl")["seed_id"].to_list()
    assert owl == [f"owl-t{j}" for j in range(10)]
    assert read(jsonl([{"label": "Blue Jay"}])).seeds.equals(
        result.seeds.filter(pl.col("label") == "Blue Jay"))


def test_a_caption_record_keeps_its_label():
    result = read(jsonl([{"caption": "A small blue bird on a branch.", "label": "Blue Jay"}]))
    assert result.seeds.select("seed_kind", "label").row(0) == ("caption", "Blue Jay")


def test_free_metadata_columns_are_kept_in_meta():
    rec = coco_captions(1)[0]
    from_jsonl = read(jsonl([{**rec, "source": "coco", "tags": ["a", "b"]}]))
    assert json.loads(from_jsonl.seeds["meta"][0]) == {"image_id": rec["image_id"],
                                                      "source": "coco", "tags": ["a", "b"]}
    from_csv = read(csv_bytes([{"id": "1", "caption": rec["caption"], "photographer": "ann"}],
                              ["id", "caption", "photographer"]), "s.csv")
    assert json.loads(from_csv.seeds["meta"][0]) == {"photographer": "ann"}
    from_parquet = read(parquet(pl.DataFrame({"caption": [rec["caption"]], "score": [0.5]})),
                        "s.parquet")
    assert json.loads(from_parquet.seeds["meta"][0]) == {"score": 0.5}


def test_a_byte_order_mark_is_not_a_bad_line():
    data = b"\xef\xbb\xbf" + jsonl([{"caption": "A stop sign."}, {"caption": "A red bus."}])
    result = read(data)
    assert result.seeds["caption"].to_list() == ["A stop sign.", "A red bus."]
    assert result.rejects.height == 0
    assert read(b"\xef\xbb\xbfcaption\nA stop sign.\n", "s.csv").seeds.height == 1


def test_csv_rows_spanning_lines_report_their_first_line():
    data = b'caption,id\n"A dog\nin the snow",1\n\xe9t\xe9,2\nA cat on a mat,3\n'
    result = read(data, "s.csv")
    assert result.seeds.select("caption", "source_line").rows() == [("A dog in the snow", 2),
                                                                    ("A cat on a mat", 5)]
    assert only_reject(result, "bad_encoding")["source_line"] == 4


def test_the_bundled_seeds_are_clean():
    source = SeedSource(location=BUNDLED_SEEDS)
    shards, problems = source.shards()
    assert len(shards) >= 2 and problems == []
    for key in shards:
        result = read_shard(source, key)
        assert result.seeds.height > 0
        bad = result.rejects.filter(pl.col("reason").is_in(list(BAD_LINE_REASONS)))
        assert bad.height == 0, bad["detail"].to_list()


# ---------------------------------------------------------------- bad input


def test_bad_json_lines_are_rejected_and_the_rest_kept():
    caps = [c["caption"] for c in coco_captions(3)]
    data = jsonl([{"caption": caps[0]}, b'{"caption": "unterminated', {"caption": caps[1]},
                  b"[1, 2]", {"caption": caps[2]}])
    result = read(data, "bad.jsonl")
    assert result.seeds["caption"].to_list() == caps
    assert result.seeds["source_line"].to_list() == [1, 3, 5]
    rejects = result.rejects.sort("source_line").to_dicts()
    assert [r["reason"] for r in rejects] == ["bad_json", "bad_json"]
    assert_message(rejects[0], "/seeds/bad.jsonl", 2, "each line must be one JSON object")
    assert_message(rejects[1], "/seeds/bad.jsonl", 4, "each line must be one JSON object")
    assert rejects[0]["raw"].startswith('{"caption": "unterminated')
    assert result.lines_read == 5


def test_missing_caption_field_in_jsonl():
    caps = [c["caption"] for c in coco_captions(2)]
    data = jsonl([{"caption": caps[0]}, {"text": "A cat.", "id": 3}, {"caption": caps[1]}])
    result = read(data, "m.jsonl")
    assert result.seeds["caption"].to_list() == caps
    reject = only_reject(result, "missing_caption")
    assert_message(reject, "/seeds/m.jsonl", 2, "set caption_column")
    assert "found: id, text" in reject["detail"]


def test_missing_caption_column_in_csv():
    rows = [{"id": str(c["id"]), "text": c["caption"]} for c in coco_captions(3)]
    result = read(csv_bytes(rows, ["id", "text"]), "m.csv")
    assert result.seeds.height == 0
    reject = only_reject(result, "missing_caption")
    assert_message(reject, "/seeds/m.csv", 1, "Rename the caption column to 'caption'")
    assert "found: id, text" in reject["detail"]
    # the fix the message names works: point caption_column at the column
    assert read(csv_bytes(rows, ["id", "text"]), "m.csv", caption_column="text").seeds.height == 3


def test_missing_caption_column_in_parquet():
    caps = [c["caption"] for c in coco_captions(3)]
    result = read(parquet(pl.DataFrame({"text": caps})), "m.parquet")
    assert result.seeds.height == 0
    assert_message(only_reject(result, "missing_caption"), "/seeds/m.parquet", 1,
                   "Rename the caption column to 'caption'")
    # a null caption in one row rejects that row only
    result = read(parquet(pl.DataFrame({"caption": [caps[0], None, caps[2]]})), "n.parquet")
    assert result.seeds["caption"].to_list() == [caps[0], caps[2]]
    assert_message(only_reject(result, "missing_caption"), "/seeds/n.parquet", 2,
                   "set caption_column")


def test_latin1_bytes_in_a_jsonl_line():
    caps = [c["caption"] for c in coco_captions(2)]
    data = jsonl([{"caption": caps[0]}, '{"caption": "A caf\xe9 table."}'.encode("latin-1"),
                  {"caption": caps[1]}])
    result = read(data, "enc.jsonl")
    assert result.seeds["caption"].to_list() == caps
    reject = only_reject(result, "bad_encoding")
    assert_message(reject, "/seeds/enc.jsonl", 2, "re-encode the file as UTF-8")
    assert "caf\ufffd table" in reject["raw"]


def test_latin1_bytes_in_a_csv_row():
    caps = [c["caption"] for c in coco_captions(2)]
    data = (f"id,caption\n1,{caps[0]}\n".encode() + "2,A caf\xe9 table.\n".encode("latin-1")
            + f"3,{caps[1]}\n".encode())
    result = read(data, "enc.csv")
    assert result.seeds["caption"].to_list() == caps
    assert_message(only_reject(result, "bad_encoding"), "/seeds/enc.csv", 3,
                   "re-encode the file as UTF-8")


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_one_megabyte_line(kind):
    caps = [c["caption"] for c in coco_captions(2)]
    huge = "word " * 200_000
    if kind == "jsonl":
        data, line = jsonl([{"caption": caps[0]}, {"caption": huge}, {"caption": caps[1]}]), 2
    else:
        data, line = csv_bytes([{"caption": c} for c in (caps[0], huge, caps[1])],
                               ["caption"]), 3
    result = read(data, f"big.{kind}")
    assert result.seeds["caption"].to_list() == caps
    reject = only_reject(result, "line_too_long")
    assert_message(reject, f"/seeds/big.{kind}", line, "raise max_line_bytes")
    assert len(reject["raw"]) <= 200  # the rejects output keeps an excerpt, not the megabyte
    assert read(data, f"big.{kind}", max_line_bytes=2_000_000).seeds.height == 3


@pytest.mark.parametrize("data", [b"", b"  \n\n"])
def test_an_empty_file(data):
    result = read(data, "empty.jsonl")
    assert result.seeds.height == 0
    assert_message(only_reject(result, "empty_file"), "/seeds/empty.jsonl", 0,
                   "add seed records or remove the file")


def test_unreadable_parquet():
    result = read(b"PAR1 this is not parquet", "broken.parquet")
    assert_message(only_reject(result, "unreadable_file"), "/seeds/broken.parquet", 0,
                   "rewrite it")


def test_on_bad_line_fail_raises_a_seed_error_listing_the_lines():
    good = {"caption": "A man in a suit."}
    data = jsonl([good, b"{not json", good | {"caption": "A bus."}, {"text": "no caption"},
                  '{"caption": "caf\xe9"}'.encode("latin-1")])
    with pytest.raises(SeedError) as err:
        read(data, "strict.jsonl", on_bad_line="fail")
    message = str(err.value)
    assert message.startswith("/seeds/strict.jsonl: 3 malformed line(s)")
    for line in (2, 4, 5):
        assert f"/seeds/strict.jsonl:{line}: " in message
    assert "/seeds/strict.jsonl:1:" not in message and "/seeds/strict.jsonl:3:" not in message
    assert "on_bad_line='skip'" in message
    assert read(data, "strict.jsonl").seeds.height == 2  # the default skips and counts


def test_on_bad_line_fail_lists_at_most_five_lines():
    data = jsonl([b"{"] * 7)
    with pytest.raises(SeedError, match=r"7 malformed line\(s\)[\s\S]*and 2 more"):
        read(data, "many.jsonl", on_bad_line="fail")


# ---------------------------------------------------------------- the asset, on a real instance


def materialise_seeds(instance, data_dir: Path, seeds: Path, keys: list[str], **seed_options):
    existing = set(instance.get_dynamic_partitions("seed_shards"))
    instance.add_dynamic_partitions("seed_shards", [k for k in keys if k not in existing])
    resources = make_resources(data_dir, seeds, seeds=seed_options)
    tags = {"dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1]}
    return dg.materialize([read_caption_seeds], instance=instance,
                          resources=resources, tags=tags, raise_on_error=False)


def seed_folder(tmp_path: Path) -> tuple[Path, list]:
    folder = tmp_path / "seeds"
    good = coco_captions(4)
    write_jsonl(folder / "good.jsonl", good)
    caps = [c["caption"] for c in coco_captions(2, offset=4)]
    lines = [json.dumps({"caption": caps[0]}).encode(), b"{oops",
             '{"caption": "caf\xe9"}'.encode("latin-1"), json.dumps({"caption": caps[1]}).encode()]
    (folder / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "empty.jsonl").write_bytes(b"")
    (folder / "bad name.jsonl").write_bytes(lines[0] + b"\n")
    (folder / "good.csv").write_text("caption\nA clash.\n")  # same stem as good.jsonl
    return folder, caps


def test_bad_shards_do_not_touch_the_good_ones(tmp_path: Path, instance):
    folder, caps = seed_folder(tmp_path)
    source = SeedSource(location=str(folder))
    shards, problems = source.shards()
    assert sorted(shards) == ["empty", "mixed"]  # good.jsonl and good.csv clash: neither is read
    assert any("bad name.jsonl" in p for p in problems)
    clash = f"{folder / 'good.csv'} and {folder / 'good.jsonl'}: 2 seed files would all be shard"
    assert any(p.startswith(clash) for p in problems)
    with pytest.raises(SeedError, match="would all be shard 'good'.*Rename all but one"):
        read_shard(source, "good")  # a run of the held shard names the clash, not a lost file

    (folder / "good.csv").unlink()
    data = tmp_path / "data"
    result = materialise_seeds(instance, data, folder, ["empty", "good", "mixed"])
    # malformed lines never crash the run: the asset is written for every shard (its blocking
    # checks then fail the step, below, so nothing downstream reads the bad shards)
    assert {e.materialization.partition for e in result.get_asset_materialization_events()} \
        == {"empty", "good", "mixed"}

    good = pl.read_parquet(data / "caption_seeds" / "good.parquet")
    alone = read_shard(SeedSource(location=str(folder)), "good").seeds
    assert good.equals(alone) and good.height == 4
    assert pl.read_parquet(data / "caption_seed_rejects" / "good.parquet").height == 0

    mixed = pl.read_parquet(data / "caption_seeds" / "mixed.parquet")
    assert mixed["caption"].to_list() == caps[:2]
    rejects = pl.read_parquet(data / "caption_seed_rejects" / "mixed.parquet")
    assert rejects.select("source_line", "reason").rows() == [(2, "bad_json"),
                                                             (3, "bad_encoding")]
    assert pl.read_parquet(data / "caption_seed_rejects" / "empty.parquet")["reason"].to_list() \
        == ["empty_file"]

    materialised = {(m.asset_key.to_user_string(), m.partition)
                    for m in (e.materialization for e in result.get_asset_materialization_events())}
    assert materialised == {(a, k) for a in ("caption_seeds", "caption_seed_rejects")
                            for k in ("empty", "good", "mixed")}
    # one run, three shards: each shard's materialisation carries its own figures
    meta = {(m.asset_key.to_user_string(), m.partition): m.metadata
            for m in (e.materialization for e in result.get_asset_materialization_events())}
    assert {k: meta["caption_seeds", k]["dagster/row_count"].value
            for k in ("empty", "good", "mixed")} == \
        {"empty": 0, "good": 4, "mixed": 2}
    assert meta["caption_seeds", "mixed"]["rejects_by_reason"].value == \
        {"bad_encoding": 1, "bad_json": 1}
    assert meta["caption_seed_rejects", "empty"]["rejects_by_reason"].value == {"empty_file": 1}
    assert meta["caption_seeds", "good"]["shards_in_run"].value == 3

    # the blocking checks judge each shard on its own: the good shard does not dilute the rate
    # of the bad ones, and the empty shard is not hidden by the others' rows
    checks = checks_by_name(result, "caption_seeds")
    assert not checks["malformed_line_rate"].passed
    assert checks["malformed_line_rate"].metadata["failing_shards"].value == ["empty", "mixed"]
    assert checks["non_empty"].metadata["failing_shards"].value == ["empty"]
    assert not result.success
    # ... while the good shard alone passes every check
    good_only = materialise_seeds(instance, data, folder, ["good"])
    assert good_only.success
    assert all(e.passed for e in good_only.get_asset_check_evaluations())
    assert len(good_only.get_asset_check_evaluations()) == len(seed_checks)


def checks_by_name(result, asset: str) -> dict:
    return {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()
            if e.asset_key == dg.AssetKey(asset)}


def test_on_bad_line_fail_fails_the_run_and_keeps_what_was_written(tmp_path: Path, instance):
    folder, _ = seed_folder(tmp_path)
    (folder / "good.csv").unlink()
    data = tmp_path / "data"
    wrote = materialise_seeds(instance, data, folder, ["mixed"])  # skip mode: written, check fails
    assert {e.materialization.partition for e in wrote.get_asset_materialization_events()} \
        == {"mixed"}
    assert not checks_by_name(wrote, "caption_seeds")["malformed_line_rate"].passed
    assert materialise_seeds(instance, data, folder, ["good"]).success
    before = {p: p.read_bytes() for p in data.rglob("*.parquet")}

    result = materialise_seeds(instance, data, folder, ["mixed"], on_bad_line="fail")
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error.to_string()
    assert "SeedError" in error and "mixed.jsonl: 2 malformed line(s)" in error
    assert "mixed.jsonl:2: " in error and "mixed.jsonl:3: " in error
    after = {p: p.read_bytes() for p in data.rglob("*.parquet")}
    assert after == before  # the earlier output of every shard is intact
    assert not list(data.rglob(".*tmp*"))  # and no partial file was left
