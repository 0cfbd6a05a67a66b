"""Export logic on real files: LLaVA records, safetensors shards and index, manifest checksums,
the two export checks (each passing and failing), whole-folder publishing, and the export reader."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import polars as pl
import pytest
from fsspec.implementations.local import LocalFileSystem

from unicorn_assets.logic import exports as export
from unicorn_assets.logic import modality
from unicorn_assets.logic.modality import ModalityStatistics
from unicorn_assets.logic.prompts import load_lines
from unicorn_assets.logic.text import caption_sha256_series, stable_id
from unicorn_resources.export_reader import UnicornExport
from unicorn_resources.export_reader import main as load_example_main

DIM = 6
PROMPTS = load_lines("brief_description/v1.txt")


def captions(n: int) -> pl.DataFrame:
    texts = pl.Series("caption", [f"A photo number {i} of a red kite over a beach."
                                  for i in range(n)])
    return pl.DataFrame({"caption_id": [stable_id("c", i) for i in range(n)],
                         "shard": ["a" if i % 2 else "b" for i in range(n)]}).with_columns(
        texts, caption_sha256_series(texts))


@pytest.fixture
def source() -> tuple[pl.DataFrame, pl.LazyFrame, ModalityStatistics]:
    frame = captions(12)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((12, DIM)).astype(np.float32) + 0.5
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    embedded = modality.caption_embeddings_frame(frame, vectors, "clip")
    summary = modality.summarise(embedded)
    stats = ModalityStatistics("clip", False, summary.count, DIM, summary.mean, shards=2)
    return frame, modality.transfer(embedded.lazy(), stats).collect().lazy(), stats


def build(folder: Path, records: pl.LazyFrame, embeddings: pl.LazyFrame,
          stats: ModalityStatistics, rows_per_file: int = 5) -> export.WrittenExport:
    folder.mkdir(parents=True, exist_ok=True)
    written = export.write_export(folder, records, embeddings, stats, rows_per_file)
    manifest = export.manifest("test", written, stats, export.file_table(folder, written.embedding_files))
    (folder / export.MANIFEST).write_text(json.dumps(manifest))
    return written


def local(folder: Path) -> export.ExportFolder:
    return export.ExportFolder(LocalFileSystem(), str(folder))


def test_pretrain_records_are_llava_brief_descriptions():
    frame = captions(30)
    records = export.pretrain_records(frame.lazy(), PROMPTS).collect()
    assert records["id"].to_list() == frame["caption_id"].to_list()
    first = records["conversations"][0].to_list()
    assert [t["from"] for t in first] == ["human", "gpt"]
    assert first[0]["value"].removeprefix("<image>\n") in PROMPTS
    assert first[1]["value"] == frame["caption"][0]
    chosen = {c[0]["value"] for c in records["conversations"].to_list()}
    assert len(chosen) > 3  # the prompt varies across records ...
    again = export.pretrain_records(frame.lazy(), PROMPTS).collect()
    assert again.equals(records)  # ... and is the same on every export
    with pytest.raises(ValueError):
        export.pretrain_records(frame.lazy(), ())


def test_write_export_shards_index_and_loads_back(tmp_path: Path, source):
    frame, embeddings, stats = source
    records = export.pretrain_records(frame.lazy(), PROMPTS)
    written = build(tmp_path / "out", records, embeddings, stats, rows_per_file=5)
    assert (written.records, written.embeddings) == (12, 12)
    assert list(written.embedding_files.values()) == [5, 5, 2]

    data = UnicornExport(tmp_path / "out")
    expected = dict(zip(*embeddings.collect().select("caption_id", "embedding").to_dict().values()))
    count = 0
    for record in data.records():
        np.testing.assert_array_equal(data.embedding(record), np.asarray(expected[record["caption_id"]],
                                                                         dtype=np.float32))
        count += 1
    assert count == 12
    index = pl.read_parquet(tmp_path / "out" / export.INDEX)
    assert index.columns == ["id", "file", "row"] and index["id"].n_unique() == 12
    manifest = data.manifest
    assert manifest["statistics_version"] == stats.version and manifest["embedding"]["dim"] == DIM
    assert manifest["transfer"]["formula"] == modality.TRANSFER_FORMULA
    assert "untrained" in manifest["note"]
    assert set(manifest["files"]) == {export.RECORDS, export.RECORDS_ARRAY, export.CARD,
                                      export.INDEX, export.STATISTICS, *written.embedding_files}
    assert export.checksums_match(local(tmp_path / "out")).passed
    assert export.records_resolve(local(tmp_path / "out")).passed


def test_records_of_one_caption_share_its_embedding(tmp_path: Path, source):
    frame, embeddings, stats = source
    used = frame["caption_id"][:3].to_list()
    digest = dict(zip(frame["caption_id"], frame["caption_sha256"]))
    instructions = pl.LazyFrame({
        "id": ["i1", "i2", "i3", "i4"], "caption_id": [used[0], used[0], used[1], used[2]],
        "caption_sha256": [digest[used[0]], digest[used[0]], digest[used[1]], digest[used[2]]],
        "task_type": ["multiple_choice", "question_answering", "multi_turn", "complex_reasoning"],
        "conversations": [[{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]] * 4,
    })
    written = build(tmp_path / "out", export.instruct_records(instructions), embeddings, stats)
    assert (written.records, written.embeddings) == (4, 3)  # only the captions the records use
    pointers = [r["embedding"] for r in UnicornExport(tmp_path / "out").records()]
    assert pointers[0] == pointers[1] != pointers[2]
    assert export.records_resolve(local(tmp_path / "out")).passed


def test_export_refuses_embeddings_of_other_statistics(tmp_path: Path, source):
    frame, embeddings, stats = source
    other = ModalityStatistics("clip", False, stats.count + 1, DIM, stats.mu_text, shards=3)
    with pytest.raises(ValueError, match="re-materialise transferred_embeddings"):
        export.write_export(tmp_path, export.pretrain_records(frame.lazy(), PROMPTS), embeddings,
                            other, 5)


def test_checksum_check_fails_on_changed_missing_or_extra_files(tmp_path: Path, source):
    frame, embeddings, stats = source
    folder = tmp_path / "out"
    build(folder, export.pretrain_records(frame.lazy(), PROMPTS), embeddings, stats)
    assert export.checksums_match(local(folder)).passed

    records = folder / export.RECORDS
    records.write_text(records.read_text().replace("red kite", "red kits", 1))
    outcome = export.checksums_match(local(folder))
    assert not outcome.passed and outcome.metadata["mismatched"] == [export.RECORDS]

    build(folder, export.pretrain_records(frame.lazy(), PROMPTS), embeddings, stats)
    (folder / "stray.txt").write_text("x")
    (folder / "embeddings" / "embeddings-00002.safetensors").unlink()
    outcome = export.checksums_match(local(folder))
    assert not outcome.passed
    assert outcome.metadata["unlisted"] == ["stray.txt"]
    assert outcome.metadata["missing"] == ["embeddings/embeddings-00002.safetensors"]
    assert not export.checksums_match(local(tmp_path / "none")).passed


def test_resolve_check_fails_on_unindexed_duplicated_or_dangling_records(tmp_path: Path, source):
    frame, embeddings, stats = source
    folder = tmp_path / "out"
    build(folder, export.pretrain_records(frame.lazy(), PROMPTS), embeddings, stats)
    index = pl.read_parquet(folder / export.INDEX)

    index.slice(1).write_parquet(folder / export.INDEX)  # a record lost its entry
    assert export.records_resolve(local(folder)).metadata["not_once"] == 1
    pl.concat([index, index.head(1)]).write_parquet(folder / export.INDEX)  # listed twice
    assert not export.records_resolve(local(folder)).passed
    index.with_columns(pl.when(pl.col("id") == index["id"][0]).then(99).otherwise(pl.col("row"))
                       .alias("row")).write_parquet(folder / export.INDEX)  # row past the file
    outcome = export.records_resolve(local(folder))
    assert not outcome.passed and outcome.metadata["dangling"] == 1
    index.write_parquet(folder / export.INDEX)
    assert export.records_resolve(local(folder)).passed


def test_a_record_without_embedding_does_not_resolve(tmp_path: Path, source):
    frame, embeddings, stats = source
    missing = embeddings.filter(pl.col("caption_id") != frame["caption_id"][3])
    build(tmp_path / "out", export.pretrain_records(frame.lazy(), PROMPTS), missing, stats)
    outcome = export.records_resolve(local(tmp_path / "out"))
    assert not outcome.passed and outcome.metadata["dangling"] == 1


def test_publish_replaces_the_previous_export_whole(tmp_path: Path, source):
    frame, embeddings, stats = source
    fs, target = LocalFileSystem(), str(tmp_path / "exports" / "pretrain")
    for rows_per_file in (3, 5):  # the second export has fewer embedding files
        staging = export.staging_folder(fs, target)
        assert staging.parent == Path(target).parent
        build(staging, export.pretrain_records(frame.lazy(), PROMPTS), embeddings, stats,
              rows_per_file)
        export.publish(staging, fs, target)
    files = sorted(p.relative_to(target).as_posix() for p in Path(target).rglob("*") if p.is_file())
    assert [f for f in files if f.startswith("embeddings/")] == [
        f"embeddings/embeddings-0000{i}.safetensors" for i in range(3)]  # no file of the first
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["pretrain"]  # no temp left
    assert export.checksums_match(local(Path(target))).passed


def test_publish_to_an_object_store_writes_the_manifest_last(tmp_path: Path, source):
    frame, embeddings, stats = source
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/exports/pretrain/embeddings/embeddings-00009.safetensors", b"old")
    written = []
    put = fs.put_file
    fs.put_file = lambda local_path, remote, **kw: (written.append(remote), put(local_path, remote))
    staging = export.staging_folder(fs, "/bucket/exports/pretrain")
    build(staging, export.pretrain_records(frame.lazy(), PROMPTS), embeddings, stats)
    export.publish(staging, fs, "/bucket/exports/pretrain")
    assert written[-1].endswith(export.MANIFEST)
    assert not fs.exists("/bucket/exports/pretrain/embeddings/embeddings-00009.safetensors")
    assert not staging.exists()
    assert export.checksums_match(export.ExportFolder(fs, "/bucket/exports/pretrain")).passed


def test_git_revision(monkeypatch):
    monkeypatch.setenv("UNICORN_GIT_REVISION", "abc123")
    assert export.git_revision() == "abc123"
    monkeypatch.delenv("UNICORN_GIT_REVISION")
    assert export.git_revision()  # a commit here, "unknown" outside a checkout


def test_load_example_prints_a_record_and_its_embedding(tmp_path: Path, source, capsys):
    frame, embeddings, stats = source
    build(tmp_path / "out", export.pretrain_records(frame.lazy(), PROMPTS), embeddings, stats)
    record_id = frame["caption_id"][7]
    load_example_main(str(tmp_path / "out"), record_id)
    out = capsys.readouterr().out
    assert f"record {record_id}:" in out and f"shape ({DIM},), dtype float32" in out
    assert "gpt: 'A photo number 7 of a red kite" in out


# --- issue 11: what real trainers load -------------------------------------------------------

def test_records_json_is_the_jsonl_as_one_array(tmp_path: Path, source):
    """LLaVA's and Unicorn's trainers json.load one array: records.jsonl fails with "Extra data",
    records.json holds the same records in the same order."""
    frame, embeddings, stats = source
    build(tmp_path / "out", export.pretrain_records(frame.lazy(), PROMPTS), embeddings, stats)
    with open(tmp_path / "out" / export.RECORDS) as handle, \
            pytest.raises(json.JSONDecodeError, match="Extra data"):
        json.load(handle)
    with open(tmp_path / "out" / export.RECORDS_ARRAY) as handle:
        array = json.load(handle)
    assert array == list(UnicornExport(tmp_path / "out").records()) and len(array) == 12
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    export.jsonl_to_array(empty, tmp_path / "empty.json")
    assert json.loads((tmp_path / "empty.json").read_text()) == []


def test_shift_norm_rebuilds_the_public_codes_unnormalised_vector(tmp_path: Path, source):
    frame, embeddings, stats = source
    build(tmp_path / "out", export.pretrain_records(frame.lazy(), PROMPTS), embeddings, stats,
          rows_per_file=5)
    # the fixture's unshifted caption embeddings u, made again from its seed
    vectors = np.random.default_rng(0).standard_normal((12, DIM)).astype(np.float32) + 0.5
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    u = dict(zip(frame["caption_id"], vectors))
    data = UnicornExport(tmp_path / "out")
    assert data.manifest["embedding"]["shift_norm_tensor"] == "shift_norm"
    for record in data.records():
        rebuilt = data.embedding(record) * data.shift_norm(record)
        np.testing.assert_allclose(rebuilt, u[record["caption_id"]] - stats.mu_text, atol=1e-6)
    # and u - mu_text over the exported rows averages to 0, as the public code's vectors do
    mean = np.mean([data.embedding(r) * data.shift_norm(r) for r in data.records()], axis=0)
    np.testing.assert_allclose(mean, 0, atol=1e-6)


def test_dataset_card_points_load_dataset_at_the_records(tmp_path: Path, source):
    """The card's YAML `configs` as the Hugging Face docs define them (config_name, data_files
    with split and path), naming records.jsonl, not index.parquet."""
    import yaml

    frame, embeddings, stats = source
    build(tmp_path / "out", export.pretrain_records(frame.lazy(), PROMPTS), embeddings, stats)
    text = (tmp_path / "out" / export.CARD).read_text()
    assert text.startswith("---\n")
    card = yaml.safe_load(text.split("---\n")[1])
    (config,) = card["configs"]
    assert config["config_name"] == "default"
    assert config["data_files"] == [{"split": "train", "path": export.RECORDS}]
    assert (tmp_path / "out" / config["data_files"][0]["path"]).is_file()


def test_load_dataset_loads_the_conversations(tmp_path: Path, source):
    """With the real `datasets` library (not a dependency of the project: skipped without it)."""
    import datasets  # a dev dependency: never skipped
    frame, embeddings, stats = source
    build(tmp_path / "out", export.pretrain_records(frame.lazy(), PROMPTS), embeddings, stats)
    loaded = datasets.load_dataset(str(tmp_path / "out"), split="train",
                                   cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == 12 and "conversations" in loaded.column_names
    assert loaded[0]["conversations"][1]["value"] == frame["caption"][0]


def reference_trainer_pairs(folder: Path, embeddings_file: Path | None = None) -> list:
    """What the Unicorn reference trainer (Yu-xm/Unicorn bunny/util/data_utils.py and
    bunny/model/bunny_arch.py) does with a data file and its embeddings, rewritten from its
    documented behaviour: json.load of the records (an array, read whole); a record without a `caption` key
    gives None; the embedding is the entry whose str(id) equals str(record id); the collator
    stacks torch.from_numpy(embed); get_image_feature copies the one vector into 576 tokens."""
    import pickle

    records = json.loads((folder / export.UNICORN_RECORDS).read_text())
    if embeddings_file is not None:  # the trainer's own path: pickles of [{"id", "embed"}]
        entries = pickle.loads(embeddings_file.read_bytes())
    else:  # our safetensors, keyed by the ids file
        from safetensors.numpy import load_file
        tensors = load_file(str(folder / export.UNICORN_EMBEDDINGS))
        ids = json.loads((folder / export.UNICORN_IDS).read_text())
        entries = [{"id": i, "embed": tensors["embeddings"][row]} for row, i in enumerate(ids)]
    by_id = {str(e["id"]): e["embed"] for e in entries}
    out = []
    for record in records:
        if "caption" not in record:
            out.append(None)
            continue
        embed = by_id[str(record["id"])]
        assert isinstance(embed, np.ndarray) and embed.dtype == np.float32 and embed.ndim == 1
        tokens = np.broadcast_to(embed[None, None, :], (1, 576, embed.shape[0]))  # expand(-1, 576, -1)
        out.append((record, embed, tokens.shape))
    return out


def instruction_frame(frame: pl.DataFrame) -> pl.LazyFrame:
    ids = frame["caption_id"].to_list()
    digest = dict(zip(frame["caption_id"], frame["caption_sha256"]))
    used = [ids[0], ids[0], ids[5]]
    return pl.LazyFrame({
        "id": ["i1", "i2", "i3"], "caption_id": used, "caption_sha256": [digest[c] for c in used],
        "task_type": ["multiple_choice", "question_answering", "multi_turn"],
        "conversations": [[{"from": "human", "value": "<image>\nQ?"},
                           {"from": "gpt", "value": "A"}]] * 3})


@pytest.mark.parametrize("kind", ["pretrain", "instruct"])
@pytest.mark.parametrize("formats", [("llava", "unicorn"), ("llava", "unicorn_pickle")])
def test_unicorn_format_loads_in_the_reference_trainer(tmp_path: Path, source, kind, formats,
                                                        caplog):
    frame, embeddings, stats = source
    records = (export.pretrain_records(frame.lazy(), PROMPTS) if kind == "pretrain"
               else export.instruct_records(instruction_frame(frame)))
    folder = tmp_path / "out"
    folder.mkdir()
    with caplog.at_level("WARNING"):
        written = export.write_export(folder, records, embeddings, stats, 5, formats=formats,
                                      captions=frame.lazy())
    assert "unicorn" in written.formats
    warned = any("pickle runs code" in r.getMessage() for r in caplog.records)
    assert warned == ("unicorn_pickle" in formats)
    assert (folder / export.UNICORN_PICKLE).exists() == ("unicorn_pickle" in formats)

    expected = dict(zip(*embeddings.collect().select("caption_id", "embedding").to_dict().values()))
    text = dict(zip(frame["caption_id"], frame["caption"]))
    paths = [None] + ([folder / export.UNICORN_PICKLE] if "unicorn_pickle" in formats else [])
    for pickled in paths:
        loaded = reference_trainer_pairs(folder, pickled)
        assert None not in loaded and len(loaded) == records.collect().height
        for record, embed, shape in loaded:
            assert record["id"] in text  # the caption id, in both stages
            assert record["caption"] == text[record["id"]]
            np.testing.assert_array_equal(embed, np.asarray(expected[record["id"]], np.float32))
            assert shape == (1, 576, DIM)
        record_ids = [r["record_id"] for r, _, _ in loaded]
        assert record_ids == records.collect()["id"].to_list()
    # the export's own reader gives the same pairs
    data = export_reader_with_manifest(folder, written, stats)
    pairs = list(data.unicorn_pairs())
    assert [r["record_id"] for r, _ in pairs] == records.collect()["id"].to_list()
    for record, vector in pairs:
        np.testing.assert_array_equal(vector, np.asarray(expected[record["id"]], np.float32))
    assert export.checksums_match(local(folder)).passed


def export_reader_with_manifest(folder: Path, written, stats) -> UnicornExport:
    manifest = export.manifest("test", written, stats, export.file_table(folder, written.embedding_files))
    (folder / export.MANIFEST).write_text(json.dumps(manifest))
    assert manifest["formats"] == list(written.formats)
    return UnicornExport(folder)


def test_a_record_without_caption_is_what_the_reference_trainer_drops(tmp_path: Path, source):
    """The loader above can fail: a record lacking `caption` comes back None (the trainer's
    collation then breaks), which is why every unicorn record carries it."""
    frame, embeddings, stats = source
    folder = tmp_path / "out"
    folder.mkdir()
    export.write_export(folder, export.pretrain_records(frame.lazy(), PROMPTS), embeddings, stats,
                        5, formats=["unicorn"], captions=frame.lazy())
    records = json.loads((folder / export.UNICORN_RECORDS).read_text())
    del records[0]["caption"]
    (folder / export.UNICORN_RECORDS).write_text(json.dumps(records))
    assert reference_trainer_pairs(folder)[0] is None


def test_unknown_format_and_missing_captions_are_refused(tmp_path: Path, source):
    frame, embeddings, stats = source
    records = export.pretrain_records(frame.lazy(), PROMPTS)
    with pytest.raises(ValueError, match="unknown export format"):
        export.write_export(tmp_path, records, embeddings, stats, 5, formats=["parquet"])
    with pytest.raises(ValueError, match="needs the captions"):
        export.write_export(tmp_path, records, embeddings, stats, 5, formats=["unicorn"])


def test_streamed_safetensors_and_pickle_equal_the_library_writers(tmp_path: Path):
    """The hand-streamed files read back with the libraries' own readers, row for row."""
    import pickle

    from safetensors.numpy import load_file

    rng = np.random.default_rng(3)
    chunks = [rng.standard_normal((n, DIM)).astype(np.float32) for n in (3, 4)]
    norms = [rng.random(n).astype(np.float32) for n in (3, 4)]
    export.write_safetensors_streamed(tmp_path / "e.safetensors", 7, DIM, lambda: iter(chunks),
                                      lambda: iter(norms))
    loaded = load_file(str(tmp_path / "e.safetensors"))
    np.testing.assert_array_equal(loaded["embeddings"], np.concatenate(chunks))
    np.testing.assert_array_equal(loaded["shift_norm"], np.concatenate(norms))
    ids = [f"c{i}" for i in range(7)]
    export.write_embedding_pickle(tmp_path / "e.pkl", ids, iter(chunks))
    items = pickle.loads((tmp_path / "e.pkl").read_bytes())
    assert [i["id"] for i in items] == ids
    np.testing.assert_array_equal(np.stack([i["embed"] for i in items]), np.concatenate(chunks))


