"""Seeds + Stage 1 materialised in-process for two shards on a real, on-disk DagsterInstance:
Parquet outputs, lineage columns, check results and materialisation metadata. The fast variant
uses FakeLLM; the slow one the real offline SmolLM2 model at a small token budget."""

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from dagster_project.profiles import load_profile
from tests.support import make_resources
from unicorn_assets.caption_seeds import read_caption_seeds, read_shard, seed_checks
from unicorn_assets.expansion import (
    UNTRAINED_NOTE,
    ExpansionConfig,
    expand_captions,
    stage1_checks,
)
from unicorn_assets.logic import figures
from unicorn_assets.partitions import SEED_SHARDS
from unicorn_resources.llm import Completion, FakeLLM, LlamaCppLLM
from unicorn_resources.seed_source import SeedSource
from unicorn_resources.storage import Catalog

ASSETS = [read_caption_seeds, expand_captions]
OUTPUTS = ("caption_seeds", "caption_seed_rejects", "expanded_captions",
           "expanded_caption_rejects")
KEYS = ["shard-a", "shard-b"]


def run(instance, resources, keys: list[str], **config) -> dg.ExecuteInProcessResult:
    """One run over `keys` (a single shard, or a backfill-style range of several)."""
    new = [k for k in keys if not instance.has_dynamic_partition(SEED_SHARDS, k)]
    instance.add_dynamic_partitions(SEED_SHARDS, new)
    tags = {"dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1]}
    return dg.materialize(ASSETS, instance=instance, resources=resources, tags=tags,
                          run_config={"ops": {"expand_captions": {"config": config}}})


def stage1_metadata(instance, key: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("expanded_captions"), asset_partitions=[key]),
        limit=1).records
    assert records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def assert_outputs_and_lineage(data: Path, seed_dir: Path, model_id: str, run_config: dict
                               ) -> None:
    config = ExpansionConfig(**run_config).model_dump()
    for key in KEYS:
        for asset in OUTPUTS:
            assert (data / asset / f"{key}.parquet").is_file(), (asset, key)
        seeds = pl.read_parquet(data / "caption_seeds" / f"{key}.parquet")
        assert seeds.equals(read_shard(SeedSource(location=str(seed_dir)), key).seeds)
        captions = pl.read_parquet(data / "expanded_captions" / f"{key}.parquet")
        rejects = pl.read_parquet(data / "expanded_caption_rejects" / f"{key}.parquet")
        every = pl.concat([captions, rejects.drop("reason")])
        # K expansions per seed, each kept or rejected with a reason: nothing vanishes
        assert every.height == seeds.height * config["expansions_per_seed"]
        assert set(every["seed_id"]) == set(seeds["seed_id"])
        assert (every["shard"] == key).all()
        lineage = every.join(seeds.select("seed_id", pl.col("caption").alias("seed")), on="seed_id")
        assert (lineage["seed_caption"] == lineage["seed"]).all()
        assert (every["model_id"] == model_id).all()
        assert (every["prompt_version"] == f"stage1_expand/{config['prompt_version']}").all()
        assert set(every["style"]) <= set(config["styles"] or ["main_subject"])
        assert every["prompt_digest"].n_unique() == 1
        sampling = json.loads(every["sampling"][0])
        assert sampling["max_tokens"] == config["max_tokens"]
        assert every["sampling_seed"].n_unique() == every.height
        assert (every["prompt_tokens"] > 0).all()
        assert every["completion_tokens"].is_between(1, config["max_tokens"]).all()
        assert rejects["reason"].is_not_null().all()


