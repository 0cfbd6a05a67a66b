"""Content-addressed pairing, unit level: the caption digest helper, its copy (never a
recomputation) into instructions and embeddings, the pairing rules over stored tables (each
passing and failing, with the shards and the fix they name), and the export join on
caption_id AND caption_sha256 on real files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fsspec.implementations.local import LocalFileSystem

from unicorn_assets.logic import exports as export
from unicorn_assets.logic import modality, pairing
from unicorn_assets.logic.expansion import assemble_captions, plan_expansions
from unicorn_assets.logic.instructions import TASK_TYPES, InstructionSettings, plan_instructions
from unicorn_assets.logic.modality import ModalityStatistics
from unicorn_assets.logic.prompts import load_prompt_set
from unicorn_assets.logic.text import caption_sha256, caption_sha256_series
from unicorn_resources.export_reader import UnicornExport
from unicorn_resources.llm import SamplingParams
from unicorn_resources.llm.types import Completion

DIM = 4


# ---------------------------------------------------------------- the digest helper


def test_caption_sha256_is_the_hex_sha256_of_the_exact_utf8_text():
    text = "A red double-decker bus parked beside a café, its doors open."
    assert caption_sha256(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert len(caption_sha256(text)) == 64
    # any change of the text is another digest: case, one space, a trailing space, unicode form
    variants = {text, text.lower(), text.replace("  ", " ").replace(" ", "  ", 1), text + " ",
                text.replace("é", "e\u0301"), ""}
    assert len({caption_sha256(v) for v in variants}) == len(variants)


def test_the_series_helper_uses_the_same_digest_and_keeps_nulls():
    texts = pl.Series("caption", ["A dog.", None, "A cat."])
    out = caption_sha256_series(texts)
    assert out.name == "caption_sha256" and out.dtype == pl.String
    assert out.to_list() == [caption_sha256("A dog."), None, caption_sha256("A cat.")]


def test_stage1_stores_the_digest_of_the_text_it_keeps():
    prompts = load_prompt_set("stage1_expand", "v1")
    seeds = pl.DataFrame({"seed_id": ["1", "2"], "shard": ["s", "s"],
                          "caption": ["A dog on a sofa.", "A bus on a street."]})
    plan = plan_expansions(seeds, prompts, ["objects", "lighting"], 1, 7)
    completions = [Completion(text='  "A brown dog  sleeps on a grey sofa."  ', prompt_tokens=3,
                              completion_tokens=9, finish_reason="stop"),
                   Completion(text="A red bus waits. Its doors are open and the", prompt_tokens=3,
                              completion_tokens=9, finish_reason="length")]
    frame = assemble_captions(plan, completions, "m", prompts, SamplingParams().as_dict())
    # the digest is of the stored (cleaned, trimmed) text, not of the raw completion
    assert frame["caption"].to_list() == ["A brown dog sleeps on a grey sofa.", "A red bus waits."]
    assert frame["caption_sha256"].to_list() == [caption_sha256(t) for t in frame["caption"]]
    assert pairing.digests_match_text(frame).passed
    edited = frame.with_columns(pl.when(pl.col("seed_id") == "2").then(pl.lit("A blue bus."))
                                .otherwise(pl.col("caption")).alias("caption"))
    outcome = pairing.digests_match_text(edited)
    assert not outcome.passed and outcome.metadata["mismatched"] == 1
    assert not pairing.digests_match_text(frame.drop("caption_sha256")).passed


def test_instructions_and_embeddings_copy_the_digest_of_their_caption_row():
    """Copied, never recomputed: a digest that is not the text's travels unchanged."""
    captions = pl.DataFrame({"caption_id": ["c1", "c2"], "seed_id": ["1", "2"],
                             "shard": ["s", "s"], "caption": ["A dog.", "A cat."],
                             "caption_sha256": ["digest-of-c1", "digest-of-c2"]})
    plan = plan_instructions(captions, InstructionSettings(
        task_mix={"question_answering": 1}, turns={task: (1, 1) for task in TASK_TYPES}))
    assert plan["caption_sha256"].to_list() == ["digest-of-c1", "digest-of-c2"]
    vectors = np.eye(2, DIM, dtype=np.float32)
    embedded = modality.caption_embeddings_frame(captions, vectors, "clip")
    assert embedded["caption_sha256"].to_list() == ["digest-of-c1", "digest-of-c2"]
    stats = ModalityStatistics("clip", False, 2, DIM, np.full(DIM, 0.1), shards=1)
    shifted = modality.transfer(embedded.lazy(), stats).collect()
    assert shifted["caption_sha256"].to_list() == ["digest-of-c1", "digest-of-c2"]
    assert all(shifted.schema[name] == dtype
               for name, dtype in modality.TRANSFERRED_SCHEMA.items())


# ---------------------------------------------------------------- the pairing rules