@pytest.mark.parametrize("method", ["mean_shift", "mean_shift_to_image_mean", "realign", "none"])
def test_the_manifest_states_the_inference_transform_and_the_reader_applies_it(
        tmp_path: Path, source, method):
    frame, _, stats = source
    rng = np.random.default_rng(7)
    images = rng.standard_normal((9, DIM)) + 1.0
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    mu_image = images.mean(axis=0)
    image_summary = modality.EmbeddingSummary()
    image_summary.add(images)
    embedded = modality.caption_embeddings_frame(frame, np.eye(12, DIM, dtype=np.float32), "clip")
    text = modality.summarise(embedded)
    scale = modality.realign_scale(text.trace, image_summary.trace)
    stats = ModalityStatistics("clip", False, text.count, DIM, text.mean, shards=2,
                               image_count=9, mu_image=mu_image, image_source="imgs", method=method,
                               trace_text=text.trace, trace_image=image_summary.trace,
                               drift=modality.realign_drift(embedded, text.mean, mu_image, scale))
    build(tmp_path / "out", export.pretrain_records(frame.lazy(), PROMPTS),
          modality.transfer(embedded.lazy(), stats), stats)
    data = UnicornExport(tmp_path / "out")
    assert data.manifest["inference_transform"] == stats.inference_transform()
    np.testing.assert_array_equal(data.statistics()["mu_image"], mu_image)  # shipped either way
    e = images[0] * 3  # an image embedding before normalisation
    got = data.transform_image_embedding(e)
    if method == "mean_shift":  # the paper: l2norm(e - mu_image), the shipped mean by default
        want = images[0] - mu_image
        np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=1e-6)
        own = images[1:].mean(axis=0)  # or the mean over the user's own images
        want = images[0] - own
        np.testing.assert_allclose(data.transform_image_embedding(e, own),
                                   want / np.linalg.norm(want), atol=1e-6)
        batch = data.transform_image_embedding(images)  # rows at once
        centred = images - mu_image
        np.testing.assert_allclose(batch, centred / np.linalg.norm(centred, axis=1, keepdims=True),
                                   atol=1e-6)
        assert batch.dtype == np.float32
    else:
        np.testing.assert_allclose(got, images[0], atol=1e-6)


def test_transform_image_embedding_without_an_image_mean_names_the_fix(tmp_path: Path, source):
    frame, embeddings, stats = source
    build(tmp_path / "out", export.pretrain_records(frame.lazy(), PROMPTS), embeddings, stats)
    data = UnicornExport(tmp_path / "out")
    assert "mu_image" not in data.statistics()
    assert "your own images" in data.manifest["inference_transform"]["mu_image"]
    with pytest.raises(ValueError, match="pass mu_image"):
        data.transform_image_embedding(np.ones(DIM))
    own = np.full(DIM, 0.2)
    got = data.transform_image_embedding(np.ones(DIM), own)
    np.testing.assert_allclose(got, (np.ones(DIM) / np.sqrt(DIM) - own)
                               / np.linalg.norm(np.ones(DIM) / np.sqrt(DIM) - own), atol=1e-6)
