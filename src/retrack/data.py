"""Image sets as uint8 arrays with content hashes, the loaders that build them, and forget specs.

Everything downstream (neighbours, caches, run records) identifies data by content, never by
path, so a changed file can never be mistaken for the one that was there before.
"""

from __future__ import annotations

import gzip
import hashlib
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from retrack.errors import UserError, require
from retrack.store import array_digest, is_store, iter_rows, open_store
from retrack.untrusted import load_cifar_batch
from retrack.validation import Check, Int, parse_int_text, read_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 (N, H, W, C), with one content digest per image and one for the set.

    `images` may be a read-only memmap of a prepared store (retrack prepare-data); its digest
    then comes from the store's header instead of a pass over all its bytes.
    """

    images: np.ndarray
    source: str
    known_digest: str | None = field(default=None, compare=False, repr=False)
    # What loading did to the files, for the run record: {"modes": {source mode: files converted
    # to 8 bits}, "resized": {...}}; empty when every file was 8-bit grey or RGB and kept as it was.
    conversion: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        require(self.images.ndim == 4, f"images must be (N,H,W,C), got shape {self.images.shape}")
        require(self.images.dtype == np.uint8, f"images must be uint8, got {self.images.dtype}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image, the layout models see."""
        _, h, w, c = self.images.shape
        return (c, h, w)

    def image_digests(self) -> list[str]:
        return [image_digest(im) for rows in iter_rows(self.images) for im in rows]

    def digest(self) -> str:
        """Hash of the whole set (shape and bytes): the key of every cache built from it."""
        return self.known_digest or array_digest(self.images)

    def subset(self, indices: np.ndarray) -> ImageSet:
        return ImageSet(self.images[indices], f"{self.source}[subset]")

    def as_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Float (N, C, H, W) in [-1, 1], the range every model here is trained on."""
        return to_model_range(torch.from_numpy(self.images).to(device))


def to_model_range(images_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    return images_uint8_nhwc.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model-range (N, C, H, W) tensor to uint8 (N, H, W, C)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_digest(image: np.ndarray) -> str:
    h = hashlib.sha256(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def distinct(images: np.ndarray) -> np.ndarray:
    """Each distinct image once, in order of first appearance."""
    seen: dict[str, int] = {}
    for i, im in enumerate(images):
        seen.setdefault(image_digest(im), i)
    return images[sorted(seen.values())]


def load_images(path: str | Path, fit: tuple[int, int] | None = None) -> ImageSet:
    """Load a folder of images, an .npz with `images`, a torchvision-style dataset folder, or a
    store written by `retrack prepare-data` (memory-mapped, not read into RAM).

    `fit` (H, W): a folder whose files differ in size or channels is converted as a text-to-image
    pipeline's image processor converts each file (RGB, then Lanczos to H×W) instead of refused.
    """
    p = Path(path)
    require(p.exists(), f"data path {str(p)!r} does not exist.")
    if is_store(p):
        images, header = open_store(p)
        conversion = header.get("conversion")
        return ImageSet(images, str(p), header["digest"], conversion if isinstance(conversion, dict) else {})
    if p.is_file():
        require(p.suffix == ".npz", f"data file {str(p)!r} is not an .npz (expected an 'images' array).")
        return _load_npz(p)
    idx = _find_idx_images(p)
    if idx is not None:
        return ImageSet(_nhwc(read_idx(idx)), str(p))
    cifar = _find_cifar(p)
    if cifar is not None:
        return ImageSet(_load_cifar(cifar), str(p))
    files = _image_files(p)
    require(bool(files), f"data folder {str(p)!r} holds no png/jpg images, IDX files or CIFAR-10 batches.")
    modes: dict[str, int] = {}
    images = [read_image_file(f, modes) for f in files]
    odd = next((f for f, im in zip(files, images, strict=False) if im.shape != images[0].shape), None)
    conversion: dict = {"modes": modes} if modes else {}
    if odd is not None and fit is not None:
        fitted = [fit_image(im, fit) for im in images]
        conversion["resized"] = {"to": [int(fit[0]), int(fit[1])], "rgb": True, "resample": "lanczos",
                                 "files": sum(im.shape != f.shape for im, f in zip(images, fitted, strict=True))}
        images = fitted
    else:
        require(odd is None, f"image {str(odd)!r} differs in size or channels from {str(files[0])!r}.")
    return ImageSet(np.stack(images), str(p), conversion=conversion)


def fit_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One (H, W, C) uint8 image as a StableDiffusionPipeline's image processor sees it: RGB, then
    resized with Lanczos (its default resample) to `size` (H, W); an RGB image of that size is kept."""
    im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
    h, w = size
    return np.asarray(im if im.size == (w, h) else im.resize((w, h), resample=Image.LANCZOS))