def caption_table(texts: dict[str, tuple[str, str]]) -> pl.LazyFrame:
    """{caption_id: (shard, text)} as Stage 1 stores it (id, shard, text, digest)."""
    ids = list(texts)
    frame = pl.DataFrame({"caption_id": ids, "shard": [texts[i][0] for i in ids],
                          "caption": [texts[i][1] for i in ids]})
    return frame.with_columns(caption_sha256_series(frame["caption"])).lazy()


def made_from(captions: pl.LazyFrame, **extra) -> pl.LazyFrame:
    """What Stage 2/3 store: the caption rows' id, shard and digest (copied)."""
    return captions.select("caption_id", "shard", "caption_sha256").with_columns(
        **{k: pl.lit(v) for k, v in extra.items()})


OLD = {"a1": ("shard-a", "A dog on a sofa."), "a2": ("shard-a", "A cat on a mat."),
       "b1": ("shard-b", "A bus on a street."), "c1": ("shard-c", "A kite over a beach.")}


def tables(captions: pl.LazyFrame, embedded_from: pl.LazyFrame | None = None,
           instructed_from: pl.LazyFrame | None = None) -> dict[str, pl.LazyFrame]:
    embedded = made_from(embedded_from if embedded_from is not None else captions)
    return {"caption_embeddings": embedded, "transferred_embeddings": embedded,
            "instructions": made_from(instructed_from if instructed_from is not None else captions,
                                      id="i")}


def test_stored_tables_made_from_the_same_texts_pair():
    captions = caption_table(OLD)
    problems = pairing.find_problems(captions, tables(captions))
    assert problems.is_empty()
    assert pairing.outcome(problems).passed
    # fewer instruction records than captions is fine (a per-shard cap, rejects)
    few = tables(captions, instructed_from=captions.filter(pl.col("caption_id") == "a1"))
    assert pairing.find_problems(captions, few).is_empty()


def test_captions_rewritten_under_the_same_ids_name_the_shards_and_the_fix():
    """Stage 1 of shard-a and shard-c re-ran with other sampling: same ids, other texts; the
    instructions and embeddings are still those of the old texts."""
    old = caption_table(OLD)
    new = caption_table({**OLD, "a1": ("shard-a", "A brown dog asleep on a sofa."),
                         "c1": ("shard-c", "A red kite high over a sandy beach.")})
    problems = pairing.find_problems(new, tables(new, embedded_from=old, instructed_from=old))
    assert problems.filter(pl.col("asset") != "transferred_embeddings").rows() == [
        ("caption_embeddings", "shard-a", "other_text", 1),
        ("caption_embeddings", "shard-c", "other_text", 1),
        ("instructions", "shard-a", "other_text", 1),
        ("instructions", "shard-c", "other_text", 1)]
    outcome = pairing.outcome(problems)
    assert not outcome.passed and outcome.metadata["shards"] == ["shard-a", "shard-c"]
    assert "shard-b" not in outcome.description
    (fix,) = pairing.fixes(problems)
    assert fix == pairing.Fix(("shard-a", "shard-c"), ("instructions", "caption_embeddings"))
    text = outcome.description
    assert "shard(s) shard-a, shard-c: instructions and caption_embeddings were made from older " \
           "captions" in text
    assert "unicorn backfill --shard shard-a --shard shard-c --select 'key:\"instructions\" or " \
           "key:\"instruction_rejects\" or key:\"caption_embeddings\"'" in text
    assert "unicorn materialize --shard shard-a --shard shard-c" in text
    assert "then unicorn_corpus_job" in text


def test_only_the_stale_asset_is_named_per_shard():
    old = caption_table(OLD)
    new = caption_table({**OLD, "a1": ("shard-a", "A brown dog asleep on a sofa."),
                         "b1": ("shard-b", "A red bus on a wet street.")})
    # shard-a: embeddings re-made, instructions stale; shard-b: the other way round
    embedded = pl.concat([made_from(new.filter(pl.col("shard") == "shard-a")),
                          made_from(old.filter(pl.col("shard") != "shard-a"))])
    instructed = pl.concat([made_from(old.filter(pl.col("shard") == "shard-a")),
                            made_from(new.filter(pl.col("shard") != "shard-a"))])
    problems = pairing.find_problems(new, {"caption_embeddings": embedded,
                                           "instructions": instructed})
    assert pairing.fixes(problems) == [
        pairing.Fix(("shard-b",), ("caption_embeddings",)),
        pairing.Fix(("shard-a",), ("instructions",))]


def test_a_caption_gone_or_without_embedding_is_a_problem_of_its_shard():
    old = caption_table(OLD)
    # the re-run kept a2's sibling a3 instead of a2 (another sampling, other filter survivors)
    new = caption_table({k: v for k, v in OLD.items() if k != "a2"}
                        | {"a3": ("shard-a", "A grey cat asleep on a woven mat.")})
    problems = pairing.find_problems(new, tables(new, embedded_from=old, instructed_from=old))
    rows = set(problems.rows())
    assert ("caption_embeddings", "shard-a", "source_gone", 1) in rows
    assert ("caption_embeddings", "shard-a", "missing", 1) in rows
    assert ("instructions", "shard-a", "source_gone", 1) in rows
    assert ("instructions", "shard-a", "missing", 1) not in rows  # instructions may be fewer
    assert pairing.outcome(problems).metadata["shards"] == ["shard-a"]


