"""Where the seed shards live: a local folder or an s3:// prefix; one seed file is one shard."""

from __future__ import annotations

import hashlib
from importlib.resources import files
from typing import Any, Literal

import dagster as dg

from unicorn_assets.logic.prompts import load_lines
from unicorn_assets.logic.caption_seeds import (
    SeedError,
    SeedReadOptions,
    SeedReadResult,
    claim_keys,
    discover_shards,
    read_seed_bytes,
    same_key_problem,
)
from unicorn_resources.storage import S3Options, read_bytes

BUNDLED_SEEDS = str(files("unicorn_assets") / "seeds")


class SeedSource(dg.ConfigurableResource):
    """The seed location and how its files are read. `location` defaults to the bundled COCO seeds."""

    location: str = BUNDLED_SEEDS
    s3: S3Options = S3Options()
    caption_column: str = "caption"
    label_column: str = "label"
    id_column: str = "id"
    max_line_bytes: int = 64 * 1024
    on_bad_line: Literal["skip", "fail"] = "skip"
    label_templates: str = "seed_labels/v1.txt"
    templates_per_label: int = 10

    def list_entries(self) -> list[dict[str, Any]]:
        """fsspec details (name, size, mtime or ETag) of the files at the location, listed afresh:
        s3fs would otherwise answer from its listing cache and miss files added since."""
        fs, root = self.s3.fs(self.location)
        fs.invalidate_cache(root)
        if not fs.isdir(root):
            raise SeedError(f"seed location {self.location} is not a folder or prefix; point "
                            "UNICORN_SEEDS (or the seeds resource's location) at one")
        return [e for e in fs.ls(root, detail=True) if e["type"] == "file"]

    def list_files(self) -> list[str]:
        return [e["name"] for e in self.list_entries()]

    def fingerprint(self, entry: dict[str, Any], previous: dict[str, str] | None = None
                    ) -> dict[str, str]:
        """{"stat", "hash"} of a listed file. The hash identifies the content: the object store's
        ETag on S3, else the SHA-256 of the bytes, recomputed only when size or mtime changed."""
        etag = entry.get("ETag") or entry.get("etag")
        stat = f"etag:{etag.strip(chr(34))}" if etag else f"{entry['size']}:{entry.get('mtime')}"
        if previous and previous.get("stat") == stat:
            return previous
        if etag:
            return {"stat": stat, "hash": stat}
        fs, _ = self.s3.fs(self.location)
        digest = hashlib.sha256(read_bytes(fs, entry["name"])).hexdigest()
        return {"stat": stat, "hash": f"sha256:{digest}"}

    def shards(self) -> tuple[dict[str, str], list[str]]:
        """(partition key -> file URI, problems with files that could not become shards)."""
        shards, problems = discover_shards(self.list_files())
        protocol = "s3://" if self.location.startswith("s3://") else ""
        return {k: protocol + v for k, v in shards.items()}, problems

    def file_for(self, key: str) -> str:
        shards, _ = self.shards()
        if key not in shards:
            claimed = claim_keys(self.list_files())[0].get(key, [])
            if len(claimed) > 1:
                raise SeedError(same_key_problem(key, claimed))
            raise SeedError(f"no seed file for shard {key!r} under {self.location}; was it "
                            "renamed or deleted? Known shards: " + ", ".join(sorted(shards)))
        return shards[key]

    def options(self) -> SeedReadOptions:
        return SeedReadOptions(
            caption_column=self.caption_column, label_column=self.label_column,
            id_column=self.id_column, max_line_bytes=self.max_line_bytes,
            on_bad_line=self.on_bad_line, label_templates=load_lines(self.label_templates),
            templates_per_label=self.templates_per_label,
        )

    def read_shard(self, key: str) -> SeedReadResult:
        uri = self.file_for(key)
        fs, path = self.s3.fs(uri)
        return read_seed_bytes(read_bytes(fs, path), uri, key, self.options())