def image_chunks(path: str | Path, rows: int = 256,
                 modes: dict[str, int] | None = None) -> tuple[tuple[int, int, int, int], Iterator[np.ndarray]]:
    """The images at `path` as (N, H, W, C) and an iterator over chunks of rows, for conversion;
    `modes` counts, as the chunks are read, the files of each mode converted to 8 bits.

    A folder of image files is read `rows` files at a time, so converting it never holds it
    whole (CelebA-HQ 256 is 5.9 GB); every other format is read as load_images reads it.
    """
    p = Path(path)
    require(p.exists(), f"data path {str(p)!r} does not exist.")
    files = _image_files(p) if p.is_dir() and not is_store(p) and _find_idx_images(p) is None \
        and _find_cifar(p) is None else None
    if not files:
        images = load_images(p).images
        return tuple(images.shape), iter_rows(images)
    first = read_image_file(files[0])  # counted with its chunk

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, len(files), rows):
            batch = [read_image_file(f, modes) for f in files[start : start + rows]]
            odd = next((f for f, im in zip(files[start:], batch, strict=False) if im.shape != first.shape), None)
            require(odd is None, f"image {str(odd)!r} differs in size or channels from {str(files[0])!r}.")
            yield np.stack(batch)

    return (len(files), *first.shape), chunks()


def _image_files(p: Path) -> list[Path]:
    return sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)


def _nhwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    return np.ascontiguousarray(images)


def _load_npz(p: Path) -> ImageSet:
    require(_is_zip(p), f"data file {str(p)!r} is not an .npz archive (numpy.savez writes one).")
    try:
        with np.load(p, allow_pickle=False) as z:
            require("images" in z.files, f"{str(p)!r} has no 'images' array (found {z.files}).")
            images = z["images"]
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"could not read the 'images' array of {str(p)!r}: {_first_line(e)}.") from None
    require(images.dtype == np.uint8, f"'images' in {str(p)!r} must be uint8, got {images.dtype}.")
    require(images.ndim in (3, 4), f"'images' in {str(p)!r} must be (N,H,W) or (N,H,W,C), got {images.shape}.")
    return ImageSet(_nhwc(images), str(p))


def read_image_file(f: Path, modes: dict[str, int] | None = None) -> np.ndarray:
    """One image file as uint8 (H, W, 1 or 3); `modes` counts the files converted from another
    mode than 8-bit grey or RGB (16-bit, float, palette, alpha, ...)."""
    try:
        with Image.open(f) as im:
            if modes is not None and im.mode not in ("L", "RGB"):
                modes[im.mode] = modes.get(im.mode, 0) + 1
            arr = image_to_uint8(im, f)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"could not read image {str(f)!r}: {_first_line(e)}.") from None
    return arr[..., None] if arr.ndim == 2 else arr


GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def image_to_uint8(im, name: Path | str = "the image") -> np.ndarray:
    """(H, W) grey or (H, W, 3) RGB uint8 of any PIL mode, as the pipelines see an image: 16-bit
    and 32-bit integer grey are scaled (65535 → 255, not clipped), float grey in [0, 1] scaled by
    255, alpha dropped, palettes, CMYK, YCbCr and the rest converted to RGB."""
    if im.mode not in GREY_MODES:
        return np.array(im.convert("RGB"))
    if im.mode in ("1", "L", "LA", "La"):
        return np.array(im.convert("L"))
    arr = np.asarray(im)
    if im.mode == "F":
        require(bool(np.isfinite(arr).all()) and arr.min() >= 0 and arr.max() <= 1,
                f"image {str(name)!r} holds floating-point values outside [0, 1]; save it as an 8- or 16-bit image.")
        return np.rint(arr.astype(np.float64) * 255).astype(np.uint8)
    arr = arr.astype(np.int64)
    require(arr.min() >= 0 and arr.max() <= 65535,
            f"image {str(name)!r} holds values outside 0–65535; save it as an 8- or 16-bit image.")
    return ((arr * 255 + 32767) // 65535).astype(np.uint8)  # 16-bit → 8-bit, rounded


def _is_zip(p: Path) -> bool:
    with open(p, "rb") as fh:
        return fh.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].rstrip(".") if text else type(e).__name__


