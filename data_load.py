"""Datasets and the class-balanced batch sampler.

Image sources (chosen from the path): scikit-learn's bundled digits (no path), Fashion-MNIST IDX
files, CIFAR-10 (torchvision's python pickle layout) and image-folder trees (Mini-ImageNet).
Every dataset exposes `labels` (one int per item) and yields `(x, label)`, so one sampler and one
training loop serve them all. Speech: the speaker HDF5 of data_prep.py, as random training crops
and fixed validation crops (at the end of this module).
"""

import copy
import gzip
import os
import re
import struct

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from utils import UserError

DIGITS = "digits"
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MAX_IMAGE_PIXELS = 8192 * 8192  # image files with more pixels are refused from their header, before decoding
CIFAR_STATS = ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255))


class GroupBatchSampler(Sampler):
    """Class-balanced batches: each batch is `groups_per_batch` groups of `group_size` items of one class.

    Every epoch, each class's items are shuffled and cut into consecutive groups (the remainder is
    left out, as in the seed); the groups are shuffled and packed into batches. The order depends
    only on (seed, epoch), so a resumed run sees the same batches. With `world_size > 1` each rank
    takes every world_size-th batch (the tail is trimmed so all ranks step together).
    """

    def __init__(self, labels, group_size, groups_per_batch, seed=0, rank=0, world_size=1):
        self._init_epochs(labels, seed, rank, world_size)
        self.group_size = group_size
        self.groups_per_batch = groups_per_batch
        classes, counts = np.unique(self.labels, return_counts=True)
        self.by_class = [np.flatnonzero(self.labels == c) for c in classes]
        if (counts >= group_size).sum() < 2:
            raise UserError(f"need at least 2 classes with {group_size} or more items each to form pairs")

    def _init_epochs(self, labels, seed, rank, world_size):
        """The state every epoch-seeded sampler shares: labels, seed, this rank's share, the epoch."""
        self.labels = np.asarray(labels)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def _rank_share(self, batches):
        """This rank's batches: every world_size-th, the tail trimmed so all ranks step together."""
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank : usable : self.world_size]

    def set_epoch(self, epoch, start_batch=0):
        """Select the epoch's permutation; `start_batch` skips batches already done (mid-epoch resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def _batches(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = []
        for members in self.by_class:
            members = rng.permutation(members)
            n = len(members) // self.group_size
            groups.extend(members[: n * self.group_size].reshape(n, self.group_size))
        order = rng.permutation(len(groups))
        per = self.groups_per_batch
        n_batches = len(groups) // per
        if n_batches == 0:
            n_batches, per = 1, len(groups)
        batches = [np.concatenate([groups[g] for g in order[b * per : (b + 1) * per]]) for b in range(n_batches)]
        return self._rank_share(batches)

    def __iter__(self):
        for batch in self._batches()[self.start_batch :]:
            yield batch.tolist()

    def __len__(self):
        return len(self._batches())


class RandomBatchSampler(GroupBatchSampler):
    """Plain shuffled batches of `batch_size` items (`--sampler random`), as an ordinary DataLoader draws them.

    Classes are not balanced, so a batch may hold few or no same-class pairs (the pair loss then weighs
    what it has; see losses.pair_weights). Every item is used once per epoch; the last, smaller batch
    is kept unless it holds a single item (batch norm needs two). Like GroupBatchSampler, the order
    depends only on (seed, epoch), and with `world_size > 1` each rank takes every world_size-th batch.
    """

    def __init__(self, labels, batch_size, seed=0, rank=0, world_size=1):
        self._init_epochs(labels, seed, rank, world_size)
        self.batch_size = batch_size
        if len(np.unique(self.labels)) < 2:
            raise UserError("need at least 2 classes to form pairs")

    def _batches(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.labels))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < 2:
            batches.pop()
        return self._rank_share(batches)


# ----------------------------------------------------------------------------- image sources

# --augment: training augmentation of images; "auto" keeps each source's own (digits: crop; Fashion-MNIST /
# MNIST IDX, CIFAR-10 and image folders: crop and horizontal flip, as the research code did for CIFAR-10).
AUGMENTATIONS = ("auto", "none", "crop", "flip", "crop+flip")


def set_augmentation(dataset, augment):
    """Switch the random crop and horizontal flip of a training image dataset; `augment` from AUGMENTATIONS.

    'auto' leaves the source's own choice; the crop keeps the source's padding (digits 1, IDX 2,
    CIFAR-10 and folders 4 pixels). Flips suit photos, not digits or glyphs (a flipped 2 is no 2).
    """
    if augment == "auto":
        return dataset
    if augment not in AUGMENTATIONS:
        raise UserError(f"unknown --augment {augment}; choose from {', '.join(AUGMENTATIONS)}")
    dataset.set_augmentation(crop="crop" in augment, flip="flip" in augment)
    return dataset


class TensorImages(Dataset):
    """In-memory images (N, C, H, W) float, normalised; optional random crop (zero padding) and flip."""

    def __init__(self, images, labels, pad=0, flip=False, name=""):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.pad = pad
        self.flip = flip
        self.name = name
        self.crop_pad = pad  # the source's padding, for set_augmentation(crop=True)

    def set_augmentation(self, crop, flip):
        """Random crop (with the source's padding) and horizontal flip on or off (see data_load.set_augmentation)."""
        if crop and not self.crop_pad:
            raise UserError(f"{self.name}: this split has no crop padding (it is not a training split)")
        self.pad = self.crop_pad if crop else 0
        self.flip = flip

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        x = self.images[index]
        if self.pad:
            h, w = x.shape[1:]
            padded = torch.nn.functional.pad(x, (self.pad,) * 4)
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = padded[:, top : top + h, left : left + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[index])

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:])


