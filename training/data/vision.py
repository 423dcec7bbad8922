"""Image-classification data: whole splits held in memory as uint8 tensors, batched by indexing.

Sources (``source`` in the config):
* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, no network; the default);
* ``hf``: a Hugging Face dataset with an image and a label column (cifar10/100, mnist, fashion_mnist, or a
  local ``imagefolder``/parquet via ``hf_path`` + ``hf_data_dir``/``hf_data_files``);
* ``folder``: an ImageFolder tree (``root/<class>/*.png``, or ``root/{train,val,test}/<class>/...``) read
  with PIL.
hf and folder sources are decoded once into a uint8 cache (``training.data.cache``); digits needs none.
``stream=true`` (folder only) instead reads each image from disk when a batch needs it, in ``DataLoader``
workers (``StreamImageData``): for folders larger than RAM, with the same order, augmentation and resume.

Splits: the source's own; a missing ``test`` is carved from train (``test_fraction``), then a missing
``val`` from the rest (``val_fraction``), both stratified by label with ``split_seed``, so they are the
same on every run and rank.

Training batches walk epoch permutations (epoch ``e`` uses a generator seeded by ``(seed, e)``; a batch
that runs past an epoch's end continues into the next), then random crop (zero padding of
``crop_padding`` pixels, black before normalization) and horizontal flip (``hflip``; off for digits),
then per-channel normalization (``mean``/``std``, computed from the train split when null). Everything is
vectorized over the batch; the permutation and augmentation draws are made for the global batch on every
rank (see ``training.data.common``).

MixUp (``mixup_alpha``) and CutMix (``cutmix_alpha``), off by default: each training batch is mixed with
itself reversed, with probability ``mix_prob``; when both are on, each mixed batch takes one of the two with
equal chance. The weight ``lam`` is drawn from Beta(alpha, alpha) (CutMix's then set to the share of pixels
kept), and the labels become soft targets: float32 ``[B, num_classes]``, ``lam * onehot(y) + (1 - lam) *
onehot(y reversed)``, which the models' losses take as class probabilities. Evaluation batches are never mixed.

RandAugment (``randaugment_ops`` ops of ``randaugment_magnitude`` per training image, off by default) is
torchvision's ``transforms.v2.RandAugment``, applied after crop and flip, each image with torch's generator
seeded from the batch's draws, so batches stay the same for any worker count and resume exactly. It needs a
torchvision built for the installed torch.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.data.cache import ArrayCache
from training.data.common import (Sampler, check_fraction, check_positive_int, parse_config, stream_generator)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclasses.dataclass
class ImageConfig:
    task: str = "image"
    name: str = "digits"
    source: str = "digits"                # digits | hf | folder
    hf_path: str | None = None
    hf_name: str | None = None
    hf_revision: str | None = None
    hf_data_dir: str | None = None
    hf_data_files: Any = None
    hf_cache_dir: str | None = None
    image_field: str = "image"
    label_field: str = "label"
    splits: dict | None = None            # hf: {our split: source split}; default {train: train, test: test}
    root: str | None = None               # folder: the ImageFolder root
    image_size: int | None = None         # folder/hf: resize to image_size x image_size (else sizes must agree)
    channels: int | None = None           # 1 or 3; default: 1 if every image is grayscale, else 3
    val_fraction: float = 0.1             # carved (stratified) from train when the source has no val split
    test_fraction: float = 0.2            # carved from train when the source has no test split
    split_seed: int = 0
    crop_padding: int = 4                 # random crop after zero padding; 0 disables
    hflip: bool = True
    mean: list[float] | None = None              # per channel, on [0, 1] pixels; null: from the train split
    std: list[float] | None = None
    cache_dir: str | None = None
    verify: str = "full"
    repair_cache: bool = False
    stream: bool = False                  # folder: read images from disk per sample in DataLoader workers
    num_workers: int = 2                  # stream: DataLoader worker processes (0: in the training process)
    prefetch_factor: int = 2              # stream: batches each worker loads ahead
    mixup_alpha: float = 0.0              # MixUp's Beta(alpha, alpha); 0 disables
    cutmix_alpha: float = 0.0             # CutMix's Beta(alpha, alpha); 0 disables
    mix_prob: float = 1.0                 # chance that a training batch is mixed (when either alpha is on)
    randaugment_ops: int = 0              # RandAugment (torchvision.transforms.v2): ops per image; 0 disables
    randaugment_magnitude: int = 9        # RandAugment's magnitude, 0-30

    def __post_init__(self):
        if self.task != "image":
            raise ValueError(f"image data needs task='image', got {self.task!r}")
        if self.source not in ("digits", "hf", "folder"):
            raise ValueError(f"source must be 'digits', 'hf' or 'folder', got {self.source!r}")
        check_fraction("val_fraction", self.val_fraction)
        check_fraction("test_fraction", self.test_fraction)
        if self.image_size is not None:
            check_positive_int("image_size", self.image_size)
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or null, got {self.channels!r}")
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {self.crop_padding!r}")
        if self.source == "folder" and not self.root:
            raise ValueError("source=folder needs root: the ImageFolder directory")
        if self.source == "hf" and not self.hf_path:
            raise ValueError("source=hf needs hf_path (a hub dataset id, or a builder such as 'imagefolder')")
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {self.num_workers!r}")
        check_positive_int("prefetch_factor", self.prefetch_factor)
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a number >= 0 (0 disables), got {value!r}")
        if not isinstance(self.randaugment_ops, int) or isinstance(self.randaugment_ops, bool) or self.randaugment_ops < 0:
            raise ValueError(f"randaugment_ops must be an int >= 0 (0 disables), got {self.randaugment_ops!r}")
        if (not isinstance(self.randaugment_magnitude, int) or isinstance(self.randaugment_magnitude, bool)
                or not 0 <= self.randaugment_magnitude <= 30):
            raise ValueError(f"randaugment_magnitude must be an int in [0, 30], got {self.randaugment_magnitude!r}")
        if isinstance(self.mix_prob, bool) or not isinstance(self.mix_prob, (int, float)) or not 0 <= self.mix_prob <= 1:
            raise ValueError(f"mix_prob must be a number in [0, 1], got {self.mix_prob!r}")
        if self.stream and self.source != "folder":
            raise ValueError(f"stream=true is for source=folder, got source={self.source!r}")
        if self.stream and self.image_size is None:
            raise ValueError("stream=true needs image_size: every image is resized to image_size x image_size")
        if self.splits is None:
            self.splits = {"train": "train", "test": "test"}
        if "train" not in self.splits or not set(self.splits) <= set(SPLITS):
            raise ValueError(f"splits must map 'train' (and optionally 'val', 'test') to source splits, "
                             f"got {self.splits!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple)) or not value):
                raise ValueError(f"{name} must be a list of per-channel values or null, got {value!r}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")

    def needs_val_fraction(self) -> bool:
        """Whether the val split is carved from train (``val_fraction``): the source has none of its own."""
        if self.source == "hf":
            return "val" not in self.splits
        return not (self.source == "folder" and (Path(self.root).expanduser() / "val").is_dir())


# ---------------------------------------------------------------------------------------------- sources

def _digits() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values are 0..16: scale to the 0..255 range every other source uses.
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return {"train": (images, d.target.astype(np.int64))}, [str(c) for c in d.target_names]


def _to_array(img, mode: str, size: int | None) -> np.ndarray:
    img = img.convert(mode)
    if size is not None and img.size != (size, size):
        from PIL import Image

        img = img.resize((size, size), Image.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _stack(arrays: list[np.ndarray], where: list[str]) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        odd = next(w for a, w in zip(arrays, where) if a.shape != first)
        raise ValueError(f"images differ in size ({where[0]} is {first[1:]}, {odd} is not); set "
                         f"data.image_size to resize them")
    return np.stack(arrays)


def _folder_splits(cfg: ImageConfig) -> tuple[dict[str, list[tuple[Path, int]]], list[str]]:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {str(root)!r} is not a directory")
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise ValueError(f"data.root {str(root)!r} has {sorted(split_dirs)} folders but no train/")
    split_dirs = split_dirs or {"train": root}
    classes = sorted(d.name for d in split_dirs["train"].iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"data.root: {str(split_dirs['train'])!r} has no class folders (expected <class>/<image>)")
    out = {}
    for split, d in split_dirs.items():
        found = sorted(c.name for c in d.iterdir() if c.is_dir())
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"data.root: {split}/ has classes {unknown} that train/ lacks")
        items = [(p, classes.index(c)) for c in found for p in sorted((d / c).rglob("*"))
                 if p.suffix.lower() in IMAGE_SUFFIXES]
        if not items:
            raise ValueError(f"data.root: {str(d)!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        out[split] = items
    return out, classes


def _read_folder(cfg: ImageConfig, items: dict[str, list[tuple[Path, int]]]) -> dict:
    from PIL import Image, UnidentifiedImageError

    def read(path: Path, mode: str | None):
        """The image's mode (header only) when ``mode`` is None, else its pixels in ``mode``."""
        try:
            with Image.open(path) as img:
                return img.mode if mode is None else _to_array(img, mode, cfg.image_size)
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"data.root: cannot read image {str(path)!r}: {e}") from e

    mode = _mode(cfg, [read(p, None) for split_items in items.values() for p, _ in split_items])
    out = {}
    for split, split_items in items.items():
        arrays = [read(p, mode) for p, _ in tqdm(split_items, desc=f"reading {cfg.name}/{split}", unit="img",
                                                 mininterval=2.0)]
        out[split] = (_stack(arrays, [str(p) for p, _ in split_items]),
                      np.array([c for _, c in split_items], dtype=np.int64))
    return out


