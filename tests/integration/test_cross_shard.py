"""Across shards: caption ids unique over the corpus though seed ids repeat per shard, exact
duplicate captions exported once (from the first shard), seed files of one stem refused together,
and the DuckDB catalog view re-created only when the written columns change. Real Dagster
instance, real Parquet, real DuckDB."""

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from dagster_project.automation import NightlySettings, with_nightly_conditions
from dagster_project.code_versions import recipe_version, with_recipe_versions
from dagster_project.definitions import ASSET_CHECKS, ASSETS
from dagster_project.jobs import unicorn_corpus_job, unicorn_shard_job
from tests.support import (
    coco_captions,
    make_resources,
    sensor_for,
    sensor_pipeline,
    tick,
    write_jsonl,
)
from unicorn_assets.caption_seeds import read_caption_seeds
from unicorn_assets.expansion import ExpansionConfig, expand_captions
from unicorn_assets.logic import exports as export
from unicorn_assets.logic.modality import ModalityStatistics
from unicorn_assets.logic.text import caption_sha256_series
from unicorn_assets.partitions import SEED_SHARDS, seed_shards
from unicorn_resources.export_reader import UnicornExport
from unicorn_resources.llm import FakeLLM
from unicorn_resources.storage import Catalog, ParquetIOManager


def failed_checks(result: dg.ExecuteInProcessResult) -> list[str]:
    return sorted(f"{e.asset_check_evaluation_data.asset_check_key.asset_key.to_user_string()}:"
                  f"{e.asset_check_evaluation_data.asset_check_key.name}"
                  for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
                  and not e.asset_check_evaluation_data.passed)


