"""Decoding images, masks and structure maps once, into compact in-memory tensors.

Images are kept as uint8 (3 x S x S) and normalised on the device just before the backbone,
so a task's training set is decoded once and reused by every epoch and every phase.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from ucad.datasets import Sample
from ucad.errors import UcadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageGeometry:
    """How a source image becomes the network input, with torchvision's own ops so the pixels equal the
    reference pipeline's (PatchCore / UCAD: `Resize(resize)` + `CenterCrop(imagesize)`).

    resize_mode "crop": shorter side to `resize` (torchvision's rounding of the long side), then centre crop
    `imagesize` (MVTec convention). resize_mode "square": the whole image squashed to imagesize x imagesize,
    nothing cropped (for non-square data such as magnetic tiles, whose defects a centre crop would cut away).
    """

    resize: int = 224
    imagesize: int = 224
    resize_mode: str = "crop"

    def apply(self, image: torch.Tensor, nearest: bool = False) -> torch.Tensor:
        """(C, H, W) or (H, W) tensor -> the same at the input geometry. Bilinear with antialiasing for images
        (as torchvision does on PIL images, to within one grey level); nearest sampling at pixel centres (PIL's
        NEAREST) for masks and region labels, whose values must not blend."""
        planar = image.ndim == 2
        if planar:
            image = image[None]
        mode = InterpolationMode.NEAREST_EXACT if nearest else InterpolationMode.BILINEAR
        if self.resize_mode == "square":
            out = TF.resize(image, [self.imagesize, self.imagesize], interpolation=mode, antialias=not nearest)
        else:
            out = TF.resize(image, [self.resize], interpolation=mode, antialias=not nearest)
            out = TF.center_crop(out, [self.imagesize, self.imagesize])
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


# modes PIL gives to single-channel images of more than 8 bits (16-bit PNG and TIFF, PGM with a large maxval)
WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def bit_depth(image: Image.Image) -> int:
    """Bits per sample as the file declares them: TIFF's BitsPerSample (12-bit cameras), else what the mode
    holds (a 16-bit PNG opens as I;16, or as I in older Pillow: PNG has no depth between 8 and 16)."""
    tags = getattr(image, "tag_v2", None)
    declared = tags.get(258) if tags is not None else None
    if isinstance(declared, (tuple, list)):
        declared = declared[0] if declared else None
    if isinstance(declared, int) and 8 < declared <= 32:
        return declared
    return 16 if image.mode in WIDE_INTEGER_MODES else 8


def to_8_bit(image: Image.Image) -> Image.Image:
    """A wide grayscale image scaled to 8 bits by its bit depth (65535 -> 255), as a viewer shows it.

    PIL's convert("RGB") clips wide values at 255 instead, which turns almost every 16-bit picture white; scaling
    by each image's own maximum would change brightness from image to image, so the bit depth decides."""
    if image.mode not in WIDE_INTEGER_MODES:
        return image
    top = float(2 ** bit_depth(image) - 1)
    array = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(array * (255.0 / top)), 0, 255).astype(np.uint8))


def load_image(path: Path, geometry: ImageGeometry) -> np.ndarray:
    """uint8 array (3, S, S); grayscale and palette images become RGB, 16-bit ones are scaled to 8 bits."""
    image = np.asarray(to_8_bit(_open(path, "image")).convert("RGB"), dtype=np.uint8)
    return geometry.apply(torch.from_numpy(image.transpose(2, 0, 1).copy())).numpy()


def load_mask(path: Path | None, geometry: ImageGeometry) -> np.ndarray:
    """uint8 {0,1} array (S, S); any value above 0 is defect (VisA masks are not 0/255)."""
    if path is None:
        return np.zeros((geometry.imagesize, geometry.imagesize), dtype=np.uint8)
    mask = _open(path, "mask")
    # single-channel values are compared with 0 as stored, whatever their bit depth (a 16-bit mask holding 1
    # is defect); colour and palette masks by their brightness
    raw = mask.mode in (("1", "L", "F") + WIDE_INTEGER_MODES)
    array = np.asarray(mask if raw else mask.convert("L"))
    binary = torch.from_numpy((array > 0).astype(np.uint8))
    return geometry.apply(binary, nearest=True).numpy()


def load_label_map(array: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """A full-resolution region-label map brought to the input geometry with nearest sampling."""
    # float32 holds every 16-bit region id exactly; nearest sampling only copies values
    resized = geometry.apply(torch.from_numpy(array.astype(np.float32)), nearest=True)
    return resized.numpy().astype(np.int32)


def _parallel(function, items, workers: int, description: str, show: bool):
    if workers <= 1:
        return [function(item) for item in tqdm(items, desc=description, disable=not show, leave=False)]
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(function, items), total=len(items), desc=description, disable=not show,
                         leave=False))


def load_images(samples: list[Sample], geometry: ImageGeometry, workers: int = 4, show: bool = True,
                description: str = "decode") -> torch.Tensor:
    arrays = _parallel(lambda s: load_image(s.image_path, geometry), samples, workers, description, show)
    return torch.from_numpy(np.stack(arrays))


def load_masks(samples: list[Sample], geometry: ImageGeometry, workers: int = 4) -> torch.Tensor:
    arrays = _parallel(lambda s: load_mask(s.mask_path, geometry), samples, workers, "masks", False)
    return torch.from_numpy(np.stack(arrays))


def normalize(images_uint8: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B,3,H,W) on any device -> float normalised with the backbone's mean and std."""
    mean_t = torch.tensor(mean, device=images_uint8.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images_uint8.device).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - mean_t) / std_t
