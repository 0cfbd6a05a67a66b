"""Seed shards: safe partition keys, tolerant parsing of JSONL / CSV / Parquet, and the
`caption_seeds` asset on a real Dagster instance. Every bad-input case asserts that the message
names the file, the line and the fix, and that nothing else was lost."""

from __future__ import annotations

import io
import json
import os
import re
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


def test_folders_and_links_in_the_seed_location_are_named_not_read(tmp_path: Path):
    folder = tmp_path / "seeds"
    write_jsonl(folder / "top.jsonl", coco_captions(2))
    write_jsonl(folder / "nested" / "deeper.jsonl", coco_captions(2, offset=2))
    outside = write_jsonl(tmp_path / "elsewhere" / "outside.jsonl", coco_captions(2, offset=4))
    (folder / "linked.jsonl").symlink_to(outside)
    (folder / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")
    (folder / "linked-dir").symlink_to(outside.parent, target_is_directory=True)
    source = SeedSource(location=str(folder))

    shards, problems = source.shards()
    assert shards == {"top": str(folder / "top.jsonl")}  # as before: only the regular file
    by_name = {p.split(": ")[0]: p for p in problems}
    assert set(by_name) == {str(folder / n) for n in
                            ("nested", "linked.jsonl", "dangling.jsonl", "linked-dir")}
    assert "a folder; only the files at the top of the seed location are read" in \
        by_name[str(folder / "nested")]
    assert "point the seed location at the folder" in by_name[str(folder / "nested")]
    link = by_name[str(folder / "linked.jsonl")]
    assert f"a symbolic link (to {outside})" in link and "Copy the file itself" in link
    assert [e["name"] for e in source.list_entries()] == [str(folder / "top.jsonl")]
    with pytest.raises(SeedError, match="no seed file for shard 'linked'"):
        read_shard(source, "linked")  # a link is never read, even by its key


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
    # a null caption in one row rejects that row only, as null (the column is there)
    result = read(parquet(pl.DataFrame({"caption": [caps[0], None, caps[2]]})), "n.parquet")
    assert result.seeds["caption"].to_list() == [caps[0], caps[2]]
    assert_message(only_reject(result, "null_caption"), "/seeds/n.parquet", 2,
                   "'caption' is null; give the record a caption text")


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


def plain_captions(n: int) -> list[str]:
    """Real COCO captions without a comma or a quote, to write as bare CSV fields."""
    caps = [c["caption"] for c in coco_captions(4 * n)]
    return [c for c in caps if "," not in c and '"' not in c][:n]


def test_an_unclosed_csv_quote_rejects_its_record_and_keeps_the_others():
    caps = plain_captions(4)
    data = f'id,caption\n1,{caps[0]}\n2,"{caps[1]}\n3,{caps[2]}\n4,{caps[3]}\n'.encode()
    result = read(data, "quote.csv")
    # the quote of line 3 used to swallow lines 4 and 5 into its caption, with no reject
    assert result.seeds.select("caption", "source_line").rows() == [
        (caps[0], 2), (caps[2], 4), (caps[3], 5)]
    reject = only_reject(result, "bad_csv")
    assert_message(reject, "/seeds/quote.csv", 3, "never closed")
    assert reject["raw"] == f'2,"{caps[1]}\n'[:200]
    assert result.lines_read == 5
    with pytest.raises(SeedError, match=r"quote.csv:3: a quote opened in this record"):
        read(data, "quote.csv", on_bad_line="fail")


def test_a_csv_quote_that_closes_on_a_later_line_rejects_the_line_it_opened_on():
    caps = plain_captions(3)
    data = f'id,caption\n1,"{caps[0]}\n2,"{caps[1]}"\n3,{caps[2]}\n'.encode()
    result = read(data, "late.csv")
    assert result.seeds.select("caption", "source_line").rows() == [(caps[1], 3), (caps[2], 4)]
    assert_message(only_reject(result, "bad_csv"), "/seeds/late.csv", 2,
                   "close every quoted field just before the comma or line end")


def test_a_csv_row_with_more_fields_than_the_header_is_rejected():
    caps = plain_captions(2)
    data = f"id,caption\n1,{caps[0]}\n2,A dog, a cat and a bird\n3,{caps[1]}\n".encode()
    result = read(data, "wide.csv")
    # before, the caption was cut at the comma ("A dog") and the rest dropped without a word
    assert result.seeds["caption"].to_list() == caps
    reject = only_reject(result, "bad_csv")
    assert_message(reject, "/seeds/wide.csv", 3, 'quote a field that holds a comma ("...")')
    assert "has 3 field(s), the header 2" in reject["detail"]


@pytest.mark.parametrize("char, name", [("\x00", "U+0000 (NUL)"), ("\x07", "U+0007 (BEL)"),
                                        ("\x1b", "U+001B (ESC)"), ("\x7f", "U+007F (DEL)"),
                                        ("\x85", "U+0085")])
def test_a_control_character_rejects_the_record(char, name):
    caps = [c["caption"] for c in coco_captions(2)]
    bad = f"A dog{char}[31m on the grass."
    from_jsonl = read(jsonl([{"caption": caps[0]}, {"caption": bad}, {"caption": caps[1]}]),
                      "ctl.jsonl")
    assert from_jsonl.seeds["caption"].to_list() == caps
    reject = only_reject(from_jsonl, "control_character")
    assert_message(reject, "/seeds/ctl.jsonl", 2,
                   f"'caption' holds the control character {name} at character 6; remove it")
    assert "control_character" in BAD_LINE_REASONS  # counted as malformed, fails strict shards

    from_csv = read(csv_bytes([{"caption": c} for c in (caps[0], bad, caps[1])], ["caption"]),
                    "ctl.csv")
    assert from_csv.seeds["caption"].to_list() == caps
    reject = only_reject(from_csv, "control_character")
    assert reject["source_line"] == 3
    # the rejects output shows the character, escaped, and does not carry it on
    assert char not in reject["raw"] and f"\\x{ord(char):02x}[31m" in reject["raw"]
    from_parquet = read(parquet(pl.DataFrame({"caption": [caps[0], bad, caps[1]]})), "c.parquet")
    assert from_parquet.seeds["caption"].to_list() == caps
    assert only_reject(from_parquet, "control_character")["source_line"] == 2


def test_a_control_character_in_a_label_rejects_the_record():
    result = read(jsonl([{"label": "Blue\x1bJay"}, {"caption": "A bird.", "label": "Owl\x00"}]))
    assert result.seeds.height == 0
    details = result.rejects.filter(pl.col("reason") == "control_character")["detail"].to_list()
    assert len(details) == 2 and all("'label' holds the control character" in d for d in details)


def test_tabs_and_line_breaks_in_a_caption_become_spaces():
    data = jsonl([{"caption": "A dog\ton the\r\ngrass,\x0bin\x0cthe sun."}])
    result = read(data)
    assert result.seeds["caption"].to_list() == ["A dog on the grass, in the sun."]
    assert result.rejects.height == 0


def test_a_null_caption_is_reported_as_null_not_as_missing():
    caps = [c["caption"] for c in coco_captions(2)]
    from_jsonl = read(jsonl([{"caption": caps[0]}, {"id": 2, "caption": None}, {"id": 3},
                             {"caption": caps[1]}]), "null.jsonl")
    assert from_jsonl.seeds["caption"].to_list() == caps
    null = only_reject(from_jsonl, "null_caption")
    assert_message(null, "/seeds/null.jsonl", 2, "'caption' is null; give the record a caption")
    assert "no 'caption'" not in null["detail"]
    assert_message(only_reject(from_jsonl, "missing_caption"), "/seeds/null.jsonl", 3,
                   "no 'caption' (or 'label') field; found: id")
    assert {"null_caption", "missing_caption"} <= BAD_LINE_REASONS

    # CSV has no null: an empty caption cell is one
    from_csv = read(csv_bytes([{"id": "1", "caption": caps[0]}, {"id": "2", "caption": ""},
                               {"id": "3", "caption": caps[1]}], ["id", "caption"]), "null.csv")
    assert from_csv.seeds["caption"].to_list() == caps
    assert_message(only_reject(from_csv, "null_caption"), "/seeds/null.csv", 3,
                   "'caption' is null")

    from_parquet = read(parquet(pl.DataFrame({"caption": [None, caps[0]],
                                              "label": [None, None]})), "null.parquet")
    assert from_parquet.seeds["caption"].to_list() == [caps[0]]
    assert_message(only_reject(from_parquet, "null_caption"), "/seeds/null.parquet", 1,
                   "'caption' and 'label' are null")

    # a null caption beside a label is a label seed, in every format
    assert read(jsonl([{"caption": None, "label": "Blue Jay"}])).seeds.height == 10
    assert read(b"caption,label\n,Blue Jay\n", "l.csv").seeds.height == 10


# ---------------------------------------------------------------- labels, ids, empty captions

@pytest.mark.parametrize("label, article", [
    ("Atlantic Puffin", "an"), ("Blue Jay", "a"), ("European Robin", "a"), ("unicorn", "a"),
    ("Umbrella Bird", "an"), ("hourglass", "an"), ("Honey Bee", "a"), ("Airbus A380", "an"),
    ("A380", "an"), ("F-16", "an"), ("SUV", "an"), ("UFO", "a"), ("BMW 3 Series", "a"),
    ("NASA rocket", "a"), ("8-ball", "an"), ("Égyptienne", "an"), ("one-way sign", "a"),
])
def test_label_templates_choose_a_or_an(label, article):
    result = read(jsonl([{"label": label}]))
    assert result.seeds.height == 10
    before_label = [m[1].lower() for c in result.seeds["caption"]
                    if (m := re.search(rf"\b(an?) {re.escape(label)}", c, re.IGNORECASE))]
    assert len(before_label) >= 5 and set(before_label) == {article}, before_label


def test_a_given_id_wins_over_a_label_id_made_equal_to_it_in_either_order():
    given = {"id": "puffin-t0", "caption": "A puffin on a cliff."}
    label = {"id": "puffin", "label": "Atlantic Puffin"}
    for records, label_line, given_line in (([given, label], 2, 1), ([label, given], 1, 2)):
        result = read(jsonl(records), "ids.jsonl")
        assert result.seeds.filter(pl.col("seed_id") == "puffin-t0")["caption"].to_list() == [
            "A puffin on a cliff."]
        assert result.seeds["seed_id"].is_unique().all()
        assert result.seeds.filter(pl.col("seed_kind") == "label").height == 0
        assert_message(only_reject(result, "duplicate_id"), "/seeds/ids.jsonl", label_line,
                       f"label 'Atlantic Puffin' makes the seed id 'puffin-t0' (its id plus a "
                       f"template number), which line {given_line} gives as its id; give this "
                       "record (or line")


def test_a_made_digest_id_never_takes_a_given_id():
    caption = "A puffin on a cliff."
    digest = stable_id("caption", caption)
    result = read(jsonl([{"caption": caption}, {"id": digest, "caption": "A tern."}]), "d.jsonl")
    assert result.seeds.select("seed_id", "caption").rows() == [(digest, "A tern.")]
    assert_message(only_reject(result, "duplicate_id"), "/seeds/d.jsonl", 1,
                   f"the digest id {digest!r} of this caption, which line 2 gives as its id")


def test_one_id_given_to_a_label_and_a_caption_is_a_reused_id():
    result = read(jsonl([{"id": "x", "label": "Snowy Owl"}, {"id": "x", "caption": "A tram."}]),
                  "x.jsonl")
    assert result.seeds.height == 10 and set(result.seeds["seed_kind"]) == {"label"}
    assert_message(only_reject(result, "duplicate_id"), "/seeds/x.jsonl", 2,
                   "id 'x' already used on line 1; give every record its own id")


@pytest.mark.parametrize("caption", ["", "   ", None])
def test_an_empty_caption_beside_a_label_makes_label_seeds_in_every_format(caption):
    def seeds_of(result):
        assert result.rejects.height == 0, result.rejects
        return result.seeds.select("seed_id", "caption", "seed_kind", "label", "source_line")

    record = {"id": "jay", "caption": caption, "label": "Blue Jay"}
    from_jsonl = seeds_of(read(jsonl([record]), "e.jsonl"))
    cell = "" if caption is None else caption
    from_csv = seeds_of(read(f"id,caption,label\njay,{cell},Blue Jay\n".encode(), "e.csv"))
    from_parquet = seeds_of(read(parquet(pl.DataFrame(
        [record], schema={"id": pl.String, "caption": pl.String, "label": pl.String})),
        "e.parquet"))
    assert from_jsonl.height == 10 and set(from_jsonl["seed_kind"]) == {"label"}
    assert from_jsonl.drop("source_line").equals(from_csv.drop("source_line"))
    assert from_jsonl.equals(from_parquet)
    assert set(from_csv["source_line"]) == {2}  # the line after the header


def test_an_empty_caption_beside_an_empty_label_is_dropped_as_empty_in_jsonl_and_csv():
    from_jsonl = read(jsonl([{"caption": "", "label": ""}, {"caption": "A tram."}]), "e.jsonl")
    from_csv = read(b"caption,label\n  ,  \nA tram.,\n", "e.csv")
    for result in (from_jsonl, from_csv):
        assert result.seeds["caption"].to_list() == ["A tram."]
        assert result.counts == {"empty_caption": 1}


# ---------------------------------------------------------------- the asset, on a real instance


def materialise_seeds(instance, data_dir: Path, seeds: Path, keys: list[str],
                      gates: dict | None = None, **seed_options):
    existing = set(instance.get_dynamic_partitions("seed_shards"))
    instance.add_dynamic_partitions("seed_shards", [k for k in keys if k not in existing])
    resources = make_resources(data_dir, seeds, seeds=seed_options, quality_gates=gates or {})
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
    # each shard is judged on its own: the empty one and the one with half its lines malformed
    # (over seed_max_reject_rate) fail by name; the good one is stored
    assert not result.success
    (failure,) = result.get_step_failure_events()
    message = failure.step_failure_data.error.message
    assert "2 of 3 shard(s) failed" in message
    assert (f"- empty: {folder / 'empty.jsonl'}: no seed is left of 0 line(s) (rejects: "
            "empty_file 1)") in message
    assert (f"- mixed: {folder / 'mixed.jsonl'}: 2 malformed line(s) beside 2 seed(s): reject "
            "rate 50.0% (max 25%), over quality_gates.seed_max_reject_rate") in message
    assert "fix the lines listed in caption_seed_rejects, or raise the gate" in message
    assert "The other 1 (good) were stored" in message

    good = pl.read_parquet(data / "caption_seeds" / "good.parquet")
    alone = read_shard(SeedSource(location=str(folder)), "good").seeds
    assert good.equals(alone) and good.height == 4
    assert pl.read_parquet(data / "caption_seed_rejects" / "good.parquet").height == 0
    # the failed shards' seeds go nowhere; their rejects are stored, to say what to fix
    assert not (data / "caption_seeds" / "mixed.parquet").exists()
    assert not (data / "caption_seeds" / "empty.parquet").exists()
    rejects = pl.read_parquet(data / "caption_seed_rejects" / "mixed.parquet")
    assert rejects.select("source_line", "reason").rows() == [(2, "bad_json"),
                                                             (3, "bad_encoding")]
    assert pl.read_parquet(data / "caption_seed_rejects" / "empty.parquet")["reason"].to_list() \
        == ["empty_file"]

    seeds_meta = run_materialisations(instance, result.run_id, "caption_seeds")
    rejects_meta = run_materialisations(instance, result.run_id, "caption_seed_rejects")
    assert set(seeds_meta) == {"good"} and set(rejects_meta) == {"empty", "good", "mixed"}
    # one run, three shards: each shard's materialisation carries its own figures
    assert seeds_meta["good"]["dagster/row_count"] == 4
    assert seeds_meta["good"]["shards_in_run"] == 3
    # reject counts are numbers the UI plots, one per reason
    assert rejects_meta["mixed"]["rejects_bad_encoding"] == 1
    assert rejects_meta["mixed"]["rejects_bad_json"] == 1
    assert rejects_meta["empty"]["rejects_empty_file"] == 1

    # under a looser gate the mixed shard passes, and so do the blocking checks, which judge
    # each shard of a run on its own
    loose = materialise_seeds(instance, data, folder, ["good", "mixed"],
                              gates={"seed_max_reject_rate": 0.5})
    assert loose.success
    assert pl.read_parquet(data / "caption_seeds" / "mixed.parquet")["caption"].to_list() \
        == caps[:2]
    checks = checks_by_name(loose, "caption_seeds")
    assert checks["malformed_line_rate"].passed
    assert checks["malformed_line_rate"].metadata["shards"].value == 2
    # ... and the good shard alone passes every check
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
    wrote = materialise_seeds(instance, data, folder, ["mixed"],  # skip mode, a loose gate
                              gates={"seed_max_reject_rate": 0.5})
    assert wrote.success
    assert materialise_seeds(instance, data, folder, ["good"]).success
    before = {p: p.read_bytes() for p in data.rglob("*.parquet")}

    result = materialise_seeds(instance, data, folder, ["mixed"], on_bad_line="fail")
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error.to_string()
    assert "1 of 1 shard(s) failed" in error and "mixed.jsonl: 2 malformed line(s)" in error
    assert "on_bad_line='fail'" in error
    assert "mixed.jsonl:2: " in error and "mixed.jsonl:3: " in error
    after = {p: p.read_bytes() for p in data.rglob("*.parquet")}
    assert after == before  # the earlier output of every shard is intact
    assert not list(data.rglob(".*tmp*"))  # and no partial file was left


def run_materialisations(instance, run_id: str, asset: str) -> dict[str, dict]:
    """{partition: metadata} of the materialisations of `asset` that run `run_id` recorded."""
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
    return {r.partition_key: {k: v.value for k, v in r.asset_materialization.metadata.items()}
            for r in records if r.run_id == run_id}


@pytest.mark.parametrize("damage", ["malformed lines, on_bad_line=fail", "file gone"])
def test_one_bad_shard_of_four_in_a_run_fails_alone(tmp_path: Path, instance, damage):
    folder, data = tmp_path / "seeds", tmp_path / "data"
    keys = ["shard-a", "shard-b", "shard-c", "shard-d"]
    for i, key in enumerate(keys):
        write_jsonl(folder / f"{key}.jsonl", coco_captions(3, offset=3 * i))
    instance.add_dynamic_partitions("seed_shards", keys)  # in this order: a range covers all four
    assert materialise_seeds(instance, data, folder, ["shard-c"]).success
    before = (data / "caption_seeds" / "shard-c.parquet").read_bytes()
    if damage == "file gone":
        (folder / "shard-c.jsonl").unlink()
        options, why = {}, "no seed file for shard 'shard-c'"
    else:
        with open(folder / "shard-c.jsonl", "ab") as handle:
            handle.write(b"{not json\n")
        options, why = {"on_bad_line": "fail"}, f"{folder / 'shard-c.jsonl'}: 1 malformed line(s)"

    result = materialise_seeds(instance, data, folder, keys, **options)  # one run, four shards
    # the run fails, and its failure names the bad shard, why, and what became of the others
    assert not result.success
    (failure,) = result.get_step_failure_events()
    error = failure.step_failure_data.error.message
    assert "1 of 4 shard(s) failed; what of them is not stored keeps its earlier data" in error
    assert f"- shard-c: {why}" in error
    assert "The other 3 (shard-a, shard-b, shard-d) were stored" in error
    assert failure.step_failure_data.user_failure_data.metadata["stored_shards"].value == \
        ["shard-a", "shard-b", "shard-d"]
    # the three healthy shards are stored as a run of them alone would store them ...
    for key in ("shard-a", "shard-b", "shard-d"):
        alone = read_shard(SeedSource(location=str(folder)), key)
        assert pl.read_parquet(data / "caption_seeds" / f"{key}.parquet").equals(alone.seeds)
        assert pl.read_parquet(data / "caption_seed_rejects" / f"{key}.parquet").height == 0
    # ... and recorded as materialised, each with its own figures; the bad shard is not
    for asset in ("caption_seeds", "caption_seed_rejects"):
        meta = run_materialisations(instance, result.run_id, asset)
        assert set(meta) == {"shard-a", "shard-b", "shard-d"}
        assert meta["shard-a"]["shards_in_run"] == 4
        assert meta["shard-b"]["path"] == str(data / asset / "shard-b.parquet")
    seeds_meta = run_materialisations(instance, result.run_id, "caption_seeds")
    assert {k: m["dagster/row_count"] for k, m in seeds_meta.items()} == \
        {"shard-a": 3, "shard-b": 3, "shard-d": 3}
    # with the code version a normal materialisation has, so the nightly run sees them fresh
    record = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("caption_seeds"), asset_partitions=["shard-b"]),
        limit=1).records[0]
    assert record.run_id == result.run_id
    declared = read_caption_seeds.specs_by_key[dg.AssetKey("caption_seeds")].code_version
    assert declared  # every asset declares one
    assert record.asset_materialization.tags["dagster/code_version"] == declared
    # the bad shard keeps what it had
    assert (data / "caption_seeds" / "shard-c.parquet").read_bytes() == before