def materialization(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    return next(e.materialization.metadata for e in result.get_asset_materialization_events()
                if e.materialization.asset_key == dg.AssetKey(asset))


# ---------------------------------------------------------------- 1 + 2: ids and duplicates


def test_shards_numbered_alike_export_every_caption_once(tmp_path: Path, instance):
    """Both shards number their seeds 1..3, and seed 1 is the same line in both: caption ids stay
    unique over the corpus, the export keeps shard-a's copy of the repeated captions only, and
    the repeated request is answered from the LLM cache."""
    caps = [c["caption"] for c in coco_captions(5)]
    seeds, data = tmp_path / "seeds", tmp_path / "data"
    write_jsonl(seeds / "shard-a.jsonl", [{"id": i + 1, "caption": caps[i]} for i in range(3)])
    write_jsonl(seeds / "shard-b.jsonl", [{"id": 1, "caption": caps[0]},
                                          {"id": 2, "caption": caps[3]},
                                          {"id": 3, "caption": caps[4]}])
    defs = dg.Definitions(assets=ASSETS, asset_checks=ASSET_CHECKS,
                          jobs=[unicorn_shard_job, unicorn_corpus_job],
                          resources=make_resources(data, seeds, llm=FakeLLM()))
    shard_job = defs.resolve_job_def("unicorn_shard_job")
    instance.add_dynamic_partitions(SEED_SHARDS, ["shard-b", "shard-a"])
    runs = {key: shard_job.execute_in_process(instance=instance, partition_key=key,
                                              raise_on_error=False)
            for key in ("shard-b", "shard-a")}  # the order of runs does not pick the survivor
    for result in runs.values():
        assert result.success and not failed_checks(result), failed_checks(result)

    seed_ids = pl.read_parquet(data / "caption_seeds" / "*.parquet").group_by("shard").agg(
        pl.col("seed_id").sort()).sort("shard")
    assert seed_ids["seed_id"].to_list() == [["1", "2", "3"]] * 2  # the user's ids, kept
    captions = pl.read_parquet(data / "expanded_captions" / "*.parquet")
    assert captions["caption_id"].n_unique() == captions.height
    per_seed = ExpansionConfig().expansions_per_seed
    # shard-a ran second: its requests for seed 1 were shard-b's, so the cache answered them
    assert materialization(runs["shard-a"], "expanded_captions")["cache_hits"].value == per_seed

    in_a = set(captions.filter(pl.col("shard") == "shard-a")["caption"])
    repeated = captions.filter((pl.col("shard") == "shard-b") & pl.col("caption").is_in(in_a))
    assert repeated.height > 0 and set(repeated["seed_id"]) == {"1"}

    corpus = defs.resolve_job_def("unicorn_corpus_job").execute_in_process(
        instance=instance, raise_on_error=False, run_config={"ops": {
            "pretrain_dataset": {"config": {"formats": ["llava", "unicorn"]}},
            "instruct_dataset": {"config": {"formats": ["llava", "unicorn_pickle"]}}}})
    assert corpus.success and not failed_checks(corpus), failed_checks(corpus)
    pretrain = UnicornExport(data / "exports" / "unicorn_pretrain")
    records = list(pretrain.records())
    assert pretrain.manifest["counts"]["duplicates_dropped"] == repeated.height
    assert len(records) == captions.height - repeated.height
    assert not {r["caption_id"] for r in records} & set(repeated["caption_id"])
    texts = [r["conversations"][1]["value"] for r in records]
    assert sorted(texts) == sorted(set(captions["caption"]))  # every text, once
    assert materialization(corpus, "pretrain_dataset")["duplicates_dropped"].value \
        == repeated.height

    # mu_text is the mean over the exported captions: each repeated text counted once
    stats = ModalityStatistics.from_frame(pl.read_parquet(data / "modality_statistics.parquet"))
    assert (stats.count, stats.duplicates) == (len(records), repeated.height)
    embedded = pl.read_parquet(data / "caption_embeddings" / "*.parquet").filter(
        ~pl.col("caption_id").is_in(repeated["caption_id"].implode()))
    np.testing.assert_allclose(stats.mu_text, embedded["embedding"].to_numpy().mean(axis=0),
                               atol=1e-6)
    # the unicorn format: ids are caption ids in both exports, every record has its caption
    by_caption = dict(zip(captions["caption_id"], captions["caption"]))
    for folder in (pretrain, UnicornExport(data / "exports" / "unicorn_instruct")):
        pairs = list(folder.unicorn_pairs())
        assert len(pairs) == folder.manifest["counts"]["records"]
        assert all(by_caption[r["id"]] == r["caption"] for r, _ in pairs)
    assert (data / "exports" / "unicorn_instruct" / export.UNICORN_PICKLE).is_file()
    assert not (data / "exports" / "unicorn_pretrain" / export.UNICORN_PICKLE).exists()
    assert any("pickle runs code" in e.user_message and e.step_key == "instruct_dataset"
               for e in instance.all_logs(corpus.run_id))  # the opt-in warns in the run log

    instructions = pl.read_parquet(data / "instructions" / "*.parquet")
    of_repeated = instructions.filter(pl.col("caption_id").is_in(repeated["caption_id"].implode()))
    instruct = UnicornExport(data / "exports" / "unicorn_instruct")
    assert instruct.manifest["counts"]["duplicates_dropped"] == of_repeated.height
    assert instruct.manifest["counts"]["records"] == instructions.height - of_repeated.height
    assert sum(instruct.manifest["task_types"].values()) == instruct.manifest["counts"]["records"]
    assert materialization(corpus, "instruct_dataset")["duplicates_dropped"].value \
        == of_repeated.height

    # a re-run of a shard makes the same ids and asks the LLM nothing new
    again = shard_job.execute_in_process(instance=instance, partition_key="shard-b")
    meta = materialization(again, "expanded_captions")
    assert meta["cache_hits"].value == meta["llm_requests"].value > 0
    rerun = pl.read_parquet(data / "expanded_captions" / "shard-b.parquet")
    assert rerun["caption_id"].to_list() == captions.filter(
        pl.col("shard") == "shard-b")["caption_id"].to_list()


def test_shards_made_before_shard_qualified_ids_are_regenerated_from_the_cache(
        instance, seed_dir, tmp_path):
    """Stage 1's code version names the id scheme: the nightly run regenerates a shard made
    before it, and the LLM cache answers every request, as they did not change."""
    data = tmp_path / "data"
    resources = make_resources(data, seed_dir, llm=FakeLLM())
    instance.add_dynamic_partitions(SEED_SHARDS, ["shard-a"])
    recipe_only = recipe_version(expand_captions, resources)  # no declared version, as before
    before = [*with_recipe_versions([read_caption_seeds], resources), *dg.map_asset_specs(
        lambda spec: spec.replace_attributes(code_version=recipe_only), [expand_captions])]
    assert dg.materialize(before, instance=instance, partition_key="shard-a",
                          resources=resources).success

    # The nightly automation watched the code before (it records each code version it sees),
    # then sees the new version and regenerates at the next tick.
    nightly = NightlySettings(cron="0 * * * *", selection="*")
    first = dg.evaluate_automation_conditions(
        defs=dg.Definitions(assets=with_nightly_conditions(before, nightly), resources=resources),
        instance=instance, evaluation_time=datetime.now(UTC))
    after = with_recipe_versions([read_caption_seeds, expand_captions], resources)
    after_tick = datetime.now(UTC).replace(minute=0) + timedelta(hours=1, minutes=1)
    requested = dg.evaluate_automation_conditions(
        defs=dg.Definitions(assets=with_nightly_conditions(after, nightly), resources=resources),
        instance=instance, cursor=first.cursor, evaluation_time=after_tick)
    stage1 = [dg.AssetKey("expanded_captions"), dg.AssetKey("expanded_caption_rejects")]
    assert requested.total_requested == 2
    assert all(requested.get_requested_partitions(key) == {"shard-a"} for key in stage1)
    result = dg.materialize(after, instance=instance, partition_key="shard-a",
                            resources=resources, selection=stage1)
    meta = materialization(result, "expanded_captions")
    assert meta["cache_hits"].value == meta["llm_requests"].value > 0


def frame(rows: list[tuple[str, str, str]]) -> pl.LazyFrame:
    captions = pl.DataFrame(rows, schema=["caption_id", "shard", "caption"], orient="row")
    return captions.with_columns(caption_sha256_series(captions["caption"])).lazy()


def test_the_first_shard_in_key_order_keeps_a_repeated_caption(tmp_path: Path):
    rows = [("c1", "s-c", "A dog."), ("c2", "s-a", "A cat."), ("c3", "s-b", "A dog."),
            ("c4", "s-c", "A cat."), ("c5", "s-b", "A bird."), ("c6", "s-a", "a dog.")]
    for i, part in enumerate((rows[:3], rows[3:])):  # read from Parquet, as the export does
        frame(part).collect().write_parquet(tmp_path / f"{i}.parquet")
    captions = pl.scan_parquet(tmp_path / "*.parquet")
    assert sorted(export.duplicate_caption_ids(captions)) == ["c1", "c4"]
    shuffled = frame(rows[::-1])
    assert sorted(export.duplicate_caption_ids(shuffled)) == ["c1", "c4"]  # order-independent

    records = export.pretrain_records(captions, ["Describe it."])
    kept, dropped = export.drop_duplicate_captions(records, captions)
    assert dropped == 2
    assert sorted(kept.collect()["caption_id"]) == ["c2", "c3", "c5", "c6"]  # case matters


def test_no_repeated_caption_leaves_the_records_as_they_are():
    captions = frame([("c1", "s-a", "A dog."), ("c2", "s-b", "A cat.")])
    records = export.pretrain_records(captions, ["Describe it."])
    kept, dropped = export.drop_duplicate_captions(records, captions)
    assert dropped == 0 and kept.collect().equals(records.collect())
    empty = frame([]).with_columns(pl.all().cast(pl.String))
    assert export.duplicate_caption_ids(empty).is_empty()


def test_a_repeat_within_one_shard_keeps_the_lowest_caption_id():
    captions = frame([("c9", "s-a", "A dog."), ("c2", "s-a", "A dog."), ("c5", "s-b", "A dog.")])
    assert sorted(export.duplicate_caption_ids(captions)) == ["c5", "c9"]


# ---------------------------------------------------------------- 3: seed files of one stem


def test_a_same_stem_file_holds_its_shard_and_loses_nothing(instance, seed_dir, tmp_path, capfd):
    data = tmp_path / "data"
    sensor, resources = sensor_for(), make_resources(data, seed_dir)
    first = tick(sensor, instance, resources, None)
    job = sensor_pipeline(resources).resolve_job_def("unicorn_shard_job")
    assert job.execute_in_process(instance=instance, partition_key="shard-a").success
    written = (data / "caption_seeds" / "shard-a.parquet").read_bytes()

    write_jsonl(seed_dir / "shard-a.csv", coco_captions(2, offset=40))  # a same-stem newcomer
    clash = tick(sensor, instance, resources, first.cursor)
    assert clash.run_requests == [] and not clash.dynamic_partitions_requests
    (problem,) = json.loads(clash.cursor)["problems"]
    assert problem.startswith(f"{seed_dir / 'shard-a.csv'} and {seed_dir / 'shard-a.jsonl'}: ")
    assert "none of them is read" in problem and "Rename all but one" in problem
    assert "shard-a.jsonl -> shard-a-jsonl.jsonl" in problem
    assert json.loads(clash.cursor)["files"]["shard-a"] == json.loads(first.cursor)["files"][
        "shard-a"]  # remembered, so resolving the clash reruns nothing unchanged
    err = capfd.readouterr().err
    assert "would all be shard 'shard-a'" in err and "seed file(s) gone" not in err

    # the partition and its data stay; a run of it fails with the clash, writing nothing
    assert "shard-a" in instance.get_dynamic_partitions(SEED_SHARDS)
    held = job.execute_in_process(instance=instance, partition_key="shard-a", raise_on_error=False)
    assert not held.success
    error = held.get_step_failure_events()[0].step_failure_data.error.to_string()
    assert "would all be shard 'shard-a'" in error
    assert (data / "caption_seeds" / "shard-a.parquet").read_bytes() == written

    (seed_dir / "shard-a.csv").rename(seed_dir / "shard-a-csv.csv")  # the fix
    fixed = tick(sensor, instance, resources, clash.cursor)
    assert [r.partition_key for r in fixed.run_requests] == ["shard-a-csv"]
    assert fixed.asset_events[0].metadata["invalid_seed_file_count"].value == 0


def test_register_refuses_both_files_and_keeps_the_registered_shard(tmp_path: Path):
    seeds, home = tmp_path / "seeds", tmp_path / "home"
    write_jsonl(seeds / "coco-a.jsonl", coco_captions(2))
    home.mkdir()
    env = {**os.environ, "UNICORN_SEEDS": str(seeds), "UNICORN_DATA_DIR": str(tmp_path / "out"),
           "DAGSTER_HOME": str(home), "UNICORN_LLM_BACKEND": "fake", "UNICORN_PROFILE": "local"}
    unicorn = [str(Path(sys.executable).parent / "unicorn"), "register"]
    first = subprocess.run(unicorn, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "1 shard(s) registered: coco-a" in first.stdout, first.stderr

    (seeds / "coco-a.csv").write_text("caption\nA red bus.\n")
    write_jsonl(seeds / "coco-b.jsonl", coco_captions(2, offset=2))
    second = subprocess.run(unicorn, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "1 shard(s) registered: coco-b" in second.stdout
    assert f"{seeds / 'coco-a.csv'} and {seeds / 'coco-a.jsonl'}" in second.stderr
    assert "Rename all but one" in second.stderr
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert sorted(instance.get_dynamic_partitions(SEED_SHARDS)) == ["coco-a", "coco-b"]


# ---------------------------------------------------------------- 4: the catalog refresh

COLUMNS: list[str] = []


@dg.asset(partitions_def=seed_shards)
def rows_by_shard(context: dg.AssetExecutionContext) -> dict[str, pl.DataFrame]:
    return {key: pl.DataFrame({c: [f"{key}-{c}"] for c in ["shard", *COLUMNS]})
            for key in context.partition_keys}


def view_sql(catalog: Path) -> str:
    with Catalog(str(catalog)).connect() as con:
        return con.execute("select sql from duckdb_views() where view_name = 'rows_by_shard'"
                           ).fetchone()[0]


def test_the_view_is_recreated_only_when_the_columns_change(tmp_path: Path, instance):
    data, catalog = tmp_path / "data", tmp_path / "data" / "catalog.duckdb"
    instance.add_dynamic_partitions(SEED_SHARDS, ["a", "b", "c", "d"])

    def write(key: str, *columns: str) -> None:
        COLUMNS[:] = columns
        assert dg.materialize([rows_by_shard], instance=instance, partition_key=key, resources={
            "io_manager": ParquetIOManager(base_uri=str(data))}).success

    write("a", "caption")
    glob = "rows_by_shard/*.parquet"  # the views name their files relative to the catalog
    # mark the view: a re-create would turn it back into `select *`
    with Catalog(str(catalog)).connect(read_only=False) as con:
        con.execute("create or replace view rows_by_shard as select caption, shard from "
                    f"read_parquet('{glob}', union_by_name = true)")
    write("b", "caption")  # same columns: the view is left alone, and still sees the new file
    assert "select caption, shard" in view_sql(catalog).lower()
    with Catalog(str(catalog)).connect() as con:
        assert con.execute("select shard from rows_by_shard order by 1").fetchall() == [
            ("a-shard",), ("b-shard",)]

    write("c", "caption", "style")  # a new column: re-created over every file
    assert "select *" in view_sql(catalog).lower()
    with Catalog(str(catalog)).connect() as con:
        assert con.execute("select shard, style from rows_by_shard order by 1").fetchall() == [
            ("a-shard", None), ("b-shard", None), ("c-shard", "c-style")]

    with Catalog(str(catalog)).connect(read_only=False) as con:
        con.execute("create or replace view rows_by_shard as select caption, shard, style from "
                    f"read_parquet('{glob}', union_by_name = true)")
    write("d", "style")  # a column fewer is other columns too
    assert "select *" in view_sql(catalog).lower()

    with Catalog(str(catalog)).connect(read_only=False) as con:
        con.execute("create or replace view rows_by_shard as select caption, shard, style from "
                    f"read_parquet('{glob}', union_by_name = true)")
    assert ParquetIOManager(base_uri=str(data)).rebuild_catalog() == ["rows_by_shard"]
    assert "select *" in view_sql(catalog).lower()  # `unicorn catalog` re-creates every view


def test_refresh_view_reports_what_it_did(tmp_path: Path):
    folder = tmp_path / "asset"
    folder.mkdir()
    pl.DataFrame({"x": [1]}).write_parquet(folder / "s1.parquet")
    catalog, glob = Catalog(str(tmp_path / "catalog.duckdb")), f"{folder}/*.parquet"
    assert catalog.refresh_view("asset", glob, ["x"])  # no catalog file yet
    assert not catalog.refresh_view("asset", glob, ["x"])
    pl.DataFrame({"x": [2]}).write_parquet(folder / "s2.parquet")
    assert not catalog.refresh_view("asset", glob, ["x"])  # a new file needs no refresh
    assert catalog.refresh_view("asset", glob, ["x", "y"])
    assert catalog.refresh_view("other", glob, ["x"])  # a view not there yet
    (tmp_path / "moved").mkdir()
    pl.DataFrame({"x": [3]}).write_parquet(tmp_path / "moved" / "s1.parquet")
    assert catalog.refresh_view("asset", f"{tmp_path}/moved/*.parquet", ["x"])  # another glob
    assert catalog.refresh_view("asset", glob)  # no columns given: always
