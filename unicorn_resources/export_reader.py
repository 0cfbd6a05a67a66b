"""How a VLM trainer reads a Unicorn export (pretrain or instruct): records and their embeddings.

    python -m unicorn_resources.export_reader data/exports/unicorn_pretrain [record id]

Needs only `safetensors` and numpy (or torch: open with framework="pt"). The embedding takes the
place of the image features: feed it through the projector where LLaVA feeds the vision tower's
(the Unicorn reference trainer copies the one vector into 576 tokens first; its projector's input
width, mm_hidden_size, is the embedding dimension). At inference, map a real image's embedding with
`transform_image_embedding` so it lands where the training vectors were.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

# methods whose training vectors were moved to the images (or, with none, not moved): a real
# image's embedding is used as it is, l2-normalised
IMAGES_AS_THEY_ARE = ("mean_shift_to_image_mean", "realign", "none")


def map_image_embedding(e: np.ndarray, method: str, mu_image: np.ndarray | None) -> np.ndarray:
    """A real image's embedding (one (dim,) vector or (n, dim) rows) as `method`'s inference
    recipe maps it, float64: l2norm(e - mu_image) for the paper's mean_shift, l2norm(e) for the
    others."""
    e = np.asarray(e, dtype=np.float64)
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    if method in IMAGES_AS_THEY_ARE:
        return e
    if method != "mean_shift":
        raise ValueError(f"transfer method {method!r} is unknown to this reader: update "
                         "unicorn_resources/export_reader.py")
    if mu_image is None:
        raise ValueError("mean_shift centres real images by their mean: pass mu_image, the mean "
                         "of your images' l2-normalised embeddings")
    centred = e - np.asarray(mu_image, dtype=np.float64)
    return centred / np.linalg.norm(centred, axis=-1, keepdims=True)


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

    def _row(self, record: dict[str, Any], tensor: str) -> np.ndarray:
        pointer = record["embedding"]
        if pointer["file"] not in self._open:
            self._open[pointer["file"]] = safe_open(str(self.folder / pointer["file"]), "np")
        rows = self._open[pointer["file"]].get_slice(tensor)
        return rows[pointer["row"] : pointer["row"] + 1][0]

    def embedding(self, record: dict[str, Any]) -> np.ndarray:
        """The record's float32 vector; files are memory-mapped, only the row is read."""
        return self._row(record, self.manifest["embedding"]["tensor"])

    def shift_norm(self, record: dict[str, Any]) -> float:
        """||u - offset|| before normalising: embedding * shift_norm is the public code's
        un-normalised vector u - mu_text (for the paper's mean_shift)."""
        return float(self._row(record, self.manifest["embedding"]["shift_norm_tensor"]))

    def statistics(self) -> dict[str, np.ndarray]:
        """mu_text, and mu_image when the export ships one (float64)."""
        with safe_open(str(self.folder / self.manifest["statistics_file"]), "np") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118

    def transform_image_embedding(self, e: np.ndarray, mu_image: np.ndarray | None = None
                                  ) -> np.ndarray:
        """A real image's embedding (same encoder, one (dim,) vector or (n, dim) rows) mapped as
        the manifest's inference_transform says. For the paper's mean_shift that is
        l2norm(e - mu_image): pass the mean over your own images as `mu_image` (the paper), or
        leave it None to use the reference-image mean the export ships. For
        mean_shift_to_image_mean, realign and none: e itself (l2-normalised), since the training
        vectors were moved to the images (or, with none, not moved at all)."""
        method = self.manifest["transfer"]["method"]
        if method == "mean_shift" and mu_image is None:
            mu_image = self.statistics().get("mu_image")
            if mu_image is None:
                raise ValueError("this export ships no mu_image (no reference_images were set): "
                                 "pass mu_image, the mean of your images' l2-normalised "
                                 "embeddings")
        return map_image_embedding(e, method, mu_image).astype(np.float32)

    def unicorn_pairs(self) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        """(record, float32 vector) of the `unicorn` format (unicorn/records.json with
        unicorn/embeddings.safetensors), matched by id as the Unicorn reference trainer does."""
        layout = self.manifest.get("unicorn")
        if layout is None:
            raise ValueError(f"{self.folder} has no unicorn format: export it with formats "
                             "[llava, unicorn]")
        ids = json.loads((self.folder / layout["ids_file"]).read_text(encoding="utf-8"))
        row_of = {str(i): row for row, i in enumerate(ids)}
        with safe_open(str(self.folder / layout["embeddings_file"]), "np") as handle:
            rows = handle.get_slice("embeddings")
            with open(self.folder / layout["records_file"], encoding="utf-8") as file:
                records = json.load(file)
            for record in records:
                row = row_of[str(record["id"])]
                yield record, rows[row : row + 1][0]


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