def _mode(cfg: ImageConfig, modes) -> str:
    channels = cfg.channels or (1 if all(m in _GRAY_MODES for m in modes) else 3)
    return "L" if channels == 1 else "RGB"


def _read_hf(cfg: ImageConfig) -> tuple[dict, list[str]]:
    import datasets

    loaded = {}
    for split, source_split in cfg.splits.items():
        ds = datasets.load_dataset(cfg.hf_path, cfg.hf_name, split=source_split, revision=cfg.hf_revision,
                                   data_dir=cfg.hf_data_dir, data_files=cfg.hf_data_files,
                                   cache_dir=cfg.hf_cache_dir)
        for field in (cfg.image_field, cfg.label_field):
            if field not in ds.column_names:
                raise ValueError(f"hf dataset {cfg.hf_path!r} split {source_split!r} has no column {field!r}; "
                                 f"columns: {ds.column_names} (set data.image_field / data.label_field)")
        loaded[split] = ds
    feature = loaded["train"].features[cfg.label_field]
    names = getattr(feature, "names", None)
    labels = {s: np.asarray(ds[cfg.label_field], dtype=np.int64) for s, ds in loaded.items()}
    if names is None:
        names = [str(c) for c in range(int(max(lab.max() for lab in labels.values())) + 1)]
    decoded = {s: [row[cfg.image_field] for row in tqdm(ds.select_columns([cfg.image_field]), unit="img",
                                                       desc=f"decoding {cfg.name}/{s}", mininterval=2.0)]
               for s, ds in loaded.items()}
    mode = _mode(cfg, [img.mode for imgs in decoded.values() for img in imgs])
    out = {}
    for split, imgs in decoded.items():
        arrays = [_to_array(img, mode, cfg.image_size) for img in imgs]
        out[split] = (_stack(arrays, [f"{split}[{i}]" for i in range(len(arrays))]), labels[split])
    return out, list(names)


