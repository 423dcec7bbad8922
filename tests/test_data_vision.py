"""Image data: the digits default, image folders, hf datasets (offline), augmentation, resume, DDP slicing.

Every test runs offline: IP sockets are refused, so any network access fails the test."""
from __future__ import annotations

import json
from pathlib import Path
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from training.data import CacheError, build_data
from training.data import vision as vision_mod
from training.data.vision import ImageConfig, ImageData, augment_batch


pytestmark = pytest.mark.usefixtures("no_network")  # real code paths, local data only


def reference_augment(images, offsets, flips, padding, mean, std):
    """One image at a time, the textbook way: pad, slice the crop, mirror, normalize."""
    out = []
    for i in range(len(images)):
        x = images[i].double() / 255
        if offsets is not None and padding:
            oy, ox = offsets[i].tolist()
            x = F.pad(x, (padding,) * 4)[:, oy: oy + images.shape[2], ox: ox + images.shape[3]]
        if flips is not None and flips[i]:
            x = x.flip(-1)
        out.append((x - mean.double()[:, None, None]) / std.double()[:, None, None])
    return torch.stack(out)


def synthetic(n=37, C=3, H=5, W=7, classes=4, **cfg) -> ImageData:
    """Images whose first two pixels encode their index, so batches can be traced back to it."""
    g = np.random.default_rng(0)
    images = g.integers(0, 256, (n, C, H, W), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 0, 1] = np.arange(n) // 256
    labels = np.arange(n) % classes
    config = ImageConfig(name="synthetic", val_fraction=0, test_fraction=0, **cfg)
    return ImageData(config, {"train": (images, labels)}, [f"c{i}" for i in range(classes)], seed=0)


def indices(data: ImageData, x: torch.Tensor) -> list[int]:
    raw = torch.round((x * data.std[:, None, None] + data.mean[:, None, None]) * 255).to(torch.int64)
    return (raw[:, 0, 0, 0] + 256 * raw[:, 0, 0, 1]).tolist()


# ---------------------------------------------------------------------------------------------------- digits

def test_digits_default_split_is_fixed_stratified_and_complete():
    from sklearn.datasets import load_digits

    data = build_data({"task": "image"}, seed=0)
    assert data.task == "image" and data.image_shape == (1, 8, 8) and data.num_classes == 10
    sizes = {s: len(lab) for s, (_, lab) in data.splits.items()}
    assert sizes == {"train": 1293, "val": 144, "test": 360}
    raw = load_digits()
    expected = Counter((np.rint(im * 255 / 16).astype(np.uint8).tobytes(), int(t))
                       for im, t in zip(raw.images, raw.target))
    got = Counter((im.numpy().tobytes(), int(t)) for s in data.splits.values() for im, t in zip(*s))
    assert got == expected  # a partition of the 1797 images, labels kept with their images
    overall = np.bincount(raw.target, minlength=10) / len(raw.target)
    for split, (_, lab) in data.splits.items():
        share = np.bincount(lab.numpy(), minlength=10)
        assert np.all(np.abs(share - overall * len(lab)) <= 1.5), split  # stratified
    again = build_data({"task": "image", "hflip": True}, seed=5)
    assert torch.equal(again.splits["test"][0], data.splits["test"][0])  # fixed, independent of the seed