def _normalise(images, mean, std):
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images - mean) / std


def load_digits_split(split, seed=0):
    """scikit-learn's 1,797 8x8 digits, split 60/20/20 per class into train / valid / test (fixed seed)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = data.target
    rng = np.random.default_rng(seed)
    parts = {"train": [], "valid": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a, b = int(0.6 * len(idx)), int(0.8 * len(idx))
        parts["train"] += idx[:a].tolist()
        parts["valid"] += idx[a:b].tolist()
        parts["test"] += idx[b:].tolist()
    keep = np.sort(parts[split])
    images = _normalise(images[keep], (0.3,), (0.4,))
    return TensorImages(images, labels[keep], pad=1 if split == "train" else 0, name=f"digits/{split}")


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            magic = struct.unpack(">I", handle.read(4))[0]
            ndim = magic & 0xFF
            shape = struct.unpack(">" + "I" * ndim, handle.read(4 * ndim))
            data = np.frombuffer(handle.read(), dtype=np.uint8)
    except (OSError, EOFError, struct.error):
        raise UserError(f"{path} is not an unsigned-byte IDX file (truncated or damaged)") from None
    if magic >> 8 != 0x08 or data.size != int(np.prod(shape)):
        raise UserError(f"{path} is not an unsigned-byte IDX file")
    return data.reshape(shape)


def _find(folder, stem):
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def load_idx_split(folder, split):
    """Fashion-MNIST (or MNIST) IDX files: `train-*` for training, `t10k-*` for validation and test."""
    prefix = "train" if split == "train" else "t10k"
    paths = [_find(folder, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if None in paths:
        raise UserError(f"{folder} needs both {prefix}-images-idx3-ubyte and {prefix}-labels-idx1-ubyte (or .gz)")
    images, labels = (_read_idx(p) for p in paths)
    if len(images) != len(labels):
        raise UserError(f"{folder}: {len(images)} {prefix} images but {len(labels)} labels")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = _normalise(x, (0.286,), (0.353,))
    train = split == "train"
    return TensorImages(x, labels, pad=2 if train else 0, flip=train, name=f"{folder}/{prefix}")


def load_cifar_split(folder, split):
    """CIFAR-10 through torchvision (never downloaded here): train split for training, test split otherwise."""
    from torchvision.datasets import CIFAR10

    root = os.path.dirname(folder) if os.path.basename(os.path.normpath(folder)) == "cifar-10-batches-py" else folder
    data = CIFAR10(root, train=split == "train", download=False)
    x = torch.from_numpy(data.data).permute(0, 3, 1, 2).float() / 255.0
    x = _normalise(x, *CIFAR_STATS)
    train = split == "train"
    return TensorImages(x, data.targets, pad=4 if train else 0, flip=train, name=f"cifar10/{split}")


class ImageFileError(UserError):
    """An image file that cannot be used: '<path> <reason>'; `reason` alone serves lists of files. Built from
    one message, as any UserError, so that a DataLoader worker can raise it again in the main process."""

    reason = ""


def _bad_image(path, reason):
    """The ImageFileError of `path`."""
    err = ImageFileError(f"{path} {reason}")
    err.reason = reason
    return err


def open_image(path):
    """Open an image file with Pillow, reading its header only; refuse one of more than MAX_IMAGE_PIXELS pixels
    (before decoding it: a decompression bomb would take gigabytes) or one Pillow cannot identify."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    # Pillow warns (and decodes) above its own limit, which is higher than ours: make that an error here too.
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise _bad_image(path, "does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        counted = re.search(r"\((\d+) pixels\)", str(err))
        raise _bad_image(path, _too_large(f"{int(counted[1]):,} pixels" if counted else "more pixels")) from None
    except UnidentifiedImageError as err:
        raise _bad_image(path, f"is not an image Pillow can decode ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__
        raise _bad_image(path, f"cannot be read as an image ({why})") from None
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        raise _bad_image(path, _too_large(f"{width}x{height} pixels"))
    return img


def _too_large(size):
    """The reason for an image over MAX_IMAGE_PIXELS."""
    return (
        f"is too large to decode: {size}, over the limit of {MAX_IMAGE_PIXELS:,} pixels (8192x8192; a "
        "decompression bomb?); shrink it first"
    )


def read_image(path, mode):
    """Decode a whole image file to an 8-bit Pillow image of `mode` ('L' or 'RGB') through to_8bit: the one
    reader of image files (image folders for training, verify.py's files). ImageFileError when it cannot."""
    img = open_image(path)
    try:
        with img:
            img.load()
            return to_8bit(img, mode, path)
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise _bad_image(path, f"is not an image Pillow can decode ({str(err) or type(err).__name__})") from None


def read_rgb(path):
    """An image file as 8-bit RGB (read_image): the loader of image folders."""
    return read_image(path, "RGB")


def to_8bit(img, mode, path=""):
    """A decoded Pillow image of any mode -> a new 8-bit image of `mode` ('L' or 'RGB'), as a viewer shows it.

    Turned upright by its EXIF orientation. 16-bit and 32-bit integer grayscale (I;16*, I: Pillow reads
    16-bit PNG, TIFF and PGM so) are scaled from 0..65535 by 1/257; float grayscale (F) from 0..1 when every
    value lies there, else from 0..255; other value ranges are refused (UserError). Transparency (an alpha
    band, or a transparent colour of P, L, RGB or I;16) is composited over black, the background of the
    toolkit's grayscale datasets; colour models (CMYK, YCbCr, LAB, HSV...) go through RGB.
    """
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _deep_to_8bit(img, path)
    if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))
    if img.mode not in ("1", "L", "P", "RGB"):
        img = img.convert("RGB")
    return img.convert(mode)


