"""How a model's training images were scaled and normalised, so that a user's image file can be fed the same way.

data_load.py normalises each image source with its own statistics (the digits with 0.3 / 0.4 on values
scaled from 0..16 to 0..1, Fashion-MNIST IDX with 0.286 / 0.353, CIFAR-10 and image folders with their
per-channel RGB means and deviations). train.py records the training source's `ImageInput` in the
checkpoint (`model_config["image_input"]`); verify.py decodes a PNG or JPEG with data_load.read_image (as
image folders are read for training), converts it to the recorded channels and size, scales 0..255 to
0..1 and normalises it with the recorded statistics.
"""

import dataclasses
import os

import numpy as np
import torch

import data_load
from utils import UserError

# Source -> (mean, std) per channel, as data_load applies them to images scaled to 0..1.
SOURCE_STATS = {
    "digits": ((0.3,), (0.4,)),
    "idx": ((0.286,), (0.353,)),
    "cifar10": data_load.CIFAR_STATS,
    "folder": data_load.IMAGENET_STATS,
}


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """The input a trained image model takes: (channels, height, width) images, (x / 255 - mean) / std per channel."""

    source: str
    channels: int
    height: int
    width: int
    mean: tuple
    std: tuple

    def to_dict(self):
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data, where="image input"):
        try:
            return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})
        except (TypeError, KeyError) as err:
            raise UserError(f"{where}: bad image-input record ({err})") from None

    def describe(self):
        return f"{self.channels}x{self.height}x{self.width} images normalised as {self.source}"

    def load(self, path):
        """An image file -> float32 (channels, height, width), as the model saw its training images.

        Decoded by data_load.read_image (the reader of training image folders too: 16-bit, float and
        transparent images scaled and composited one way, too large ones refused before decoding) to
        grayscale or RGB, resized (Lanczos) when its size differs. A file that cannot be used is a
        UserError naming it and why.
        """
        from PIL import Image

        img = data_load.read_image(path, "L" if self.channels == 1 else "RGB")
        if img.size != (self.width, self.height):
            img = img.resize((self.width, self.height), Image.Resampling.LANCZOS)
        pixels = np.asarray(img, dtype=np.float32)
        x = torch.from_numpy(pixels.reshape(self.height, self.width, -1)).permute(2, 0, 1) / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return ((x - mean) / std).contiguous()


def _base(dataset):
    """The dataset under class and item subsets."""
    while isinstance(dataset, data_load.ClassSubset | data_load.ItemSubset):
        dataset = dataset.dataset
    return dataset


def source_of(dataset):
    """The data_load source a training dataset came from ('digits', 'idx', 'cifar10', 'folder'), or None."""
    base = _base(dataset)
    if isinstance(base, data_load.FolderImages):
        return "folder"
    name = getattr(base, "name", "") or ""
    if not isinstance(base, data_load.TensorImages):
        return None
    if name.startswith("digits/"):
        return "digits"
    if name.startswith("cifar10/"):
        return "cifar10"
    if name.endswith(("/train", "/t10k")):
        return "idx"
    return None


def record(dataset):
    """The ImageInput dict of a training dataset, for the checkpoint; None for speech or an unknown source."""
    source = source_of(dataset)
    if source is None:
        return None
    channels, height, width = dataset.image_shape
    mean, std = SOURCE_STATS[source]
    if len(mean) != channels:
        return None
    return ImageInput(source, channels, height, width, tuple(mean), tuple(std)).to_dict()


def from_checkpoint(state, cp_path):
    """The ImageInput of a checkpoint's image model.

    Checkpoints from before this record: the digits (no --data-path) and a training path that still holds
    IDX, CIFAR-10 or an image folder are recognised from the run's arguments; otherwise a UserError says so.
    """
    config = state["model_config"]
    if config.get("image_input"):
        return ImageInput.from_dict(config["image_input"], f"{cp_path} image_input")
    args = state.get("args") or {}
    path = args.get("data_path")
    if "data_path" in args and path is None:
        dataset = data_load.load_images(None, "test")
    elif path and os.path.isdir(path):
        dataset = data_load.load_images(path, "test")
    else:
        raise UserError(
            f"{cp_path} does not record how its training images were normalised (it predates that record, and "
            f"its training data {path or '(unknown)'} is not here to tell); retrain it, or verify on "
            "features with eval.py"
        )
    found = record(dataset)
    if found is None or found["channels"] != config["encoder_args"].get("in_channels", found["channels"]):
        raise UserError(f"{cp_path}: cannot tell how its training images were normalised")
    return ImageInput.from_dict(found)
