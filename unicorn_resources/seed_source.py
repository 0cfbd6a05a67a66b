"""Where the seed shards live: a local folder or an s3:// prefix; one seed file is one shard."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from unicorn_resources.keys import (
    SeedError,
    check_key,
    claim_keys,
    discover_shards,
    same_key_problem,
)
from unicorn_resources.storage import S3Options, read_bytes


class SeedSource(dg.ConfigurableResource):
    """The seed location and how its files are read (the profiles default `location` to the
    bundled demo seeds). Parsing the bytes is the caption_seeds asset's work."""

    location: str
    s3: S3Options = S3Options()
    caption_column: str = "caption"
    label_column: str = "label"
    id_column: str = "id"
    max_line_bytes: int = Field(64 * 1024, ge=1, le=2**30)
    on_bad_line: Literal["skip", "fail"] = "skip"
    label_templates: str = "seed_labels/v1.txt"
    templates_per_label: int = Field(10, ge=1, le=1000)

    def scan(self) -> tuple[list[dict[str, Any]], list[str]]:
        """fsspec details (name, size, mtime or ETag) of the regular files at the location, listed
        afresh (s3fs would otherwise answer from its listing cache and miss files added since),
        and a warning naming each other entry: a folder, a symbolic link, a device. Only the
        regular files at the top of the location are read."""
        fs, root = self.s3.fs(self.location)
        fs.invalidate_cache(root)
        if not fs.isdir(root):
            raise SeedError(f"seed location {self.location} is not a folder or prefix; point "
                            "UNICORN_SEEDS (or the seeds resource's location) at one")
        files, problems = [], []
        for entry in sorted(fs.ls(root, detail=True), key=lambda e: e["name"]):
            if entry["type"] == "file" and not entry.get("islink"):
                files.append(entry)
            else:
                problems.append(self._not_read(entry))
        return files, problems

    def _not_read(self, entry: dict[str, Any]) -> str:
        name = entry["name"]
        if entry.get("islink"):
            return (f"{name}: a symbolic link (to {entry.get('destination', '?')}), which is not "
                    "followed, so it is not read. Copy the file itself into the seed location.")
        if entry["type"] == "directory":
            return (f"{name}: a folder; only the files at the top of the seed location are read, "
                    "not those in its folders. Move the seed files up into "
                    f"{self.location}, or point the seed location at the folder.")
        return (f"{name}: not a regular file ({entry['type']}), so it is not read. Put seed files "
                "in the seed location as regular files.")

    def list_entries(self) -> list[dict[str, Any]]:
        """The regular files of `scan()`."""
        return self.scan()[0]

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
        """(partition key -> file URI, problems with entries that could not become shards:
        folders and links, then files)."""
        entries, skipped = self.scan()
        shards, problems = discover_shards([e["name"] for e in entries])
        protocol = "s3://" if self.location.startswith("s3://") else ""
        return {k: protocol + v for k, v in shards.items()}, skipped + problems

    def file_for(self, key: str) -> str:
        check_key(key)  # a key registered by hand may be unsafe: refuse it before any listing
        shards, _ = self.shards()
        if key not in shards:
            claimed = claim_keys(self.list_files())[0].get(key, [])
            if len(claimed) > 1:
                raise SeedError(same_key_problem(key, claimed))
            raise SeedError(f"no seed file for shard {key!r} under {self.location}; was it "
                            "renamed or deleted? Known shards: " + ", ".join(sorted(shards)))
        return shards[key]

    def read_file(self, key: str) -> tuple[str, bytes]:
        """(URI, bytes) of the seed file of shard `key`."""
        uri = self.file_for(key)
        fs, path = self.s3.fs(uri)
        return uri, read_bytes(fs, path)