def _deep_to_8bit(img, path):
    """A 16/32-bit integer or float grayscale image -> 8-bit L (LA when it has a transparent value), as to_8bit."""
    from PIL import Image

    values = np.asarray(img, dtype=np.float32)  # exact for 16-bit integers
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode == "F":
        if not (np.isfinite(values).all() and low >= 0.0 and high <= 255.0):
            raise _bad_image(path, f"holds float values {low:g}..{high:g}, outside 0..1 and 0..255")
        scale = 255.0 if high <= 1.0 else 1.0
    else:
        if low < 0 or high > 65535:
            raise _bad_image(path, f"holds integer values {low:g}..{high:g}, outside 16-bit 0..65535")
        scale = 1.0 / 257.0
    gray = np.rint(values * scale).astype(np.uint8)
    transparent = img.info.get("transparency")
    if not isinstance(transparent, int | float):
        return Image.fromarray(gray, "L")
    alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray, alpha], axis=-1), "LA")


def _image_size(path):
    """(width, height) of an image file after decoding all of it (read_image), or why it cannot be used (str)."""
    try:
        return read_rgb(path).size
    except ImageFileError as err:
        return err.reason


def check_image_files(paths, folder, skip_bad=False):
    """Decode every image of a folder tree once; -> (indices of the usable `paths`, (width, height)).

    An image folder must hold decodable images of one size (they are batched together). Files that do
    not decode (corrupt, empty, not an image) and images of another size than most are refused with
    one UserError naming one of them, or, with `skip_bad`, left out with one warning line on stderr.
    Decoding runs in threads (PIL releases the GIL while it decodes).
    """
    import sys
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        found = list(pool.map(_image_size, paths, chunksize=64))
    sizes = Counter(s for s in found if isinstance(s, tuple))
    if not sizes:
        raise UserError(f"no image under {folder} can be decoded (e.g. {paths[0]}, which {found[0]})")
    common = sizes.most_common(1)[0][0]
    broken = [i for i, s in enumerate(found) if not isinstance(s, tuple)]
    odd = [i for i, s in enumerate(found) if isinstance(s, tuple) and s != common]
    size = f"{common[0]}x{common[1]}"
    if (broken or odd) and not skip_bad:
        if broken:
            i = broken[0]
            what = f"{len(broken)} image file(s) cannot be decoded, e.g. {paths[i]}, which {found[i]}"
        else:
            i = odd[0]
            what = f"images differ in size: {sizes[common]} are {size} but {len(odd)} are not, e.g. {paths[i]}"
            what += f" ({found[i][0]}x{found[i][1]})"
        raise UserError(f"{folder}: {what}; fix or remove them, or pass --skip-bad-images to leave them out")
    if broken or odd:
        print(
            f"warning: {folder}: left out {len(broken)} image(s) that cannot be decoded and {len(odd)} not "
            f"{size} (--skip-bad-images)",
            file=sys.stderr,
            flush=True,
        )
    bad = set(broken) | set(odd)
    return [i for i in range(len(paths)) if i not in bad], common


