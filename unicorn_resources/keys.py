"""Partition keys (seed shard names) become file and folder names. One rule says which keys are
safe; one function, `key_path`, makes every path from a key, refusing an unsafe key, or a path
that would leave its folder, before anything is read or written; and seed file names give keys
by the same rule. Plain Python: no Dagster, no I/O.

Dagster itself accepts any dynamic partition key (instance.add_dynamic_partitions, the UI's
GraphQL addDynamicPartition), so the rule is applied where a key meets the storage, not only
where keys are registered.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path, PurePosixPath

MAX_KEY_CHARS = 128
KEY_RULE = (f"1-{MAX_KEY_CHARS} characters of letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, with no '..', and not a Windows device name (CON, PRN, AUX, NUL, "
            "COM1-9, LPT1-9, with or without an extension)")

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_WINDOWS_DEVICE = re.compile(r"(?:CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])(?:\..*)?", re.IGNORECASE)


class UnsafeKeyError(ValueError):
    """A partition key that cannot name a file, or a path made from one that leaves its folder."""


def key_problem(key: object) -> str | None:
    """Which part of the rule `key` breaks, or None when it is a safe key. Full matches only: a
    trailing newline is a character like any other, never an end of line."""
    if not isinstance(key, str):
        return f"it is a {type(key).__name__}, not a string"
    if not key:
        return "it is empty"
    if len(key) > MAX_KEY_CHARS:
        return f"it has {len(key)} characters, over {MAX_KEY_CHARS}"
    if not _KEY.fullmatch(key):
        if not _KEY.fullmatch(key[0]):
            return f"it starts with {key[0]!r}"
        bad = next(c for c in key if not _KEY.fullmatch("a" + c))
        return f"it contains {bad!r}"
    if ".." in key:
        return "it contains '..'"
    if _WINDOWS_DEVICE.fullmatch(key):
        return f"{key.split('.')[0]!r} is a device name on Windows"
    return None


def suggest_key(text: str) -> str:
    """A safe key close to `text`, to suggest in a message."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    while ".." in cleaned:
        cleaned = cleaned.replace("..", ".")
    cleaned = (cleaned.strip(".-_") or "shard")[:MAX_KEY_CHARS]
    if _WINDOWS_DEVICE.fullmatch(cleaned):
        device, dot, rest = cleaned.partition(".")
        cleaned = f"{device}-shard{dot}{rest}"[:MAX_KEY_CHARS]
    return cleaned


def check_key(key: str) -> str:
    """`key` itself if it is safe; else UnsafeKeyError naming the key, the rule and the fix."""
    problem = key_problem(key)
    if problem is None:
        return key
    raise UnsafeKeyError(
        f"partition key {key!r} cannot be used in a file path: {problem}. A partition key must "
        f"be {KEY_RULE}. Nothing was read or written for it. Delete the partition {key!r} (in "
        "Python: instance.delete_dynamic_partition('seed_shards', key)) and register the shard "
        f"under a safe name, e.g. {suggest_key(str(key))!r} (name its seed file so)."
    )


def key_path(folder: str, key: str, suffix: str = "") -> str:
    """`<folder>/<key><suffix>`: the one way to make a path from a partition key. `folder` is a
    local path or a URI (s3://...). Refuses an unsafe key, and any result that does not stay
    inside `folder` (a local path is resolved; a URI is normalised and its prefix compared)."""
    check_key(key)
    if "/" in suffix or "\\" in suffix or ".." in suffix:
        raise UnsafeKeyError(f"suffix {suffix!r} of partition key {key!r} must not hold '/', "
                             "'\\' or '..'")
    folder = folder.rstrip("/") or "/"
    path = posixpath.join(folder, key + suffix)
    if not is_inside(folder, path):
        raise UnsafeKeyError(f"partition key {key!r}: {path} is not inside {folder}; nothing was "
                             "read or written. Give the shard a key of " + KEY_RULE)
    return path


def is_inside(folder: str, path: str) -> bool:
    """Whether `path` lies strictly inside `folder`, both local paths or both URIs."""
    if "://" in folder or "://" in path:
        scheme, _, root = folder.partition("://")
        other, _, rest = path.partition("://")
        root, rest = posixpath.normpath("/" + root), posixpath.normpath("/" + rest)
        return other == scheme and rest.startswith(root.rstrip("/") + "/")
    # the folder may be a link to elsewhere, so resolve it; the last part is the file itself
    resolved, root = Path(path).parent.resolve() / Path(path).name, Path(folder).resolve()
    return resolved != root and resolved.is_relative_to(root)


# --- seed file names --------------------------------------------------------------------------------

SEED_EXTENSIONS = (".jsonl", ".csv", ".parquet")


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
    problem = key_problem(stem)
    if problem:
        raise SeedError(
            f"{path}: the file name {name!r} cannot be a partition key ({problem}). Rename the "
            f"file so that its name without the extension is {KEY_RULE} (for example "
            f"{suggest_key(stem) + name[len(stem):]!r})."
        )
    return stem


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