def assert_metadata(meta: dict, expected_rows: int, prompt_version: str = "v2") -> None:
    assert meta["dagster/row_count"] == expected_rows
    assert meta["sample"].startswith("| caption_id ") or expected_rows == 0
    # every figure a number the UI plots: rejects by reason, lengths, diversity, coverage
    for reason in ("too_short", "boilerplate", "near_duplicate"):
        assert isinstance(meta[f"rejects_{reason}"], int)
    for figure in ("words_mean", "words_median", "words_p5", "words_p95", "distinct_1",
                   "distinct_2", "type_token_ratio", "seed_coverage", "length_finish_share",
                   "reject_rate"):
        assert isinstance(meta[figure], float), figure
    assert meta["captions_n"] == expected_rows
    assert meta["words_histogram"].startswith("![caption length in words](data:image/png;base64,")
    assert meta["tokens_generated"] > 0 and meta["tokens_per_second"] > 0
    assert meta["prompt_version"] == f"stage1_expand/{prompt_version}"


def check_results(result) -> dict[tuple[str, str], bool]:
    return {(e.asset_key.to_user_string(), e.asset_check_key.name): e.passed
            for e in result.get_asset_check_evaluations()}


@pytest.mark.parametrize("config", [
    {},  # the paper's: one main-subject expansion per seed
    {"expansions_per_seed": 2, "styles": ["objects", "spatial", "lighting"], "max_tokens": 96},
], ids=["main_subject", "style_focuses"])
def test_seeds_and_stage1_with_the_fake_llm(tmp_path: Path, seed_dir: Path, instance, fake_llm,
                                           config):
    data = tmp_path / "data"
    resources = make_resources(data, seed_dir, llm=fake_llm)
    for key in KEYS:  # one run per shard, as `unicorn materialize` does
        result = run(instance, resources, [key], **config)
        assert result.success
        checks = check_results(result)
        assert len(checks) == len(seed_checks) + len(stage1_checks)
        assert all(checks.values()), checks
    assert_outputs_and_lineage(data, seed_dir, "fake:deterministic", config)

    meta = stage1_metadata(instance, "shard-b")
    kept = pl.read_parquet(data / "expanded_captions" / "shard-b.parquet")
    assert_metadata(meta, kept.height)
    assert meta["model_note"] == UNTRAINED_NOTE
    # the shard's own figures, as computed again from its stored files
    stored = figures.caption_figures(
        kept, pl.read_parquet(data / "expanded_caption_rejects" / "shard-b.parquet"))
    for name in ("words_mean", "distinct_2", "type_token_ratio", "seed_coverage", "reject_rate"):
        assert meta[name] == pytest.approx(stored[name]), name
    seeds_meta = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("caption_seeds"), asset_partitions=["shard-a"]),
        limit=1).records[0].asset_materialization.metadata
    assert seeds_meta["dagster/row_count"].value == 4 and seeds_meta["lines_read"].value == 4
    assert seeds_meta["sample"].value.startswith("| seed_id ")

    # the catalog answers without Dagster
    with Catalog(str(data / "catalog.duckdb")).connect() as con:
        total = con.execute("select count(*), count(distinct shard) from expanded_captions")
        assert total.fetchone() == (sum(pl.read_parquet(data / "expanded_captions" /
                                                        f"{k}.parquet").height for k in KEYS), 2)

    # a backfill-style run over both shards replaces their partitions, never duplicates them
    before = {k: pl.read_parquet(data / "expanded_captions" / f"{k}.parquet") for k in KEYS}
    again = run(instance, resources, KEYS, **config)
    assert again.success
    for key in KEYS:
        assert pl.read_parquet(data / "expanded_captions" / f"{key}.parquet").equals(before[key])
    assert len(list((data / "expanded_captions").glob("*.parquet"))) == 2


class CutOffLLM(FakeLLM):
    """FakeLLM whose every completion stopped at the token budget (finish_reason "length")."""

    def _generate(self, requests, params):
        return [Completion(c.text, c.prompt_tokens, c.completion_tokens, "length")
                for c in super()._generate(requests, params)]