def _cached(cfg: ImageConfig) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    options = dict(image_size=cfg.image_size, channels=cfg.channels)
    if cfg.source == "folder":
        items, classes = _folder_splits(cfg)
        listing = {s: [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns, c] for p, c in its]
                   for s, its in items.items()}
        key = dict(kind="image", source="folder", files=listing, **options)

        def read():
            return _read_folder(cfg, items), classes
    else:
        key = dict(kind="image", source="hf", path=cfg.hf_path, name=cfg.hf_name, revision=cfg.hf_revision,
                   data_dir=cfg.hf_data_dir, data_files=cfg.hf_data_files, splits=cfg.splits,
                   fields=[cfg.image_field, cfg.label_field], **options)

        def read():
            return _read_hf(cfg)

    def build(writer) -> dict:
        splits, names = read()
        for split, (images, labels) in splits.items():
            writer.append(f"{split}_images", images)
            writer.append(f"{split}_labels", labels)
        return dict(class_names=names, splits=sorted(splits))

    arrays, extra = ArrayCache(cfg.cache_dir, cfg.name, key).get_or_build(build, cfg.verify, cfg.repair_cache)
    return {s: (arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in extra["splits"]}, extra["class_names"]


def _carve(splits: dict, cfg: ImageConfig) -> dict:
    from sklearn.model_selection import train_test_split

    pool_images, pool_labels = splits["train"]
    keep = np.arange(len(pool_labels))
    out = {}
    for split in ("test", "val"):
        if split in splits:
            out[split] = splits[split]
            continue
        frac = getattr(cfg, f"{split}_fraction")
        if frac == 0:
            continue
        try:
            keep, held = train_test_split(keep, test_size=frac, stratify=pool_labels[keep],
                                          random_state=cfg.split_seed)
        except ValueError as e:
            raise ValueError(f"cannot carve a stratified {split} split ({split}_fraction={frac}) from "
                             f"{len(keep)} training images: {e}") from e
        held = np.sort(held)
        out[split] = (pool_images[held], pool_labels[held])
        keep = np.sort(keep)
    out["train"] = (pool_images[keep], pool_labels[keep])
    return out


# ------------------------------------------------------------------------------------------------- data

def augment_batch(images: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None,
                  padding: int, mean: torch.Tensor, std: torch.Tensor,
                  rand_augment: tuple[Callable, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> normalized float32: crop ``[oy : oy+H, ox : ox+W]`` of the zero-padded image
    (``offsets`` int ``[B, 2]`` in ``[0, 2*padding]``), mirror rows where ``flips``, then ``rand_augment``'s
    ``(transform, seeds)``: image ``i`` (float in [0, 1]) through ``transform`` with torch's global generator
    seeded by ``seeds[i]`` (restored afterwards), then normalize."""
    x = images.to(torch.float32).div_(255.0)
    B, C, H, W = x.shape
    if offsets is not None and padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
        rows = (offsets[:, 0, None] + torch.arange(H))[:, None, :, None]
        cols = (offsets[:, 1, None] + torch.arange(W))[:, None, None, :]
        x = x[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]
    if flips is not None:
        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    if rand_augment is not None:
        transform, seeds = rand_augment
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator
            out = []
            for image, seed in zip(x, seeds.tolist()):
                torch.manual_seed(seed)
                out.append(transform(image))
        x = torch.stack(out)
    return (x - mean[:, None, None]) / std[:, None, None]


def rand_augment_transform(cfg: ImageConfig) -> Callable | None:
    """torchvision's RandAugment with the config's ops and magnitude, or None when ``randaugment_ops`` is 0. A
    missing or broken torchvision fails here, before any work, with the install line."""
    if not cfg.randaugment_ops:
        return None
    try:
        from torchvision.transforms import v2
    except Exception as e:  # ImportError, or a torchvision built for another torch (its operators fail to load)
        raise RuntimeError(f"data.randaugment_ops={cfg.randaugment_ops} needs torchvision built for this torch "
                           f"{torch.__version__} (pip install torchvision; see pytorch.org for the matching "
                           f"build): {type(e).__name__}: {e}") from e
    return v2.RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude)


def mix_batch(x: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              mix_prob: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix of the normalized batch ``x`` [B, C, H, W] with itself reversed (see the module docstring);
    every draw comes from ``g``. Returns the mixed images and float32 soft targets ``[B, num_classes]``."""
    draws = torch.rand(4, generator=g, dtype=torch.float64).tolist()
    beta = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
    targets = F.one_hot(labels, num_classes).to(torch.float32)
    use_mixup = mixup_alpha > 0 and (cutmix_alpha == 0 or draws[1] < 0.5)
    if draws[0] >= mix_prob or (mixup_alpha == 0 and cutmix_alpha == 0):
        return x, targets
    partner = x.flip(0)
    if use_mixup:
        lam = float(beta.beta(mixup_alpha, mixup_alpha))
        x = x * lam + partner * (1 - lam)
    else:  # a box of about (1 - lam) of the image, centred anywhere, clipped at the edges, takes the partner's pixels
        H, W = x.shape[-2:]
        cut = math.sqrt(1 - float(beta.beta(cutmix_alpha, cutmix_alpha)))
        cy, cx = int(draws[2] * H), int(draws[3] * W)
        y0, y1 = max(cy - int(H * cut) // 2, 0), min(cy + int(H * cut) // 2, H)
        x0, x1 = max(cx - int(W * cut) // 2, 0), min(cx + int(W * cut) // 2, W)
        x = x.clone()
        x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    return x, targets * lam + targets.flip(0) * (1 - lam)


class _ImageBatches:
    """What ``ImageData`` (splits in memory) and ``StreamImageData`` (splits on disk) share: the split and label
    checks, the normalization constants, the arguments of ``eval_batches`` and the resume state. A subclass sets
    ``splits`` ({split: (images or paths, int64 labels)}) before calling ``_setup``."""

    task = "image"

    def _setup(self, cfg: ImageConfig, class_names: list[str], image_shape: tuple[int, int, int], estimate,
               seed: int, rank: int, world_size: int) -> None:
        """``estimate()``: the train split's per-channel (mean, std), called only when the config leaves one null."""
        self.cfg = cfg
        self.name = cfg.name
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        for split, (_, lab) in self.splits.items():
            if len(lab) == 0:
                raise ValueError(f"data {cfg.name!r} split {split!r} is empty")
            if lab.min() < 0 or lab.max() >= self.num_classes:
                raise ValueError(f"data {cfg.name!r} split {split!r} has labels outside [0, {self.num_classes})")
        self.image_shape = tuple(image_shape)
        C = self.image_shape[0]
        mean, std = estimate() if cfg.mean is None or cfg.std is None else (None, None)
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32) if cfg.mean is not None else mean
        self.std = torch.tensor(cfg.std, dtype=torch.float32) if cfg.std is not None else std
        if self.mean.shape != (C,) or self.std.shape != (C,):
            raise ValueError(f"mean/std need {C} values (one per channel), got {cfg.mean} / {cfg.std}")
        self._sampler = Sampler(seed, rank, world_size)
        self._epoch = 0
        self._position = 0
        self.rand_augment = rand_augment_transform(cfg)

    def _mixed(self, x: torch.Tensor, labels: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch number ``batch`` after MixUp/CutMix (soft targets), or as it is when both are off."""
        cfg = self.cfg
        if cfg.mixup_alpha == 0 and cfg.cutmix_alpha == 0:
            return x, labels
        return mix_batch(x, labels, self.num_classes, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob,
                         stream_generator(self._sampler.seed, "mix", batch))

    def _eval_size(self, split: str, batch_size: int, max_batches: int | None) -> int:
        """How many images of ``split`` ``eval_batches`` yields, once its arguments are checked."""
        if split not in self.splits:
            raise ValueError(f"data {self.name!r} has no {split!r} split (has {sorted(self.splits)})")
        check_positive_int("batch_size", batch_size)
        if max_batches is not None:
            check_positive_int("max_batches", max_batches)
        total = len(self.splits[split][1])
        return total if max_batches is None else min(total, batch_size * max_batches)

    def state_dict(self) -> dict:
        return {"task": "image", "batches": self._sampler.batches, "epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        if state.get("task") != "image" or not all(isinstance(state.get(k), int)
                                                   for k in ("batches", "epoch", "position")):
            raise ValueError(f"not an image data state: {state!r}")
        if not 0 <= state["position"] < len(self.splits["train"][1]):
            raise ValueError(f"image data state position {state['position']} is outside the train split")
        self._sampler.batches, self._epoch, self._position = state["batches"], state["epoch"], state["position"]


class ImageData(_ImageBatches):
    """Augmented, normalized image batches; see the module docstring and ``training.data.common``."""

    def __init__(self, cfg: ImageConfig, splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str],
                 seed: int, rank: int = 0, world_size: int = 1):
        self.splits = {s: (torch.from_numpy(np.array(im)), torch.from_numpy(np.array(lab, dtype=np.int64)))
                       for s, (im, lab) in splits.items()}
        images = self.splits["train"][0]
        self._setup(cfg, class_names, images.shape[1:], lambda: _channel_stats(images), seed, rank, world_size)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(lab):,}" for s, (_, lab) in self.splits.items())
        return f"ImageData({self.name!r}, {self.image_shape}, {self.num_classes} classes, images: {sizes})"

    def _permutation(self, epoch: int) -> torch.Tensor:
        n = len(self.splits["train"][1])
        return torch.randperm(n, generator=stream_generator(self._sampler.seed, "epoch", epoch))

    def _take(self, n: int) -> torch.Tensor:
        size = len(self.splits["train"][1])
        parts, need = [], n
        while need:
            k = min(need, size - self._position)
            parts.append(self._permutation(self._epoch)[self._position: self._position + k])
            self._position += k
            need -= k
            if self._position == size:
                self._epoch, self._position = self._epoch + 1, 0
        return torch.cat(parts)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``batch_size`` training images (float32 ``[B, C, H, W]``) and labels (int64 ``[B]``; with
        MixUp/CutMix on, float32 soft targets ``[B, num_classes]``)."""
        s = self._sampler
        n = s.global_size(batch_size)
        index = self._take(n)
        g = s.generator("augment")
        pad = self.cfg.crop_padding
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g) if pad else None
        flips = torch.rand(n, generator=g) < 0.5 if self.cfg.hflip else None
        seeds = torch.randint(0, 2**62, (n,), generator=g) if self.rand_augment else None
        s.batches += 1
        mine = s.mine(batch_size)
        images, labels = self.splits["train"]
        x = augment_batch(images[index[mine]], offsets[mine] if offsets is not None else None,
                          flips[mine] if flips is not None else None, pad, self.mean, self.std,
                          (self.rand_augment, seeds[mine]) if seeds is not None else None)
        return self._mixed(x, labels[index[mine]], s.batches - 1)

    def eval_batches(self, split: str, batch_size: int,
                     max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split in order, normalized, unaugmented (the whole split unless ``max_batches``); the same on
        every rank."""
        n = self._eval_size(split, batch_size, max_batches)
        images, labels = self.splits[split]

        def batches():
            for i in range(0, n, batch_size):
                j = min(i + batch_size, n)
                yield augment_batch(images[i:j], None, None, 0, self.mean, self.std), labels[i:j]
        return batches()


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of uint8 images on the [0, 1] scale, in float64 chunks (no full float copy)."""
    C = images.shape[1]
    total = torch.zeros(C, dtype=torch.float64)
    squares = torch.zeros(C, dtype=torch.float64)
    for i in range(0, len(images), 4096):
        chunk = images[i: i + 4096].to(torch.float64).div_(255.0)
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square().sum(dim=(0, 2, 3))
    count = images.numel() // C
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def build_image_data(cfg_dict: dict, seed: int, rank: int = 0,
                     world_size: int = 1) -> ImageData | StreamImageData:
    cfg = parse_config(ImageConfig, cfg_dict)
    if cfg.stream:
        items, names = _folder_splits(cfg)
        splits = {s: (np.array([str(p) for p, _ in its], dtype=object), np.array([c for _, c in its], dtype=np.int64))
                  for s, its in items.items()}
        return StreamImageData(cfg, _carve(splits, cfg), names, seed, rank, world_size)
    if cfg.source == "digits":
        splits, names = _digits()
    else:
        splits, names = _cached(cfg)
    return ImageData(cfg, _carve(splits, cfg), names, seed, rank, world_size)


# ---------------------------------------------------------------------------------------------- streaming

class _FolderImages(torch.utils.data.Dataset):
    """Item ``(i, aug_seed)`` of a split: image ``i`` read from disk, resized, augmented with draws from a
    generator seeded by ``aug_seed`` (none when it is -1), normalized; and its label. The draws depend on the
    seed only, never on which worker loads the image, so batches are the same for any ``num_workers``."""

    def __init__(self, paths, labels, mode: str, size: int, padding: int, hflip: bool, mean, std,
                 rand_augment: Callable | None = None):
        self.paths, self.labels = list(paths), torch.as_tensor(labels)
        self.mode, self.size, self.padding, self.hflip = mode, size, padding, hflip
        self.mean, self.std, self.rand_augment = mean, std, rand_augment

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.paths[i]) as img:
                return torch.from_numpy(_to_array(img, self.mode, self.size).copy())
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"data.root: cannot read image {self.paths[i]!r}: {e}") from e

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, aug_seed = key
        image = self.read(i)[None]
        offsets = flips = rand_augment = None
        if aug_seed >= 0:
            g = torch.Generator().manual_seed(aug_seed)
            if self.padding:
                offsets = torch.randint(0, 2 * self.padding + 1, (1, 2), generator=g)
            if self.hflip:
                flips = torch.rand(1, generator=g) < 0.5
            if self.rand_augment:
                rand_augment = (self.rand_augment, torch.randint(0, 2**62, (1,), generator=g))
        x = augment_batch(image, offsets, flips, self.padding, self.mean, self.std, rand_augment)
        return x[0], self.labels[i]


class _Keys:
    """The DataLoader's batch sampler: this rank's ``(index, aug_seed)`` lists, batch after batch, from the data
    state (epoch, position, batch count) as it was when the loader was (re)started."""

    def __init__(self, data: "StreamImageData"):
        self.data = data
        self.start: tuple[int, int, int] | None = None
        self.batch_size = 1

    def __iter__(self):
        epoch, position, batches = self.start
        while True:
            index, epoch, position = self.data._order(epoch, position, self.data._sampler.global_size(self.batch_size))
            seeds = torch.randint(0, 2**62, (len(index),),
                                  generator=stream_generator(self.data._sampler.seed, "augment", batches))
            mine = self.data._sampler.mine(self.batch_size)
            yield list(zip(index[mine].tolist(), seeds[mine].tolist()))
            batches += 1


class StreamImageData(_ImageBatches):
    """``ImageData``'s interface over an image folder larger than RAM: images are read from disk per sample by a
    ``torch.utils.data.DataLoader`` (``num_workers`` processes, ``prefetch_factor``, persistent workers, pinned
    batches when CUDA is available), resized to ``image_size``, cropped/flipped as ``ImageData`` does and
    normalized.

    Order and resume: the same epoch permutations as ``ImageData`` (seeded by ``(seed, epoch)``), global batches
    sliced per rank, and each sample's augmentation seeded from ``(seed, batch count)``, so batches do not depend
    on ``num_workers`` or on which worker read them. ``state_dict`` counts the batches handed to the trainer (not
    those prefetched); after ``load_state_dict`` the loader restarts at exactly that point, so resume is exact.
    ``mean``/``std`` null: estimated from up to 256 train images spread evenly over the split."""

    def __init__(self, cfg: ImageConfig, splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str],
                 seed: int, rank: int = 0, world_size: int = 1):
        from PIL import Image

        paths, _ = splits["train"]
        if cfg.channels is None:
            with Image.open(paths[0]) as img:
                mode = _mode(cfg, [img.mode])
        else:
            mode = _mode(cfg, [])
        C, S = (1 if mode == "L" else 3), cfg.image_size
        self.splits = {s: (list(p), torch.from_numpy(np.array(lab, dtype=np.int64))) for s, (p, lab) in splits.items()}

        def estimate():
            probe = _FolderImages(paths, splits["train"][1], mode, S, 0, False, None, None)
            picks = np.unique(np.linspace(0, len(paths) - 1, min(256, len(paths))).astype(int))
            return _channel_stats(torch.stack([probe.read(int(i)) for i in picks]))
        self._setup(cfg, class_names, (C, S, S), estimate, seed, rank, world_size)
        self._datasets = {s: _FolderImages(p, lab, mode, S, cfg.crop_padding if s == "train" else 0,
                                           cfg.hflip and s == "train", self.mean, self.std,
                                           self.rand_augment if s == "train" else None)
                          for s, (p, lab) in splits.items()}
        self._keys = _Keys(self)
        self._perm = None
        self._loader = None
        self._batches = None                  # the running iterator, or None: (re)start at the state

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(lab):,}" for s, (_, lab) in self.splits.items())
        return (f"StreamImageData({self.name!r}, {self.image_shape}, {self.num_classes} classes, images: {sizes}, "
                f"num_workers={self.cfg.num_workers})")

    def _order(self, epoch: int, position: int, n: int) -> tuple[torch.Tensor, int, int]:
        size = len(self.splits["train"][1])
        parts = []
        while n:
            k = min(n, size - position)
            if self._perm is None or self._perm[0] != epoch:   # one permutation per epoch, not per batch
                self._perm = (epoch, torch.randperm(size, generator=stream_generator(self._sampler.seed, "epoch",
                                                                                     epoch)))
            perm = self._perm[1]
            parts.append(perm[position: position + k])
            position, n = position + k, n - k
            if position == size:
                epoch, position = epoch + 1, 0
        return torch.cat(parts), epoch, position

    def _make_loader(self, dataset, batch_sampler, persistent: bool):
        workers = self.cfg.num_workers
        # forkserver, not fork: the training process holds threads, and a fork that copies a held lock hangs
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=persistent and workers > 0,
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            multiprocessing_context="forkserver" if workers else None)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``batch_size`` training images and labels, as ``ImageData.next_batch``."""
        n = self._sampler.global_size(batch_size)
        if self._batches is None or self._keys.batch_size != batch_size:
            if self._loader is None:
                self._loader = self._make_loader(self._datasets["train"], self._keys, persistent=True)
            self._keys.start = (self._epoch, self._position, self._sampler.batches)
            self._keys.batch_size = batch_size
            self._batches = iter(self._loader)    # persistent workers: reset, not restarted
        batch = next(self._batches)
        size = len(self.splits["train"][1])
        self._epoch, self._position = self._epoch + (self._position + n) // size, (self._position + n) % size
        self._sampler.batches += 1
        x, y = self._mixed(*batch, self._sampler.batches - 1)
        pinned = batch[0].is_pinned()  # mixing made new tensors: pin them as the loader did
        return (x.pin_memory(), y.pin_memory()) if pinned and not x.is_pinned() else (x, y)

    def eval_batches(self, split: str, batch_size: int,
                     max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split in order, normalized, unaugmented (the whole split unless ``max_batches``); the same on
        every rank."""
        n = self._eval_size(split, batch_size, max_batches)
        keys = [[(i, -1) for i in range(a, min(a + batch_size, n))] for a in range(0, n, batch_size)]
        return iter(self._make_loader(self._datasets[split], keys, persistent=False))

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._batches = None  # the next batch restarts the loader at the loaded state
