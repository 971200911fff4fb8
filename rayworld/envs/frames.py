"""One frame resize for every source, so the VAE sees the same filtering whatever made the frame."""

from __future__ import annotations

import numpy as np
from PIL import Image

SIZE = 64


def resize64(frame) -> np.ndarray:
    """An HxWx3 uint8 array or a PIL image -> a writable 64x64x3 uint8 array.

    BOX averages every source pixel into the one it lands in: the right filter for large
    downscales (thin lines blur instead of aliasing). A non-square frame is squashed, so all of
    the field of view is kept.
    """
    img = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, np.uint8))
    img = img.convert("RGB")
    if img.size != (SIZE, SIZE):
        img = img.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.array(img, dtype=np.uint8)
