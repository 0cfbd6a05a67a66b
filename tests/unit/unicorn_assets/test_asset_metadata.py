"""What Dagster users expect on every asset: owners, a stage tag, kinds, a code version, and on the
main tables a description for every column."""

import dagster as dg
import pytest

from dagster_project.definitions import ASSETS
from unicorn_assets.logic.caption_seeds import SEED_SCHEMA
from unicorn_assets.logic.expansion import CAPTION_SCHEMA
from unicorn_assets.logic.instructions import INSTRUCTION_SCHEMA
from unicorn_assets.logic.modality import (
    CAPTION_EMBEDDING_SCHEMA,
    EMBEDDING,
    TRANSFERRED_SCHEMA,
)
from unicorn_assets.metadata import described_columns
from unicorn_assets.synthvlm import synthvlm_assets

SPECS = {spec.key.to_user_string(): spec
         for asset in [*ASSETS, *synthvlm_assets] for spec in asset.specs}
MAIN_TABLES = {
    "caption_seeds": SEED_SCHEMA.names(),
    "expanded_captions": CAPTION_SCHEMA.names(),
    "instructions": INSTRUCTION_SCHEMA.names(),
    "caption_embeddings": [*CAPTION_EMBEDDING_SCHEMA.names(), EMBEDDING],
    "transferred_embeddings": [*TRANSFERRED_SCHEMA.names(), EMBEDDING],
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_asset_has_owners_tags_kinds_and_a_code_version(name):
    spec = SPECS[name]
    assert spec.owners == ["team:vlm-data"]
    assert spec.tags.get("stage") in {"seeds", "1", "2", "3", "export", "report", "synthvlm"}
    assert spec.kinds  # e.g. {"polars", "parquet"}
    assert spec.code_version


def test_every_stage_is_tagged():
    stages = {name: spec.tags["stage"] for name, spec in SPECS.items()}
    assert stages["caption_seeds"] == "seeds" and stages["expanded_captions"] == "1"
    assert stages["instructions"] == "2" and stages["caption_embeddings"] == "3"
    assert stages["pretrain_dataset"] == "export" and stages["synthetic_images"] == "synthvlm"


@pytest.mark.parametrize("name", sorted(MAIN_TABLES))
def test_main_tables_describe_every_column(name):
    schema = SPECS[name].metadata["dagster/column_schema"]
    assert isinstance(schema, dg.TableSchema)
    assert [c.name for c in schema.columns] == MAIN_TABLES[name]
    assert all(c.description and c.type for c in schema.columns)


def test_a_column_without_a_description_is_refused():
    with pytest.raises(ValueError, match=r"columns without a description: \['b'\]"):
        described_columns({"a": "String", "b": "Int64"}, {"a": "the a"})


def test_figures_become_numbers_the_ui_plots_and_structure_stays_json():
    from unicorn_assets.checks import to_result
    from unicorn_assets.logic.quality import Outcome
    from unicorn_assets.metadata import as_metadata

    meta = as_metadata({"rows": 3, "rate": 0.5, "flag": True, "note": "text",
                        "rejects": {"too_short": 2, "empty": 0},
                        "nested": {"a": {"observed": 0.1}},
                        "failing_ids": ["x", "y"], "by_shard": {"s": {"passed": True,
                                                                      "description": "ok"}},
                        "kept": dg.MetadataValue.md("**as is**")})
    assert meta["rows"] == dg.MetadataValue.int(3) and meta["rate"] == dg.MetadataValue.float(0.5)
    assert meta["flag"] == dg.MetadataValue.bool(True) and meta["note"] == "text"
    assert meta["rejects_too_short"] == dg.MetadataValue.int(2)
    assert meta["rejects_empty"] == dg.MetadataValue.int(0) and "rejects" not in meta
    assert meta["nested_a_observed"] == dg.MetadataValue.float(0.1)
    assert meta["failing_ids"] == dg.MetadataValue.json(["x", "y"])
    assert isinstance(meta["by_shard"], dg.JsonMetadataValue)  # text inside: structured
    assert meta["kept"] == dg.MetadataValue.md("**as is**")
    result = to_result(Outcome(True, "ok", {"by_reason": {"empty": 1}, "rate": 0.25}),
                       asset_key="a", check_name="c")
    assert result.metadata["by_reason_empty"] == dg.MetadataValue.int(1)
    assert result.metadata["rate"] == dg.MetadataValue.float(0.25)
