"""Partition keys from seed file names: the one rule that decides which names are safe, and
discovery of the shards in a listing. Plain Python: no Dagster, no I/O."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

SEED_EXTENSIONS = (".jsonl", ".csv", ".parquet")
SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SeedError(ValueError):
    """A seed location or file that cannot be used as it is; the message says how to fix it."""


def shard_key_for(path: str) -> str:
    """The partition key of a seed file: its name without the extension, if that is safe."""
    name = PurePosixPath(path).name
    for ext in SEED_EXTENSIONS:
        if name.lower().endswith(ext):
            stem = name[: -len(ext)]
            break
    else:
        raise SeedError(f"{path}: not a seed file; seed files end in {', '.join(SEED_EXTENSIONS)}")
    if ".." in stem or not SAFE_KEY.match(stem):
        raise SeedError(
            f"{path}: the file name {name!r} cannot be a partition key. Rename the file so that "
            "its name without the extension is 1-128 characters of letters, digits, '.', '_' "
            "or '-', starts with a letter or digit and has no '..' (for example "
            f"{_suggest_key(stem) + name[len(stem):]!r})."
        )
    return stem


def _suggest_key(stem: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem)
    while ".." in cleaned:
        cleaned = cleaned.replace("..", ".")
    return (cleaned.strip(".-_") or "shard")[:128]


def claim_keys(paths: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """{partition key: the seed files among `paths` whose names give it}, and a problem for each
    seed file whose name gives no safe key. Files that are not seed files are ignored."""
    claims: dict[str, list[str]] = {}
    problems: list[str] = []
    for path in sorted(paths):
        if not path.lower().endswith(SEED_EXTENSIONS):
            continue
        try:
            claims.setdefault(shard_key_for(path), []).append(path)
        except SeedError as err:
            problems.append(str(err))
    return claims, problems


def same_key_problem(key: str, paths: list[str]) -> str:
    name = PurePosixPath(paths[1]).name
    stem, ext = name[: len(key)], name[len(key):]
    rename = f"{stem}-{ext.lstrip('.').lower()}{ext}"
    listed = ", ".join(paths[:-1]) + " and " + paths[-1]
    return (f"{listed}: {len(paths)} seed files would all be shard {key!r}, so none "
            f"of them is read (shard {key!r}, if registered, keeps its partition and data). "
            f"Rename all but one so that their names differ before the extension, e.g. {name} "
            f"-> {rename}.")


def discover_shards(paths: list[str]) -> tuple[dict[str, str], list[str]]:
    """Map partition key -> file for the seed files among `paths`.

    Returns (shards, problems): a file whose name gives no safe key is left out, and so are all
    the files whose names give the same key; each is described in `problems` rather than
    stopping the others.
    """
    claims, problems = claim_keys(paths)
    problems += [same_key_problem(k, files) for k, files in claims.items() if len(files) > 1]
    return {k: files[0] for k, files in claims.items() if len(files) == 1}, problems