def test_length_finish_check_reads_the_stored_finish_reasons(tmp_path: Path, seed_dir: Path,
                                                            instance):
    """Expansions cut at max_tokens are kept (trimmed to their last sentence) or rejected, and
    the non-blocking length_finish_rate check counts them from the stored finish_reason column;
    the asset is still written."""
    data = tmp_path / "data"
    resources = make_resources(data, seed_dir, llm=CutOffLLM())
    result = run(instance, resources, [KEYS[0]])
    assert result.success  # non-blocking
    checks = check_results(result)
    assert checks[("expanded_captions", "length_finish_rate")] is False
    assert all(v for k, v in checks.items() if k[1] != "length_finish_rate"), checks
    stored = pl.concat([pl.read_parquet(data / "expanded_captions" / f"{KEYS[0]}.parquet"),
                        pl.read_parquet(data / "expanded_caption_rejects" / f"{KEYS[0]}.parquet")
                        .drop("reason")])
    assert stored.height > 0 and (stored["finish_reason"] == "length").all()
    (evaluation,) = [e for e in result.get_asset_check_evaluations()
                     if e.asset_check_key.name == "length_finish_rate"]
    assert evaluation.metadata["generated"].value == stored.height
    assert evaluation.metadata["length_finish_rate"].value == 1.0
    # the same model with stop reasons passes it
    again = run(instance, make_resources(tmp_path / "d2", seed_dir, llm=FakeLLM()), [KEYS[0]])
    assert check_results(again)[("expanded_captions", "length_finish_rate")] is True


def test_seeds_that_fail_their_gate_stop_stage1(tmp_path: Path, seed_dir: Path, instance, fake_llm):
    """Seeds that fail the seed gates (here: none left) fail their shard, and Stage 1 does not
    run on them, in this run or any later one: they are not recorded as materialised."""
    data = tmp_path / "data"
    resources = make_resources(data, seed_dir, llm=fake_llm, seeds={"caption_column": "nope",
                                                                   "label_column": "nope2"})
    instance.add_dynamic_partitions(SEED_SHARDS, KEYS)
    result = dg.materialize(ASSETS, instance=instance, resources=resources, partition_key=KEYS[0],
                            raise_on_error=False)
    assert not result.success
    (failure,) = result.get_step_failure_events()
    assert failure.step_key == "read_caption_seeds"
    assert f"{KEYS[0]}.jsonl: no seed is left of 4 line(s) (rejects: missing_caption 4)" in \
        failure.step_failure_data.error.message
    assert not (data / "expanded_captions").exists()
    assert not instance.get_materialized_partitions(dg.AssetKey("caption_seeds"))
    assert instance.get_materialized_partitions(dg.AssetKey("caption_seed_rejects")) == {KEYS[0]}


@pytest.mark.slow
def test_seeds_and_stage1_with_the_real_offline_model(tmp_path: Path, seed_dir: Path, instance):
    folder = tmp_path / "three"
    for key in KEYS:  # 3 seeds per shard keeps the real model under a minute on 2 cores
        lines = (seed_dir / f"{key}.jsonl").read_text().splitlines()[:3]
        (folder / f"{key}.jsonl").parent.mkdir(exist_ok=True)
        (folder / f"{key}.jsonl").write_text("\n".join(lines) + "\n")
    data = tmp_path / "data"
    llm = LlamaCppLLM(n_ctx=1024, n_threads=2)
    gates = load_profile("local")["quality_gates"]  # the defaults the offline model must meet
    resources = make_resources(data, folder, llm=llm, quality_gates=gates)
    config = {"expansions_per_seed": 1, "max_tokens": 96}
    results = {key: run(instance, resources, [key], **config) for key in KEYS}

    assert_outputs_and_lineage(data, folder, llm.model_id, config)
    for key, result in results.items():
        checks = check_results(result)
        assert len(checks) == len(seed_checks) + len(stage1_checks)
        kept = pl.read_parquet(data / "expanded_captions" / f"{key}.parquet")
        meta = stage1_metadata(instance, key)
        assert_metadata(meta, kept.height)
        assert "model_note" not in meta  # a trained model, however small
        assert meta["llm_requests"] == 3
        # the default gates hold for the offline model
        assert result.success and all(checks.values()), {k: v for k, v in checks.items() if not v}
