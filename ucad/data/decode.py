"""Decoding images, masks and structure maps once, into compact in-memory tensors: images stay uint8 (3 x S x S)
and are normalised on the device just before the backbone, so every epoch and phase reuses one decoding."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode, functional as TF
from tqdm import tqdm

from ucad.data.layouts import Sample
from ucad.runtime.errors import UcadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageGeometry:
    """How a source image becomes the network input, with torchvision's own ops so the pixels equal the
    reference pipeline's (PatchCore / UCAD: `Resize(resize)` + `CenterCrop(imagesize)`).

    resize_mode "crop": shorter side to `resize`, then centre crop `imagesize` (MVTec convention); "square": the
    whole image squashed to imagesize x imagesize, so non-square data (magnetic tiles) keeps defects near its edges."""
    resize: int
    imagesize: int
    resize_mode: str

    def apply(self, image: torch.Tensor, nearest: bool = False) -> torch.Tensor:
        """(C, H, W) or (H, W) tensor -> the same at the input geometry. Bilinear with antialiasing for images
        (as torchvision does on PIL images, to within one grey level); nearest sampling at pixel centres (PIL's
        NEAREST) for masks and region labels, whose values must not blend."""
        planar = image.ndim == 2
        image = image[None] if planar else image
        mode = InterpolationMode.NEAREST_EXACT if nearest else InterpolationMode.BILINEAR
        square = [self.imagesize, self.imagesize]
        out = TF.resize(image, square if self.resize_mode == "square" else [self.resize], interpolation=mode,
                        antialias=not nearest)
        out = TF.center_crop(out, square)  # nothing to crop in "square" mode
        return out[0] if planar else out


def _open(path: Path, what: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise UcadError(f"{what} '{path}' does not exist") from None
    except Exception as error:  # PIL raises many types for damaged files
        raise UcadError(f"cannot read {what} '{path}': {error}. Replace or remove the file.") from None


# the modes whose samples are 8 bits: PIL's convert("RGB") shows them as a viewer does
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
# modes PIL gives to single-channel images of more than 8 bits (16-bit PNG and TIFF, PGM with a large maxval)
WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# a wide integer picture without a stored depth is taken to hold at least this many bits: Pillow opens a picture
# as mode I only when its samples are wider than 8 bits (16-bit PNG in older Pillow, 32-bit TIFF)
LEAST_WIDE_DEPTH = 16


@dataclass(frozen=True)
class Scaling:
    """How a picture of more than 8 bits becomes the 8 bits a viewer shows: `low` -> 0, `high` -> 255."""
    low: float
    high: float
    rule: str  # which rule chose the range, for the data check's summary

    def apply(self, array: np.ndarray) -> np.ndarray:
        span = self.high - self.low
        scaled = (array.astype(np.float64) - self.low) * (255.0 / span) if span > 0 else np.zeros(array.shape)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def bit_depth(image: Image.Image) -> int:
    """Bits per sample: as a TIFF declares them (12-bit cameras), 16 for the 16-bit modes (PNG has no depth between
    8 and 16), and for a mode I picture without a declared depth the bits its largest value needs, at least 16."""
    if (declared := _declared_depth(image)) is not None:
        return declared
    if image.mode == "I" and image.format != "PNG":
        return max(LEAST_WIDE_DEPTH, int(np.asarray(image).max(initial=0)).bit_length())
    return 16 if image.mode in WIDE_INTEGER_MODES else 8


def _declared_depth(image: Image.Image) -> int | None:
    """A 32-bit TIFF declares its container, not the bits its values use, so 32 is no declaration."""
    declared = (getattr(image, "tag_v2", None) or {}).get(258)  # TIFF's BitsPerSample, one per channel
    if isinstance(declared, (tuple, list)):
        declared = declared[0] if declared else None
    return declared if isinstance(declared, int) and 8 < declared < 32 else None


def scaling(image: Image.Image) -> Scaling | None:
    """The range that becomes 0..255 for a picture of more than 8 bits, None for 8-bit modes. Integer pictures are
    scaled by their bit depth, so that a dark picture stays dark; float pictures by [0, 1] when they lie there.
    Anything else is a UcadError naming the mode (the caller adds the file)."""
    if image.mode in EIGHT_BIT_MODES:
        return None
    if image.mode not in WIDE_INTEGER_MODES and image.mode != "F":
        raise UcadError(f"has the mode {image.mode}, which is not a picture this program can show as RGB; save it "
                        "as an 8-bit or 16-bit PNG")
    array = np.asarray(image)
    if array.size and not np.isfinite(array).all():
        raise UcadError(f"holds NaN or infinite values (mode {image.mode}); replace it")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if image.mode == "F":
        if 0.0 <= low and high <= 1.0:
            return Scaling(0.0, 1.0, "32-bit float (mode F) in [0, 1]: scaled from [0, 1]")
        return Scaling(low, high, "32-bit float (mode F) outside [0, 1]: each scaled by its own range")
    if low < 0:
        return Scaling(low, high, f"signed integer (mode {image.mode}) with negative values: each scaled by its "
                                  "own range")
    depth = bit_depth(image)
    rule = (f"32-bit integer (mode I) without a stored bit depth: scaled by the {depth} bits their values reach"
            if _declared_depth(image) is None and image.mode == "I" and image.format != "PNG"
            else f"{depth}-bit (mode {image.mode}): scaled by their bit depth")
    return Scaling(0.0, float(2 ** depth - 1), rule)


def to_8_bit(image: Image.Image) -> Image.Image:
    """A picture as a viewer shows it: PIL's convert("RGB") clips at 255, which turns almost every 16-bit picture
    white and every float picture black."""
    rule = scaling(image)
    return image if rule is None else Image.fromarray(rule.apply(np.asarray(image)))


def read_rgb(path: Path) -> np.ndarray:
    """uint8 array (H, W, 3) at the file's own size; grayscale and palette images become RGB, wider ones are scaled
    to 8 bits. The one decoding rule of every picture: the run's inputs and the structure maps made from them."""
    image = _open(path, "image")
    try:
        rgb = to_8_bit(image).convert("RGB")
    except UcadError as error:
        raise UcadError(f"image '{path}' {error}") from None
    except ValueError as error:  # PIL: "conversion from La to RGB not supported"
        raise UcadError(f"image '{path}' has the mode {image.mode}, which cannot be shown as RGB ({error}); save "
                        "it as an 8-bit or 16-bit PNG") from None
    return np.asarray(rgb, dtype=np.uint8)


