"""How a VLM trainer reads a Unicorn export (pretrain or instruct): records and their embeddings.

    python -m unicorn_resources.export_reader data/exports/unicorn_pretrain [record id]

Needs only `safetensors` and numpy (or torch: open with framework="pt"). The embedding takes the
place of the image features: feed it through the projector where LLaVA feeds the vision tower's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open


class UnicornExport:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text(encoding="utf-8"))
        self._open: dict[str, Any] = {}

    def records(self) -> Iterator[dict[str, Any]]:
        """{"id", "caption_id", "conversations": [{"from", "value"}, ...], "embedding": {"file", "row"}}"""
        with open(self.folder / self.manifest["records_file"], encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)

    def embedding(self, record: dict[str, Any]) -> np.ndarray:
        """The record's float32 vector; files are memory-mapped, only the row is read."""
        pointer = record["embedding"]
        if pointer["file"] not in self._open:
            self._open[pointer["file"]] = safe_open(str(self.folder / pointer["file"]), "np")
        rows = self._open[pointer["file"]].get_slice(self.manifest["embedding"]["tensor"])
        return rows[pointer["row"] : pointer["row"] + 1][0]


def main(folder: str, record_id: str | None = None) -> None:
    data = UnicornExport(folder)
    meta = data.manifest
    print(f"{meta['dataset']}: {meta['counts']['records']} records, embeddings "
          f"{meta['embedding']['dim']}-d {meta['embedding']['dtype']} from "
          f"{meta['embedding']['model_id']}, statistics {meta['statistics_version']}")
    if meta.get("note"):
        print(f"note: {meta['note']}")
    record = next(r for r in data.records() if record_id in (None, r["id"]))
    vector = data.embedding(record)
    print(f"record {record['id']}:")
    for turn in record["conversations"]:
        print(f"  {turn['from']}: {turn['value'][:200]!r}")
    print(f"embedding {record['embedding']['file']}#{record['embedding']['row']}: shape "
          f"{vector.shape}, dtype {vector.dtype}, norm {np.linalg.norm(vector):.4f}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(*sys.argv[1:])