class FolderImages(Dataset):
    """An image-folder tree (one sub-folder per class, e.g. Mini-ImageNet 84x84), decoded lazily.

    Every file is decoded once when the dataset is built (check_image_files), so a corrupt file or an
    image of another size is reported before training, not in the middle of an epoch.
    """

    def __init__(self, folder, train, skip_bad=False):
        from torchvision import datasets

        self.folder = datasets.ImageFolder(folder, loader=read_rgb)
        self.set_augmentation(crop=train, flip=train)
        keep, (width, height) = check_image_files([p for p, _ in self.folder.samples], folder, skip_bad)
        self.folder.samples = [self.folder.samples[i] for i in keep]
        self.folder.imgs = self.folder.samples
        self.folder.targets = [t for _, t in self.folder.samples]
        self.labels = np.asarray(self.folder.targets, dtype=np.int64)
        self.name = folder
        self._shape = (3, height, width)  # read_rgb converts every image to RGB
        # One item through the transform: checks it, and (a random flip when training) keeps the RNG stream,
        # so seeded runs give the weights they gave before the files were checked here.
        assert tuple(self.folder[0][0].shape) == self._shape, (self.folder[0][0].shape, self._shape)

    def set_augmentation(self, crop, flip):
        """Random crop (4-pixel zero padding) and horizontal flip on or off; training splits have both."""
        from torchvision import transforms

        steps = [transforms.ToTensor(), transforms.Normalize(*IMAGENET_STATS)]
        if flip:
            steps = [transforms.RandomHorizontalFlip()] + steps
        self.folder.transform = transforms.Compose(steps)
        self.crop = crop

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        try:
            x, y = self.folder[index]
        except OSError as err:  # the file changed after the dataset was built
            raise UserError(f"cannot read image {self.folder.samples[index][0]}: {err}") from None
        if self.crop:
            h, w = x.shape[1:]
            padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            x = padded[:, top : top + h, left : left + w]
        return x, y

    @property
    def image_shape(self):
        return self._shape


def load_images(path, split, skip_bad=False):
    """The dataset an image path names, for `split` in {'train', 'valid', 'test'}; None means digits.

    `skip_bad`: an image folder's undecodable files and images of another size are left out (with a
    warning) instead of refused.
    """
    if path is None or path == DIGITS:
        return load_digits_split(split)
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise UserError(f"data path not found: {path}")
    if _find(path, "train-images-idx3-ubyte") or _find(path, "t10k-images-idx3-ubyte"):
        return load_idx_split(path, split)
    if os.path.isdir(os.path.join(path, "cifar-10-batches-py")) or os.path.isfile(os.path.join(path, "data_batch_1")):
        return load_cifar_split(path, split)
    subdirs = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))]
    if subdirs and not any(d.startswith("cifar-10") for d in subdirs):
        try:
            return FolderImages(path, train=split == "train", skip_bad=skip_bad)
        except (FileNotFoundError, RuntimeError) as err:
            raise UserError(f"cannot read image folders under {path}: {err}") from None
    raise UserError(
        f"no images found at {path}: expected CIFAR-10's cifar-10-batches-py (download it from "
        "https://www.cs.toronto.edu/~kriz/cifar.html and unpack it there), Fashion-MNIST IDX files "
        f"(e.g. {FASHION_DIR}), or one sub-folder of images per class"
    )