def load_image(path: Path, geometry: ImageGeometry) -> np.ndarray:
    return geometry.apply(torch.from_numpy(read_rgb(path).transpose(2, 0, 1).copy())).numpy()


def load_mask(path: Path | None, geometry: ImageGeometry) -> np.ndarray:
    """uint8 {0,1} array (S, S); any value above 0 is defect (VisA masks are not 0/255)."""
    if path is None:
        return np.zeros((geometry.imagesize, geometry.imagesize), dtype=np.uint8)
    mask = _open(path, "mask")
    # single-channel values are compared with 0 as stored, whatever their bit depth (a 16-bit mask holding 1
    # is defect); colour and palette masks by their brightness
    array = np.asarray(mask if mask.mode in ("1", "L", "F") + WIDE_INTEGER_MODES else mask.convert("L"))
    return geometry.apply(torch.from_numpy((array > 0).astype(np.uint8)), nearest=True).numpy()


def load_label_map(array: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """A full-resolution region-label map at the input geometry; float32 holds every 16-bit region id exactly."""
    return geometry.apply(torch.from_numpy(array.astype(np.float32)), nearest=True).numpy().astype(np.int32)


def parallel_map(function, items: list, workers: int, show: bool, **progress) -> list:
    """[function(item) for item in items] on `workers` threads (PIL and torch release the GIL while decoding)."""
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        return list(tqdm(pool.map(function, items), total=len(items), disable=not show, leave=False, **progress))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C must not wait for thousands of queued files


def load_images(samples: list[Sample], geometry: ImageGeometry, workers: int, show: bool = True,
                description: str = "decode") -> torch.Tensor:
    arrays = parallel_map(lambda s: load_image(s.image_path, geometry), samples, workers, show, desc=description)
    return torch.from_numpy(np.stack(arrays))


def load_masks(samples: list[Sample], geometry: ImageGeometry, workers: int) -> torch.Tensor:
    return torch.from_numpy(np.stack(parallel_map(lambda s: load_mask(s.mask_path, geometry), samples, workers, False)))


def normalize(images_uint8: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B,3,H,W) on any device -> float normalised with the backbone's mean and std."""
    return TF.normalize(images_uint8.float() / 255.0, list(mean), list(std))