def _read_maybe_gzip(path: Path) -> bytes:
    """The bytes of a file, gunzipped if it ends in .gz; a broken archive is one sentence."""

    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"{str(path)!r} is not a valid gzip file ({_first_line(e)}).") from None
    except OSError as e:
        raise UserError(f"could not read {str(path)!r}: {e.strerror or _first_line(e)}.") from None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX image file (MNIST/Fashion-MNIST format), gzipped or not, as uint8 (N,H,W)."""
    data = _read_maybe_gzip(path)
    require(len(data) >= 16 and data[2] == 0x08 and data[3] == 3, f"{str(path)!r} is not an IDX image file.")
    n, h, w = (int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
    require(len(data) == 16 + n * h * w, f"{str(path)!r} is truncated.")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, h, w)


def read_idx_labels(path: Path) -> np.ndarray:
    data = _read_maybe_gzip(path)
    require(len(data) >= 8 and data[2] == 0x08 and data[3] == 1, f"{str(path)!r} is not an IDX label file.")
    return np.frombuffer(data, dtype=np.uint8, offset=8)


def find_idx(root: Path, stem: str) -> Path | None:
    """Find `stem` (e.g. train-images-idx3-ubyte) under a torchvision-style folder, gz or not."""
    for sub in ("", "raw", "MNIST/raw", "FashionMNIST/raw"):
        for name in (stem, stem + ".gz"):
            f = root / sub / name
            if f.is_file():
                return f
    return None


def _find_idx_images(root: Path) -> Path | None:
    return find_idx(root, "train-images-idx3-ubyte")


def _find_cifar(root: Path) -> Path | None:
    for d in (root, root / "cifar-10-batches-py"):
        if (d / "data_batch_1").is_file():
            return d
    return None


def _load_cifar(d: Path) -> np.ndarray:
    chunks = []
    for i in range(1, 6):
        f = d / f"data_batch_{i}"
        require(f.is_file(), f"CIFAR-10 batch {str(f)!r} is missing (data_batch_1 to 5 are needed).")
        try:
            batch = load_cifar_batch(f.read_bytes())
            chunks.append(np.asarray(batch.get(b"data", batch.get("data")), dtype=np.uint8).reshape(-1, 3, 32, 32))
        except Exception as e:  # a pickle can fail in any way; the file is what the user must fix
            raise UserError(f"{str(f)!r} is not a CIFAR-10 python batch ({type(e).__name__}: "
                            f"{_first_line(e)}).") from None
    return np.ascontiguousarray(np.concatenate(chunks).transpose(0, 2, 3, 1))


# ---------------------------------------------------------------------------------------------
# Forget specs and the remain/forget split
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Indices into one ImageSet: what must be forgotten and what remains."""

    forget: np.ndarray
    remain: np.ndarray


def parse_forget(spec: str, data: ImageSet) -> np.ndarray:
    """Turn '17,42', '@indices.txt' or image paths (matched by content) into sorted indices."""
    spec = spec.strip()
    require(bool(spec), "the forget spec is empty.")
    if spec.startswith("@"):
        f = Path(spec[1:])
        require(f.is_file(), f"forget index file {str(f)!r} does not exist.")
        lines = read_text(f, "forget index file").splitlines()
        tokens = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
        require(bool(tokens), f"forget index file {str(f)!r} holds no indices.")
    else:
        tokens = [t.strip() for t in spec.split(",") if t.strip()]
    indices: list[int] = []
    lookup: dict[str, list[int]] | None = None
    for tok in tokens:
        number = parse_int_text(tok)
        if number is not None:
            indices.append(number)
            continue
        require(Path(tok).is_file(), f"forget entry {tok!r} is neither an index nor an existing image file.")
        if lookup is None:
            lookup = {}
            for i, d in enumerate(data.image_digests()):
                lookup.setdefault(d, []).append(i)
        image = read_image_file(Path(tok))
        found = lookup.get(image_digest(image))
        require(found is not None, f"forget image {tok!r} does not occur in the data.")
        indices.extend(found)
    n = len(data)
    bad = [i for i in indices if not 0 <= i < n]
    require(not bad, f"forget index {bad[0] if bad else ''} is out of range for {n} images.")
    require(len(set(indices)) == len(indices), f"forget indices contain duplicates: {_dups(indices)}.")
    return np.array(sorted(indices), dtype=np.int64)


class ForgetSpec(Check):
    """A forget spec as text: '17,42', '@file', image paths, or a list of indices (from Python)."""

    def describe(self) -> str:
        return "indices like 17,42, @FILE, image files, or a list of indices"

    def __call__(self, value, name: str | None = None) -> str:
        if isinstance(value, str | Path):
            text = str(value).strip()
        elif isinstance(value, list | tuple | np.ndarray) and len(value) > 0:
            text = ",".join(str(Int(min=0)(i, name or "forget")) for i in np.asarray(value).ravel().tolist())
        else:
            text = ""
        if not text:
            raise UserError(f"{name or '--forget'} is empty; give {self.describe()}.")
        return text


def check_forget_file(spec: str) -> None:
    """An '@FILE' spec's file must exist and be text, before any data is read."""
    if spec.startswith("@"):
        f = Path(spec[1:])
        require(f.is_file(), f"--forget: forget index file {str(f)!r} does not exist.")
        read_text(f, "forget index file")


def split(data: ImageSet, forget: np.ndarray) -> Split:
    require(len(forget) > 0, "the forget set is empty.")
    mask = np.ones(len(data), dtype=bool)
    mask[forget] = False
    remain = np.nonzero(mask)[0]
    require(len(remain) > 0, "the forget set covers the whole data set: nothing would remain.")
    return Split(forget=np.asarray(forget, dtype=np.int64), remain=remain)


def _dups(indices: list[int]) -> list[int]:
    seen: set[int] = set()
    return sorted({i for i in indices if i in seen or seen.add(i)})