def parse_classes(spec):
    """A class list `SPEC` ('0-4', '0,2,7', '0-3,8') -> sorted unique ints; UserError when malformed."""
    classes = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            if first < 0 or last < first:
                raise ValueError
            classes.update(range(first, last + 1))
    except ValueError:
        raise UserError(f"bad class list {spec!r}: expected indices and ranges such as 0-4 or 0,2,7") from None
    return sorted(classes)


class ClassSubset(Dataset):
    """The items of `dataset` whose class is in `classes`, relabelled 0..len(classes)-1 in that order.

    Used for open-set protocols: train on some classes, validate or test on others. `labels` are
    the new labels; items of other classes are never indexed.
    """

    def __init__(self, dataset, classes):
        present = set(np.unique(dataset.labels).tolist())
        missing = [c for c in classes if c not in present]
        if missing:
            raise UserError(f"{dataset.name}: no items of class {missing[0]} (classes present: 0-{max(present)})")
        new_label = {c: i for i, c in enumerate(classes)}
        self.classes = list(classes)  # the original label of each new label
        self.indices = np.flatnonzero(np.isin(dataset.labels, classes))
        self.labels = np.array([new_label[int(c)] for c in dataset.labels[self.indices]], dtype=np.int64)
        self.original_labels = np.asarray(dataset.labels)[self.indices]
        self.dataset = dataset
        self.name = f"{dataset.name}[classes {','.join(map(str, classes))}]"

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        x, _ = self.dataset[int(self.indices[index])]
        return x, int(self.labels[index])

    @property
    def image_shape(self):
        return self.dataset.image_shape


def select_classes(dataset, spec, items_per_class=None, seed=0):
    """`dataset` restricted to the classes of `spec` (see parse_classes; None keeps all) and, with
    `items_per_class`, to that many items of each class (a seeded, deterministic draw)."""
    if spec is None and items_per_class is None:
        return dataset
    classes = parse_classes(spec) if spec is not None else sorted(np.unique(dataset.labels).tolist())
    subset = ClassSubset(dataset, classes)
    if items_per_class is not None:
        rng = np.random.default_rng(seed)
        keep = np.sort(
            np.concatenate(
                [rng.permutation(np.flatnonzero(subset.labels == c))[:items_per_class] for c in range(len(classes))]
            )
        )
        subset.indices, subset.labels = subset.indices[keep], subset.labels[keep]
        subset.original_labels = subset.original_labels[keep]
        subset.name += f"[{items_per_class} per class]"
    return subset


def draw_holdout(labels, n_held, seed, flag=None):
    """The `n_held` classes of `labels` held out for validation, drawn with `seed` (sorted): train.py's
    --holdout-classes and train_distance.py's --valid-classes, so one seed holds out the same classes in both.
    UserError (naming `flag`, default --holdout-classes N) unless two classes are left to train on (validation's
    two are checked by the flags' parsers)."""
    classes = np.unique(np.asarray(labels))
    if n_held > len(classes) - 2:
        raise UserError(
            f"{flag or f'--holdout-classes {n_held}'}: the training data has {len(classes)} classes and training "
            f"needs 2, so at most {max(len(classes) - 2, 0)} can be held out"
        )
    return sorted(np.random.default_rng(seed).permutation(classes)[:n_held].tolist())


def split_holdout(train, fixed, n_held, seed):
    """--holdout-classes: (`train` without `n_held` classes drawn with `seed`, relabelled 0..n-n_held-1; those
    classes' items of `fixed`, relabelled 0..n_held-1) as (training set, validation set).

    `fixed` holds the items of `train` under the same labels, read as validation reads them (no random crop or
    flip): without_augmentation(train) for images, FixedCrops of the training file for speech. The training set
    never indexes a held-out item, so the sampler cannot put one in a batch (and a lazy reader never reads it).
    """
    held = draw_holdout(train.labels, n_held, seed)
    kept = [c for c in np.unique(np.asarray(train.labels)).tolist() if c not in held]
    train_part, valid = ClassSubset(train, kept), ClassSubset(fixed, held)
    train_part.name = f"{train.name}[without {n_held} held-out classes]"
    valid.name = f"{fixed.name}[{n_held} held-out classes]"
    return train_part, valid


def without_augmentation(dataset):
    """A copy of an image dataset (through its class and item subsets) that reads items as validation does, with
    no random crop or flip; `dataset` keeps its own augmentation."""
    copied = copy.copy(dataset)
    if isinstance(copied, ClassSubset | ItemSubset):
        copied.dataset = without_augmentation(copied.dataset)
        return copied
    if isinstance(copied, FolderImages):
        copied.folder = copy.copy(copied.folder)  # set_augmentation replaces its transform
    copied.set_augmentation(crop=False, flip=False)
    return copied


