"""Image helpers: encoding, hashing, the encoder-resize SSIM, thumbnails and histograms.

SSIM (as SynthVLM uses it: how much of an image's detail survives the VLM encoder's resize):
1. the image, 8-bit RGB, is resized so that its shorter side equals the encoder's input size
   (336 for CLIP ViT-L/14-336) with PIL's bicubic filter, which is antialiased when shrinking (as
   CLIP's own preprocessing, torchvision Resize on a PIL image, is); no centre crop;
2. that image is resized back to the original size with the same bicubic filter;
3. both are converted to 8-bit luma (PIL "L": ITU-R BT.601, Y = 0.299 R + 0.587 G + 0.114 B);
4. SSIM is scikit-image's `structural_similarity` with the settings of Wang et al. (2004):
   Gaussian window sigma 1.5 (11 x 11), K1 = 0.01, K2 = 0.03, population covariance,
   data range 255; the mean SSIM over the image is the score.
An image whose shorter side is already at most the encoder's size loses nothing: its SSIM is 1.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

IMAGE_FORMATS = {"png": "PNG", "webp": "WEBP"}
RESAMPLE = Image.Resampling.BICUBIC


def encode_image(image: Image.Image, fmt: str) -> bytes:
    """PNG, or lossless WebP: the stored pixels are exactly the rendered ones."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format {fmt!r} is not supported; use one of {sorted(IMAGE_FORMATS)}")
    buffer = io.BytesIO()
    options = {"lossless": True} if fmt == "webp" else {}
    image.convert("RGB").save(buffer, format=IMAGE_FORMATS[fmt], **options)
    return buffer.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """The image, fully decoded (a truncated or corrupt file raises here), as RGB."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _luma(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def ssim(a: Image.Image, b: Image.Image) -> float:
    """Mean SSIM of two same-sized images on 8-bit luma (settings in the module docstring)."""
    if a.size != b.size:
        raise ValueError(f"SSIM needs images of one size, got {a.size} and {b.size}")
    return float(structural_similarity(_luma(a), _luma(b), data_range=255.0,
                                       gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def encoder_round_trip(image: Image.Image, size: int) -> Image.Image:
    """The image after a shorter-side resize to `size` and back (bicubic both ways)."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    scale = size / min(width, height)
    small = rgb.resize((max(1, round(width * scale)), max(1, round(height * scale))), RESAMPLE)
    return small.resize((width, height), RESAMPLE)


def resize_ssim(image: Image.Image, size: int) -> float:
    """SSIM between the image and its encoder round trip at `size`; 1.0 when no shrink happens."""
    if min(image.size) <= size:
        return 1.0
    return ssim(image, encoder_round_trip(image, size))


def thumbnail_data_uri(image: Image.Image, size: int = 96) -> str:
    """A small PNG thumbnail as a data: URI, to embed in Markdown metadata."""
    thumb = image.convert("RGB").copy()
    thumb.thumbnail((size, size), RESAMPLE)
    return "data:image/png;base64," + base64.b64encode(encode_image(thumb, "png")).decode("ascii")


def png_markdown(png: bytes, title: str) -> str:
    """PNG bytes as a Markdown image with a data: URI (Dagster's UI shows it inline)."""
    return f"![{title}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def histogram_png(title: str, series: Mapping[str, Sequence[float]], bins: int = 20,
                  xlabel: str | None = None, ylabel: str = "images") -> bytes:
    """Overlaid histograms (e.g. before / after selection) as a PNG, each labelled with its n."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3), dpi=80)
    axes = figure.subplots()
    values = [np.asarray(v, dtype=float) for v in series.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    edges = np.histogram_bin_edges(finite if finite.size else [0.0, 1.0], bins=bins)
    for (label, _), data in zip(series.items(), values):
        axes.hist(data[np.isfinite(data)], bins=edges, alpha=0.6, label=f"{label} (n={data.size})")
    axes.set_title(title)
    if xlabel:
        axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