def test_normalization_uses_train_statistics_and_eval_is_unaugmented():
    data = build_data({"task": "image"}, seed=0)
    train = data.splits["train"][0].double() / 255
    torch.testing.assert_close(data.mean.double(), train.mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(data.std.double(), train.std(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=0)
    batches = list(data.eval_batches("test", 100))
    assert [len(y) for _, y in batches] == [100, 100, 100, 60]
    x = torch.cat([b[0] for b in batches])
    images, labels = data.splits["test"]
    expected = (images.double() / 255 - data.mean.double()[:, None, None]) / data.std.double()[:, None, None]
    torch.testing.assert_close(x.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)
    assert sum(len(y) for _, y in data.eval_batches("val", 64, max_batches=2)) == 128
    x, y = data.next_batch(33)
    assert x.shape == (33, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64


# ------------------------------------------------------------------------------------------- augmentation

@given(B=st.integers(1, 6), C=st.sampled_from([1, 3]), H=st.integers(1, 9), W=st.integers(1, 9),
       padding=st.integers(0, 4), flip=st.booleans(), crop=st.booleans(), seed=st.integers(0, 10**6))
def test_augment_batch_matches_per_image_reference(B, C, H, W, padding, flip, crop, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, C, H, W), generator=g, dtype=torch.uint8)
    images[0, 0, 0, 0] = 255  # extremes present
    images[-1, -1, -1, -1] = 0
    offsets = torch.randint(0, 2 * padding + 1, (B, 2), generator=g) if crop else None
    flips = torch.rand(B, generator=g) < 0.5 if flip else None
    mean = torch.rand(C, generator=g)
    std = torch.rand(C, generator=g) + 0.05
    got = augment_batch(images, offsets, flips, padding, mean, std)
    expected = reference_augment(images, offsets, flips, padding, mean, std)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_training_batches_walk_epoch_permutations():
    data = synthetic(crop_padding=0, hflip=False)
    seen = []
    for _ in range(9):  # 9 * 10 = 90 > 2 epochs of 37: batches straddle epoch ends
        x, y = data.next_batch(10)
        idx = indices(data, x)
        assert y.tolist() == [i % 4 for i in idx]
        seen += idx
    assert sorted(seen[:37]) == list(range(37)) and sorted(seen[37:74]) == list(range(37))
    assert seen[:37] != seen[37:74]  # a fresh permutation each epoch
    assert data.state_dict() == {"task": "image", "batches": 9, "epoch": 2, "position": 16}


def test_augmented_batches_resume_and_ddp_slices_exactly():
    def fresh(rank=0, world=1):
        d = synthetic(crop_padding=2, hflip=True)
        return ImageData(d.cfg, {"train": tuple(t.numpy() for t in d.splits["train"])}, d.class_names,
                         seed=7, rank=rank, world_size=world)

    single, r0, r1 = fresh(), fresh(0, 2), fresh(1, 2)
    for _ in range(5):
        x, y = single.next_batch(8)
        (x0, y0), (x1, y1) = r0.next_batch(4), r1.next_batch(4)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    state = json.loads(json.dumps(single.state_dict()))
    expected = [single.next_batch(6) for _ in range(8)]
    resumed = fresh()
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [resumed.next_batch(6) for _ in range(8)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    # Same seed, no augmentation: the same images in the same order (the permutation does not depend on it).
    plain = synthetic(crop_padding=0, hflip=False)
    plain = ImageData(plain.cfg, {"train": tuple(t.numpy() for t in plain.splits["train"])}, plain.class_names,
                      seed=7)
    plain.load_state_dict(state)
    images = single.splits["train"][0]
    used = set()
    for x, _ in expected:
        for img, idx in zip(x, indices(plain, plain.next_batch(6)[0])):
            combos = [(oy, ox, fl) for oy in range(5) for ox in range(5) for fl in (False, True)
                      if torch.allclose(reference_augment(images[idx: idx + 1], torch.tensor([[oy, ox]]),
                                                          torch.tensor([fl]), 2, single.mean, single.std)[0].float(),
                                        img, atol=1e-5)]
            assert combos, "a training image is not a padded crop / flip of its source image"
            used.add(combos[0])
    assert len(used) > 5  # crops and flips vary
    with pytest.raises(ValueError, match="outside the train split"):
        resumed.load_state_dict(dict(state, position=10**6))


# ------------------------------------------------------------------------------------------- image folder

def make_folder(root, layout="splits", sizes=(6, 6), n=6):
    g = np.random.default_rng(1)
    splits = {"train": n, "test": 2} if layout == "splits" else {"": n}
    for split, count in splits.items():
        for c, cls in enumerate(["cat", "dog", "eel"]):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                a = g.integers(0, 256, (*sizes, 3), dtype=np.uint8)
                img = Image.fromarray(a) if (i + c) % 2 else Image.fromarray(a[..., 0], mode="L")
                img.save(d / f"{i}.png")
    return root


def test_image_folder_reads_caches_and_carves(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs")
    cfg = dict(task="image", name="pets", source="folder", root=str(root), cache_dir=str(tmp_path / "cache"),
               val_fraction=0.3)
    data = build_data(cfg, seed=0)
    assert data.class_names == ["cat", "dog", "eel"] and data.image_shape == (3, 6, 6)
    assert {s: len(lab) for s, (_, lab) in data.splits.items()} == {"train": 12, "val": 6, "test": 6}
    first = Image.open(root / "test" / "cat" / "0.png").convert("RGB")
    assert torch.equal(data.splits["test"][0][0], torch.from_numpy(np.array(first)).permute(2, 0, 1))
    with monkeypatch.context() as m:
        m.setattr(vision_mod, "_read_folder", lambda *a: pytest.fail("decoded again despite a complete cache"))
        cached = build_data(cfg, seed=0)
    assert torch.equal(cached.splits["train"][0], data.splits["train"][0])
    resized = build_data(dict(cfg, image_size=4, channels=1), seed=0)
    assert resized.image_shape == (1, 4, 4)
    flat = build_data(dict(cfg, root=str(make_folder(tmp_path / "flat", layout="flat")), name="flat"), seed=0)
    # test: ceil(0.2 * 18) = 4, then val: ceil(0.3 * 14) = 5
    assert {s: len(lab) for s, (_, lab) in flat.splits.items()} == {"train": 9, "val": 5, "test": 4}


def test_image_folder_errors(tmp_path):
    base = dict(task="image", source="folder", cache_dir=str(tmp_path / "cache"), val_fraction=0.3)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_data(dict(base, root=str(tmp_path / "missing")), seed=0)
    root = make_folder(tmp_path / "a")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "train" / "dog" / "big.png")
    with pytest.raises(ValueError, match="big.png.*image_size|image_size"):
        build_data(dict(base, root=str(root)), seed=0)
    (root / "train" / "dog" / "big.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot read image .*big.png"):
        build_data(dict(base, root=str(root)), seed=0)
    (root / "train" / "dog" / "big.png").unlink()
    (root / "test" / "fox").mkdir()
    with pytest.raises(ValueError, match=r"classes \['fox'\]"):
        build_data(dict(base, root=str(root)), seed=0)
    (root / "test" / "fox").rmdir()
    data = build_data(dict(base, root=str(root), name="ok"), seed=0)
    images_bin = next(data_dir for data_dir in (tmp_path / "cache").iterdir() if data_dir.name.startswith("ok"))
    with open(images_bin / "train_images.bin", "r+b") as f:
        f.truncate(50)
    with pytest.raises(CacheError, match="train_images.bin has 50 bytes"):
        build_data(dict(base, root=str(root), name="ok"), seed=0)
    for bad, message in [(dict(channels=2), "channels"), (dict(crop_padding=-1), "crop_padding"),
                         (dict(val_fraction=1.0), "val_fraction"),
                         (dict(colour=True), r"unknown setting\(s\) data.colour"),
                         (dict(std=[0.0]), "std"), (dict(mean=[0.5, 0.5]), "one per channel")]:
        with pytest.raises(ValueError, match=message):
            build_data({"task": "image", **bad}, seed=0)
    data = build_data({"task": "image"}, seed=0)
    with pytest.raises(ValueError, match="no 'dev' split"):
        data.eval_batches("dev", 4)
    with pytest.raises(ValueError, match="batch_size"):
        data.next_batch(-1)


def test_hf_image_dataset_offline(tmp_path):
    root = make_folder(tmp_path / "imgs")
    cfg = dict(task="image", name="hfpets", source="hf", hf_path="imagefolder", hf_data_dir=str(root),
               hf_cache_dir=str(tmp_path / "hf"), cache_dir=str(tmp_path / "cache"), image_size=4,
               val_fraction=0.3)
    data = build_data(cfg, seed=0)
    assert data.class_names == ["cat", "dog", "eel"] and data.image_shape == (3, 4, 4)
    assert {s: len(lab) for s, (_, lab) in data.splits.items()} == {"train": 12, "val": 6, "test": 6}
    assert sorted(data.splits["test"][1].tolist()) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="no column 'img'"):
        build_data(dict(cfg, image_field="img", name="x"), seed=0)


def test_every_image_data_config_is_valid():
    from omegaconf import OmegaConf

    from training.data.common import parse_config

    found = []
    for path in sorted((Path(__file__).resolve().parents[1] / "configs" / "data").glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        if cfg["task"] != "image":
            continue
        cfg.update({k: v for k, v in {"root": "imgs"}.items() if cfg.get(k) == "???"})
        parsed = parse_config(vision_mod.ImageConfig, cfg)  # unknown keys or bad values raise
        found.append(parsed.name)
    assert len(found) >= 6, found


# ------------------------------------------------------------------------------------- streamed image folder

def make_stream_folder(root, n=24, classes=("cat", "dog", "eel"), size=6):
    """``n`` RGB PNGs, ``n / len(classes)`` per class, whose pixel (0, 0) holds the image's index in red."""
    g = np.random.default_rng(2)
    for i in range(n):
        d = root / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        a = g.integers(0, 256, (size, size, 3), dtype=np.uint8)
        a[0, 0, 0] = i
        Image.fromarray(a).save(d / f"{i:03d}.png")
    return root


def stream_cfg(root, **over):
    return dict(dict(task="image", name="streamed", source="folder", root=str(root), stream=True, image_size=6,
                     val_fraction=0, test_fraction=0, num_workers=0), **over)


def test_stream_batches_cover_each_epoch_once_per_rank_split(tmp_path):
    root = make_stream_folder(tmp_path / "imgs")
    plain = dict(crop_padding=0, hflip=False, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    ranks = [build_data(stream_cfg(root, **plain), seed=3, rank=r, world_size=2) for r in range(2)]
    assert type(ranks[0]).__name__ == "StreamImageData" and ranks[0].image_shape == (3, 6, 6)
    assert ranks[0].class_names == ["cat", "dog", "eel"]
    for epoch in range(2):
        seen = []
        for _ in range(3):  # 3 global batches of 2 x 4 = the 24 images
            for data in ranks:
                x, y = data.next_batch(4)
                assert x.shape == (4, 3, 6, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
                index = torch.round(x[:, 0, 0, 0] * 255).to(torch.int64)
                assert torch.equal(y, index % 3)  # image i is in class i % 3
                seen += index.tolist()
        assert sorted(seen) == list(range(24)), epoch
    # the ranks' batches are rows of the one-process global batch
    single = build_data(stream_cfg(root, **plain), seed=3)
    ranks = [build_data(stream_cfg(root, **plain), seed=3, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(single.next_batch(8)[0], torch.cat([d.next_batch(4)[0] for d in ranks]))


def test_stream_is_deterministic_for_any_workers_and_resumes_exactly(tmp_path):
    root = make_stream_folder(tmp_path / "imgs")
    a = build_data(stream_cfg(root), seed=5)
    b = build_data(stream_cfg(root, num_workers=2, prefetch_factor=1), seed=5)
    first = [a.next_batch(5) for _ in range(3)]
    state = a.state_dict()
    rest = [a.next_batch(5) for _ in range(3)]
    for (xa, ya), (xb, yb) in zip(first + rest, [b.next_batch(5) for _ in range(6)]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # augmented, yet the same with 2 workers
    assert not torch.equal(first[0][0], first[1][0])
    b.load_state_dict(state)  # back, with batches already prefetched past it
    for xa, ya in rest:
        xb, yb = b.next_batch(5)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # evaluation reads the split in order, unaugmented
    c = build_data(stream_cfg(root, test_fraction=0.25), seed=5)
    batches = list(c.eval_batches("test", 4))
    assert [len(y) for _, y in batches] == [4, 2] and batches[0][0].shape == (4, 3, 6, 6)


@pytest.mark.parametrize("override, message", [
    (dict(num_workers=-1), "num_workers must be an int >= 0, got -1"),
    (dict(prefetch_factor=0), "prefetch_factor must be a positive int, got 0"),
    (dict(image_size=None), "stream=true needs image_size"),
    (dict(source="digits"), "stream=true is for source=folder"),
])
def test_stream_bad_settings_name_the_key(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        build_data(stream_cfg(tmp_path, **override), seed=0)


# ------------------------------------------------------------------------------------------ mixup / cutmix

def mixed_kind(x, mx):
    """What mixing made ``mx`` of ``x`` and its partner ``x.flip(0)``, and the weight of ``x``: ("none", 1),
    ("mixup", w) for the blend ``w x + (1 - w) partner``, or ("cutmix", 1 - box area) for a box of partner pixels."""
    partner = x.flip(0)
    if torch.equal(mx, x):
        return "none", 1.0
    box = (mx != x).any(dim=(0, 1))
    if ((mx == x) | (mx == partner)).all() and box.sum() < box.numel():
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert box[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1].all()  # one rectangle
        return "cutmix", 1 - float(area) / box.numel()
    w = float(((mx - partner) * (x - partner)).sum() / (x - partner).square().sum())
    torch.testing.assert_close(mx, w * x + (1 - w) * partner, atol=1e-5, rtol=1e-5)
    return "mixup", w


@pytest.mark.parametrize("mix, kinds", [(dict(mixup_alpha=0.4), {"mixup"}), (dict(cutmix_alpha=1.0), {"cutmix"}),
                                        (dict(mixup_alpha=0.8, cutmix_alpha=1.0), {"mixup", "cutmix"})])
def test_mixed_batches_are_image_pairs_with_matching_soft_targets(mix, kinds):
    plain = synthetic(crop_padding=0, hflip=False)
    mixed = synthetic(crop_padding=0, hflip=False, **mix)
    seen = set()
    for _ in range(16):
        (x, y), (mx, my) = plain.next_batch(8), mixed.next_batch(8)
        assert my.shape == (8, 4) and my.dtype == torch.float32
        kind, w = mixed_kind(x, mx)
        seen.add(kind)
        onehot = F.one_hot(y, 4).float()
        torch.testing.assert_close(my, w * onehot + (1 - w) * onehot.flip(0), atol=1e-5, rtol=1e-5)
    assert seen - {"none"} == kinds


def test_mix_prob_zero_gives_one_hot_targets_and_eval_is_never_mixed():
    data = synthetic(crop_padding=0, hflip=False, mixup_alpha=1.0, mix_prob=0.0)
    plain = synthetic(crop_padding=0, hflip=False)
    (x, y), (mx, my) = plain.next_batch(8), data.next_batch(8)
    assert torch.equal(mx, x) and torch.equal(my, F.one_hot(y, 4).float())
    for (ex, ey), (px, py) in zip(data.eval_batches("train", 16), plain.eval_batches("train", 16)):
        assert torch.equal(ex, px) and torch.equal(ey, py) and ey.dtype == torch.int64


def test_mixed_batches_resume_and_ddp_slices_exactly():
    def fresh(rank=0, world=1):
        d = synthetic(crop_padding=0, hflip=True, mixup_alpha=0.5, cutmix_alpha=1.0)
        return ImageData(d.cfg, {"train": tuple(t.numpy() for t in d.splits["train"])}, d.class_names,
                         seed=3, rank=rank, world_size=world)
    a = fresh()
    for _ in range(3):
        a.next_batch(6)
    state = a.state_dict()
    expected = [a.next_batch(6) for _ in range(4)]
    b = fresh()
    b.load_state_dict(state)
    for (x, y), (bx, by) in zip(expected, [b.next_batch(6) for _ in range(4)]):
        assert torch.equal(x, bx) and torch.equal(y, by)
    # each rank mixes its slice of the global batch with that slice reversed, with the draws of the global batch
    def unmixed(rank):
        d = synthetic(crop_padding=0, hflip=True)
        return ImageData(d.cfg, {"train": tuple(t.numpy() for t in d.splits["train"])}, d.class_names,
                         seed=3, rank=rank, world_size=2)
    pairs = [(unmixed(rank), fresh(rank, 2)) for rank in range(2)]
    seen = set()
    for _ in range(20):
        kinds = [mixed_kind(plain.next_batch(3)[0], mixed.next_batch(3)[0]) for plain, mixed in pairs]
        assert kinds[0][0] == kinds[1][0] and kinds[0][1] == pytest.approx(kinds[1][1], abs=1e-5)
        seen.add(kinds[0][0])
    assert {"mixup", "cutmix"} <= seen


def test_stream_mixes_as_in_memory(tmp_path):
    root = make_stream_folder(tmp_path / "imgs")
    mix = dict(mixup_alpha=0.5, cutmix_alpha=1.0)
    a = build_data(stream_cfg(root, **mix), seed=5)
    b = build_data(stream_cfg(root, num_workers=2, prefetch_factor=1, **mix), seed=5)
    for _ in range(4):
        (xa, ya), (xb, yb) = a.next_batch(5), b.next_batch(5)
        assert ya.shape == (5, 3) and torch.equal(xa, xb) and torch.equal(ya, yb)
        torch.testing.assert_close(ya.sum(-1), torch.ones(5))


@pytest.mark.parametrize("override, message", [
    (dict(mixup_alpha=-0.1), "mixup_alpha must be a number >= 0"),
    (dict(cutmix_alpha="big"), "cutmix_alpha must be a number >= 0"),
    (dict(mix_prob=1.5), "mix_prob"),
])
def test_mix_bad_settings_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        synthetic(**override)


# ------------------------------------------------------------------------------------------------ RandAugment

class FakeRandAugment:
    """Stands in for torchvision.transforms.v2.RandAugment where no torchvision for this torch imports: scales
    each image by a draw from torch's global generator, as the real one draws its ops from it."""

    def __init__(self, num_ops, magnitude):
        self.num_ops, self.magnitude = num_ops, magnitude

    def __call__(self, image):
        return image * torch.rand(())


@pytest.fixture
def fake_torchvision(monkeypatch):
    import sys
    import types

    v2 = types.ModuleType("torchvision.transforms.v2")
    v2.RandAugment = FakeRandAugment
    transforms = types.ModuleType("torchvision.transforms")
    transforms.v2 = v2
    root = types.ModuleType("torchvision")
    root.transforms = transforms
    for name, module in (("torchvision", root), ("torchvision.transforms", transforms),
                         ("torchvision.transforms.v2", v2)):
        monkeypatch.setitem(sys.modules, name, module)


def test_randaugment_applies_per_image_with_seeded_draws_and_resumes(fake_torchvision):
    data = synthetic(crop_padding=0, hflip=False, randaugment_ops=2, randaugment_magnitude=7)
    plain = synthetic(crop_padding=0, hflip=False)
    assert isinstance(data.rand_augment, FakeRandAugment) and data.rand_augment.num_ops == 2
    assert data.rand_augment.magnitude == 7
    x, y = data.next_batch(6)
    px, py = plain.next_batch(6)
    assert torch.equal(y, py)
    # each image is its plain self (on the [0, 1] scale) times its own draw
    unnorm = x * data.std[:, None, None] + data.mean[:, None, None]
    punnorm = px * plain.std[:, None, None] + plain.mean[:, None, None]
    ratios = (unnorm.flatten(1).sum(1) / punnorm.flatten(1).sum(1))
    assert len(set(torch.round(ratios, decimals=4).tolist())) == 6 and (ratios < 1).all()
    state = data.state_dict()
    expected = [data.next_batch(6) for _ in range(3)]
    again = synthetic(crop_padding=0, hflip=False, randaugment_ops=2, randaugment_magnitude=7)
    again.load_state_dict(state)
    for (ex, ey), (ax, ay) in zip(expected, [again.next_batch(6) for _ in range(3)]):
        assert torch.equal(ex, ax) and torch.equal(ey, ay)
    # evaluation stays unaugmented
    for (ex, _), (px, _) in zip(data.eval_batches("train", 8), plain.eval_batches("train", 8)):
        assert torch.equal(ex, px)


def test_randaugment_leaves_the_global_generator_alone(fake_torchvision):
    data = synthetic(crop_padding=0, hflip=False, randaugment_ops=1)
    torch.manual_seed(123)
    data.next_batch(4)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


def test_stream_randaugment_matches_in_process_reads(tmp_path, fake_torchvision):
    root = make_stream_folder(tmp_path / "imgs")
    a = build_data(stream_cfg(root, randaugment_ops=2), seed=5)
    b = build_data(stream_cfg(root, randaugment_ops=2), seed=5)
    c = build_data(stream_cfg(root), seed=5)
    for _ in range(2):
        (xa, ya), (xb, yb), (xc, yc) = a.next_batch(4), b.next_batch(4), c.next_batch(4)
        assert torch.equal(xa, xb) and torch.equal(ya, yc) and not torch.equal(xa, xc)


def test_randaugment_without_a_working_torchvision_names_the_setting(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as where none is installed
    with pytest.raises(RuntimeError, match=r"data.randaugment_ops=2 needs torchvision built for this torch"):
        synthetic(randaugment_ops=2)


def test_randaugment_with_real_torchvision():
    pytest.importorskip("torchvision.transforms.v2", exc_type=ImportError)
    data = synthetic(n=8, C=3, H=16, W=16, crop_padding=0, hflip=False, randaugment_ops=2, randaugment_magnitude=9)
    x, _ = data.next_batch(4)
    assert x.shape == (4, 3, 16, 16) and torch.isfinite(x).all()


@pytest.mark.parametrize("override, message", [
    (dict(randaugment_ops=-1), "randaugment_ops must be an int >= 0"),
    (dict(randaugment_magnitude=31), r"randaugment_magnitude must be an int in \[0, 30\]"),
])
def test_randaugment_bad_settings_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        synthetic(**override)