def class_names(dataset):
    """The name of each label of a dataset (label i -> names[i]): an image folder's sub-folder names, a speaker
    HDF5's speaker ids, under a ClassSubset those of its original labels; else the labels as text."""
    if isinstance(dataset, ClassSubset):
        names = class_names(dataset.dataset)
        return [names[c] for c in dataset.classes]
    if isinstance(dataset, ItemSubset):
        return class_names(dataset.dataset)
    if isinstance(dataset, SpeakerHDF5):
        return list(dataset.speakers)
    if isinstance(dataset, FolderImages):
        return list(dataset.folder.classes)
    return [str(c) for c in range(int(np.max(dataset.labels)) + 1)]


def validation_classes(train, valid):
    """{"classes": how many classes the validation set holds, "held_out": whether none of them is a training
    class}, by class name (class_names): what the calibration fitted on its pairs can be trusted for."""

    def present(dataset):
        names = class_names(dataset)
        return {names[label] for label in np.unique(np.asarray(dataset.labels))}

    held = present(valid)
    return {"classes": len(held), "held_out": not held & present(train)}


def image_stem(image_shape):
    """'imagenet' stem for inputs of 64 pixels and more (Mini-ImageNet), else the CIFAR stem."""
    return "imagenet" if min(image_shape[1:]) >= 64 else "cifar"


def check_image_shape(dataset, channels, what, source="the model takes"):
    """Refuse images whose channel count differs from `channels` (e.g. RGB validation for a grayscale model).

    `what` names the images ('validation', 'test'); `source` says where `channels` comes from.
    """
    found = dataset.image_shape[0]
    if found != channels:
        raise UserError(f"{what} images ({dataset.name}) have {found} channel(s) but {source} {channels}")


class ItemSubset(Dataset):
    """The items `indices` of `dataset` (labels unchanged), e.g. a capped validation set."""

    def __init__(self, dataset, indices, name):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(dataset.labels)[self.indices]
        self.name = name

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[int(self.indices[index])]

    @property
    def image_shape(self):
        return self.dataset.image_shape


def interleaved_order(labels):
    """Item indices with the classes interleaved: the first item of every class (in class order), then the
    second of every class, ...; so any prefix is spread over as many classes as it can be."""
    labels = np.asarray(labels)
    by_class = np.argsort(labels, kind="stable")
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_class] = np.arange(len(labels)) - np.searchsorted(labels[by_class], labels[by_class], side="left")
    return np.lexsort((labels, rank))


def validation_subset(dataset, max_items):
    """The validation set a run scores: at most `max_items` items drawn round-robin over the classes
    (interleaved_order; kept in dataset order), checked to hold two classes and a target pair.

    Deterministic and decided before training, so the model-selection EER always covers many classes.
    """
    if max_items is not None and len(dataset) > max_items:
        keep = np.sort(interleaved_order(dataset.labels)[:max_items])
        dataset = ItemSubset(dataset, keep, f"{dataset.name}[first {max_items} items over the classes]")
    counts = np.bincount(np.asarray(dataset.labels))
    if (counts > 0).sum() < 2 or counts.max() < 2:
        raise UserError(
            f"the validation set {dataset.name} ({len(dataset)} items, {(counts > 0).sum()} classes) needs at "
            "least two classes and one class with two items to score target and non-target pairs"
        )
    return dataset


# ----------------------------------------------------------------------------- speech: speaker HDF5


MIN_TRAIN_FRAMES = 20