def test_stale_shifted_embeddings_alone_ask_for_the_corpus_job():
    old = caption_table(OLD)
    new = caption_table({**OLD, "b1": ("shard-b", "A red bus on a wet street.")})
    fresh = tables(new)
    fresh["transferred_embeddings"] = made_from(old)  # shifted before shard-b's embeddings
    problems = pairing.find_problems(new, fresh)
    assert problems.rows() == [("transferred_embeddings", "shard-b", "other_text", 1)]
    outcome = pairing.outcome(problems)
    assert not outcome.passed and pairing.fixes(problems) == []
    assert "run unicorn_corpus_job" in outcome.description


def test_tables_made_before_caption_digests_never_pair():
    captions = caption_table(OLD)
    legacy = captions.select("caption_id", "shard")  # no caption_sha256 column at all
    problems = pairing.find_problems(captions, {"caption_embeddings": legacy,
                                                "instructions": made_from(captions)})
    assert problems.rows() == [("caption_embeddings", s, "no_digest", n)
                               for s, n in (("shard-a", 2), ("shard-b", 1), ("shard-c", 1))]
    old_captions = captions.drop("caption_sha256")
    problems = pairing.find_problems(old_captions, {"caption_embeddings": made_from(captions)})
    # the captions themselves lack digests: the whole shard re-runs; rows made from them are
    # not blamed on their own
    assert set(problems["asset"]) == {"expanded_captions"}
    (fix,) = pairing.fixes(problems)
    assert fix.assets == ("expanded_captions",)
    assert "re-run those shards whole: `unicorn materialize --shard shard-a --shard shard-b " \
           "--shard shard-c`" in pairing.outcome(problems).description


def test_a_check_against_an_unknown_source_is_refused():
    captions = caption_table(OLD)
    with pytest.raises(ValueError, match="transferred_embeddings is checked against "
                                         "caption_embeddings"):
        pairing.find_problems(captions, {"transferred_embeddings": made_from(captions)})


# ---------------------------------------------------------------- the export join


def test_a_record_pairs_only_with_the_embedding_of_its_exact_text(tmp_path: Path):
    """Two captions keep their id but one changed its text: its record finds no embedding (the
    stale one is not even written) and the export does not resolve; the other pairs."""
    old = caption_table({"a1": OLD["a1"], "a2": OLD["a2"]}).collect()
    new = caption_table({"a1": ("shard-a", "A brown dog asleep on a sofa."),
                         "a2": OLD["a2"]}).collect()
    vectors = np.eye(2, DIM, dtype=np.float32)
    embedded = modality.caption_embeddings_frame(old, vectors, "clip")
    stats = ModalityStatistics("clip", False, 2, DIM, np.full(DIM, 0.1), shards=1)
    shifted = modality.transfer(embedded.lazy(), stats).collect().lazy()
    records = export.pretrain_records(new.lazy(), ["Describe the image."])
    folder = tmp_path / "out"
    folder.mkdir()
    written = export.write_export(folder, records, shifted, stats, rows_per_file=10)
    assert (written.records, written.embeddings) == (2, 1)  # a1's old embedding is not written
    (folder / export.MANIFEST).write_text(json.dumps(export.manifest(
        "test", written, stats, export.file_table(folder, written.embedding_files))))
    lines = [json.loads(line) for line in (folder / export.RECORDS).read_text().splitlines()]
    by_id = {r["id"]: r for r in lines}
    assert by_id["a1"]["embedding"] == {"file": None, "row": None}
    assert by_id["a2"]["caption_sha256"] == caption_sha256(by_id["a2"]["conversations"][1]["value"])
    outcome = export.records_resolve(export.ExportFolder(LocalFileSystem(), str(folder)))
    assert not outcome.passed and outcome.metadata["dangling"] == 1

    # with the embedding of the new text, both pair, and each record's text is its vector's
    embedded = modality.caption_embeddings_frame(new, vectors, "clip")
    shifted = modality.transfer(embedded.lazy(), stats).collect()
    good = tmp_path / "good"
    good.mkdir()
    written = export.write_export(good, records, shifted.lazy(), stats, rows_per_file=10)
    (good / export.MANIFEST).write_text(json.dumps(export.manifest(
        "test", written, stats, export.file_table(good, written.embedding_files))))
    assert export.records_resolve(export.ExportFolder(LocalFileSystem(), str(good))).passed
    data = UnicornExport(good)
    by_digest = dict(zip(shifted["caption_sha256"], shifted["embedding"].to_numpy()))
    for record in data.records():
        digest = caption_sha256(record["conversations"][1]["value"])
        assert record["caption_sha256"] == digest
        np.testing.assert_array_equal(data.embedding(record), by_digest[digest])