def tile_frames(mat, n_frames):
    """Repeat (ncoef, frames) along time until it holds `n_frames`, then cut: (ncoef, n_frames).

    A longer matrix is returned unchanged (cut to `n_frames` only by the caller's crop).
    """
    frames = mat.shape[-1]
    assert frames > 0, "cannot tile an empty utterance"
    if frames >= n_frames:
        return mat
    reps = -(-n_frames // frames)
    return np.tile(mat, (1, reps))[:, :n_frames]


def _open_hdf5(path):
    if not os.path.isfile(path):
        raise UserError(f"HDF5 file not found: {path}")
    if not h5py.is_hdf5(path):
        raise UserError(f"{path} is not an HDF5 file (make one with data_prep.py)")
    return h5py.File(path, "r")


HDF5_LAYOUT = "one group per speaker holding one (ncoef, frames) dataset per utterance, as data_prep.py writes"


def speaker_utterances(h5, path):
    """[(speaker, utterance, h5py.Dataset)] of an open speaker HDF5, in file order: the one reader of the layout
    (HDF5_LAYOUT) that training (read_speaker_index) and evaluation (speech_data) share. Anything at the root but
    a speaker group, or in a group but an utterance dataset, is a UserError naming it; an empty group adds nothing.
    Metadata lives in attributes (ncoef, frontend), which this does not read."""
    out = []
    for spk, group in h5.items():
        if not isinstance(group, h5py.Group):
            kind = type(group).__name__
            raise UserError(f"{path}: `{spk}` at the root is a {kind}, not a speaker group ({HDF5_LAYOUT})")
        for utt, item in group.items():
            if not isinstance(item, h5py.Dataset):
                raise UserError(f"{path}: `{spk}/{utt}` is a {type(item).__name__}, not an utterance ({HDF5_LAYOUT})")
            out.append((spk, utt, item))
    return out


def read_speaker_index(path):
    """(speakers sorted, {speaker: sorted utterance names}, ncoef) of a speaker HDF5 (speaker_utterances); empty
    groups are left out.

    Reads the `ncoef` root attribute of data_prep.py, or else the first dataset's shape, which also
    accepts the seed's files ((1, ncoef, frames) datasets, no attribute).
    """
    with _open_hdf5(path) as h5:
        shapes, utts = {}, {}  # shapes: (speaker, utterance) -> shape, metadata only (no frames are read)
        for spk, name, dataset in speaker_utterances(h5, path):
            shapes[spk, name] = dataset.shape
            utts.setdefault(spk, []).append(name)
        utts = {spk: sorted(utts[spk]) for spk in sorted(utts)}
        if not utts:
            raise UserError(f"{path} holds no speakers (expected one group of utterance datasets per speaker)")
        first = next(iter(utts))
        first_shape = shapes[first, utts[first][0]]
        ncoef = int(h5.attrs.get("ncoef", first_shape[-2] if len(first_shape) >= 2 else 0))
    check_utterance_shapes(path, shapes, ncoef)
    return sorted(utts), utts, ncoef


def check_utterance_shapes(path, shapes, ncoef):
    """Refuse utterances that are not (ncoef, frames) (or the seed's (1, ncoef, frames)) with frames > 0.

    Without this, h5py data of another shape would be reshaped silently into (ncoef, -1) when read.
    """

    def fits(shape):
        return len(shape) in (2, 3) and (len(shape) == 2 or shape[0] == 1) and shape[-2] == ncoef and shape[-1] > 0

    bad = [key for key, shape in shapes.items() if not fits(shape)]
    if bad:
        spk, utt = min(bad)
        more = f" ({len(bad) - 1} more utterances do not fit either)" if len(bad) > 1 else ""
        raise UserError(
            f"{path}: utterance {spk}/{utt} has shape {shapes[spk, utt]}, not ({ncoef}, frames) with frames > 0 "
            f"as the file's coefficient count says{more}"
        )


class SpeakerHDF5(Dataset):
    """Utterances of a speaker HDF5 (one group per speaker) as items; `labels` = speaker index in sorted order.

    The file is opened lazily, once per process (each DataLoader worker opens its own handle), and
    reads only the frames it returns. Subclasses choose the crop.
    """

    def __init__(self, path, n_frames, ncoef=None):
        self.path = path
        self.n_frames = n_frames
        self.speakers, self.utts, self.ncoef = read_speaker_index(path)
        if ncoef is not None and ncoef != self.ncoef:
            raise UserError(f"{path} holds {self.ncoef} coefficients per frame but --ncoef is {ncoef}")
        self.items = [(spk, utt) for spk in self.speakers for utt in self.utts[spk]]
        self.labels = np.repeat(np.arange(len(self.speakers)), [len(self.utts[spk]) for spk in self.speakers])
        self.name = path
        self._h5 = None
        self._pid = None

    def __len__(self):
        return len(self.items)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_h5"] = state["_pid"] = None
        return state

    def dataset(self, index):
        """The h5py dataset of item `index`, opening the file in this process if needed."""
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        spk, utt = self.items[index]
        return self._h5[spk][utt]

    def read(self, index, start, stop):
        """Frames [start, stop) of item `index` as float32 (ncoef, stop - start); NaN or Inf is a UserError.

        The shapes were checked when the file was indexed (read_speaker_index); the values are checked here,
        on every read, which costs one pass over the frames read.
        """
        data = self.dataset(index)[..., start:stop]
        mat = np.asarray(data, dtype=np.float32).reshape(self.ncoef, -1)
        if not np.isfinite(mat).all():
            raise UserError(
                f"{self.path}: utterance {'/'.join(self.items[index])} holds NaN or Inf values "
                f"(frames {start}-{start + mat.shape[1]}); fix or remove it"
            )
        return mat

    def crop(self, index, start):
        """`n_frames` frames from `start`, tiled (repeated along time) when the utterance is shorter."""
        mat = self.read(index, start, start + self.n_frames)
        if mat.shape[1] == 0:
            raise UserError(f"{self.path}: utterance {'/'.join(self.items[index])} holds no frames")
        mat = tile_frames(mat, self.n_frames)
        assert mat.shape == (self.ncoef, self.n_frames), mat.shape
        return torch.from_numpy(np.ascontiguousarray(mat))


class SpeakerCrops(SpeakerHDF5):
    """Training items: a random `n_frames` window (ncoef, n_frames) of an utterance, and its speaker label.

    Utterances shorter than `n_frames` are tiled (repeated along time) to `n_frames`, as the seed
    did. The GroupBatchSampler draws groups of --samples-per-class utterances of one speaker, so a
    speaker with fewer utterances never appears in a batch, though it still counts as a class.
    """

    def __getitem__(self, index):
        frames = self.dataset(index).shape[-1]
        start = int(torch.randint(0, frames - self.n_frames + 1, ())) if frames > self.n_frames else 0
        return self.crop(index, start), int(self.labels[index])


class FixedCrops(SpeakerHDF5):
    """Validation items: the first `n_frames` frames of an utterance (tiled if shorter), deterministic.

    Only the first `max_items` utterances in speaker-interleaved order (the first utterance of every
    speaker, then the second of every speaker, ...) are kept, so a capped set still holds many speakers.
    """

    def __init__(self, path, n_frames, ncoef=None, max_items=None):
        super().__init__(path, n_frames, ncoef)
        if len(self.speakers) < 2:
            raise UserError(f"{path} holds {len(self.speakers)} speaker; validation needs at least 2")
        rank = np.concatenate([np.arange(len(self.utts[spk])) for spk in self.speakers])
        order = np.lexsort((np.arange(len(rank)), rank))
        keep = order[:max_items] if max_items else order
        self.items = [self.items[i] for i in keep]
        self.labels = self.labels[keep]
        if np.bincount(self.labels).max() < 2:
            raise UserError(f"{path}: no speaker has 2 validation utterances, so there are no target pairs to score")

    def __getitem__(self, index):
        return self.crop(index, 0), int(self.labels[index])


def speech_training_sets(args):
    """Speech datasets of a run: (SpeakerCrops, FixedCrops or None, n_classes, encoder_args); with
    --holdout-classes, the training file's speakers split by split_holdout (each dataset under a ClassSubset)."""
    if args.n_frames < MIN_TRAIN_FRAMES:
        raise UserError(
            f"--n-frames must be at least {MIN_TRAIN_FRAMES}: batches are cut to as few as n_frames/4 frames "
            "and the TDNN needs 5"
        )
    train = SpeakerCrops(args.train_hdf_file, args.n_frames, args.ncoef)
    ncoef, n_classes = train.ncoef, len(train.speakers)
    valid = None
    if getattr(args, "holdout_classes", None):
        fixed = FixedCrops(args.train_hdf_file, args.n_frames, args.ncoef)
        train, valid = split_holdout(train, fixed, args.holdout_classes, args.seed)
        n_classes -= args.holdout_classes
    k = args.samples_per_class
    counts = np.bincount(train.labels, minlength=n_classes)
    usable = int((counts >= k).sum())
    if usable < 2:
        raise UserError(
            f"{args.train_hdf_file}: {usable} of {len(counts)} speakers have {k} or more utterances; "
            f"batches need at least 2 (lower --samples-per-class or add data)"
        )
    if usable < len(counts) and args.verbose > 0:
        print(f"{len(counts) - usable} speakers have fewer than {k} utterances and never appear in a batch")
    if args.valid_hdf_file:
        valid = FixedCrops(args.valid_hdf_file, args.n_frames, args.ncoef, args.valid_max_items)
        if valid.ncoef != ncoef:
            raise UserError(
                f"{args.valid_hdf_file} holds {valid.ncoef} coefficients per frame but {args.train_hdf_file} holds "
                f"{ncoef}"
            )
    return train, valid, n_classes, {"ncoef": ncoef, "latent_size": args.latent_size}
