"""The two domains as task objects: what differs between image and speech verification lives here only.

A task owns, for its domain: the defaults of the flags whose meaning differs, the datasets for
training / validation / test and the encoder arguments they imply, what `--batch-size` counts,
the training-time crop, and evaluation (all pairs of a test set, or a trials file). Scripts ask
`task_for_args(args)` or `task_for_model(name)` once and call its methods; nothing else branches
on the domain.
"""

import abc
import copy
import os

import numpy as np
import torch

import data_load
import models
from e2e_verification import speech_data
from e2e_verification.checkpoints import model_provenance
from utils import UserError

# The digits demo's recipe: the seed README's CIFAR-10 settings for the heads, sized to finish in about a minute.
# Its flags are the demo's defaults (a flag typed on the command line wins); training.resolve_defaults reads it.
DIGITS_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "digits.args")


# The defaults of the training flags whose meaning differs by domain, filled in where the command line leaves
# them unset (None; "auto" for --lr-schedule): flag -> (image, speech).
DOMAIN_DEFAULTS = {
    "lr": (0.1, 0.001),
    "l2": (5e-4, 1e-5),
    "valid_batch_size": (16, 64),
    "max_gnorm": (0.0, 10.0),
    "epochs": (500, 500),
    "model": ("resnet", "TDNN"),
    "lr_schedule": ("plateau", "noam"),
    "workers": (0, 4),
}
DOMAINS = ("image", "speech")


class Task(abc.ABC):
    """A domain's name, the flags that give its training and validation data, and its column of DOMAIN_DEFAULTS.

    The methods below are everything a script may ask of a domain; both tasks implement every one with these
    signatures (tests/test_contracts_tasks.py checks it), so a script never branches on the domain."""

    def __init__(self, name, data_flag, valid_flag):
        self.name, self.data_flag, self.valid_flag = name, data_flag, valid_flag
        column = DOMAINS.index(name)
        self.defaults = {flag: values[column] for flag, values in DOMAIN_DEFAULTS.items()}

    @abc.abstractmethod
    def resolve(self, args, given):
        """Domain defaults into the resolved namespace `args`; `given` = the flags typed on the command line."""

    @abc.abstractmethod
    def has_validation(self, args):
        """Whether the run has validation data."""

    @abc.abstractmethod
    def datasets(self, args):
        """(train, valid or None, n_classes, encoder_args) for a run."""

    @abc.abstractmethod
    def groups_per_batch(self, args):
        """How many same-class groups a training batch holds (what --batch-size counts)."""

    @abc.abstractmethod
    def training_transform(self, args):
        """A function applied to every training batch (the crop), or None."""

    @abc.abstractmethod
    def frontend(self, args):
        """The feature front end the checkpoint records (a dict), or None."""

    @abc.abstractmethod
    def memory_format(self, device):
        """The torch memory format of model and batches on `device`, or None for the default."""

    @abc.abstractmethod
    def final_test(self, args):
        """The dataset train.py scores after training, or None."""

    @abc.abstractmethod
    def evaluate(self, model, args, device, out_path, backends=None):
        """eval.py: score the test trials, print and return {scorer: metrics}; `backends` (backends.Backends)
        adds calibrated, normalised and PLDA scorers."""

    @abc.abstractmethod
    def embed_cohort(self, model, path, args, device):
        """eval.py --cohort: embeddings (c, emb) on `device` of the cohort items at `path`."""

    @abc.abstractmethod
    def bench_flags(self, batch, n_frames, image_path, make_hdf5):
        """train.py flags for a throughput bench."""

    @abc.abstractmethod
    def bench_sizes(self, device):
        """(batch size, frames) of the throughput bench on this device type."""

    @abc.abstractmethod
    def file_input(self, model, state, cp_path, chunk_seconds, min_frames):
        """How verify.py reads this domain's files: a FileInput."""

    @abc.abstractmethod
    def export_spec(self, arg, image_size, stem_sizes, min_frames):
        """The exported encoder's input (a dict: domain, shape, dynamic axes, notes)."""


class FileInput:
    """How a trained model reads files (verify.py): `inputs(path)` -> model inputs, `embed(model, inputs, device)`
    -> (n, emb) embeddings whose mean is the file's."""

    def __init__(self, inputs, embed):
        self.inputs, self.embed = inputs, embed


class ImageTask(Task):
    """Images: CIFAR-10, Fashion-MNIST IDX, image folders or the bundled digits; every test pair is a trial."""

    def resolve(self, args, given):
        """Domain defaults into the resolved namespace `args`; `given` = the flags typed on the command line."""
        args.digits = args.data_path is None

    def has_validation(self, args):
        return bool(args.digits or args.valid_data_path or getattr(args, "holdout_classes", None))

    def datasets(self, args):
        """(train, valid or None, n_classes, encoder_args) for a run; with --holdout-classes the validation set is
        the held-out classes of the training images (after --classes), read without augmentation."""
        skip_bad = getattr(args, "skip_bad_images", False)
        train = data_load.load_images(args.data_path, "train", skip_bad)
        data_load.set_augmentation(train, getattr(args, "augment", "auto"))
        train = data_load.select_classes(train, args.classes, args.items_per_class)
        valid = None
        valid_classes = args.valid_classes or args.classes
        if getattr(args, "holdout_classes", None):
            fixed = data_load.without_augmentation(train)
            train, valid = data_load.split_holdout(train, fixed, args.holdout_classes, args.seed)
        elif args.digits:
            valid = data_load.select_classes(data_load.load_images(None, "valid"), valid_classes)
        elif args.valid_data_path:
            valid = data_load.load_images(args.valid_data_path, "valid", skip_bad)
            valid = data_load.select_classes(valid, valid_classes)
        shape = train.image_shape
        if valid is not None:
            data_load.check_image_shape(valid, shape[0], "validation", "the training images have")
        n_classes = int(train.labels.max()) + 1
        encoder_args = {"in_channels": shape[0], "stem": data_load.image_stem(shape)}
        if args.width is not None:
            encoder_args["width"] = args.width
        if getattr(args, "final_norm", False):  # only when on, so other image encoders keep their arguments
            encoder_args["final_norm"] = True
        return train, valid, n_classes, encoder_args

    def groups_per_batch(self, args):
        """--batch-size counts images: that many items, in groups of --samples-per-class."""
        return max(1, args.batch_size // args.samples_per_class)

    def training_transform(self, args):
        """Images train at full size (their augmentation lives in the datasets): no batch transform."""
        return None

    def frontend(self, args):
        """Images carry no feature front end."""
        return None

    def memory_format(self, device):
        """channels_last suits convolutions on images on CUDA."""
        return torch.channels_last if device.type == "cuda" else None

    def final_test(self, args):
        """The dataset the demo scores after training (the held-out digits), or None. With --holdout-classes and
        no --test-classes: the test items of the held-out classes (the open-set test the validation stood for)."""
        if not args.digits:
            return None
        classes = args.test_classes
        if classes is None and getattr(args, "holdout_class_names", None):
            classes = ",".join(args.holdout_class_names)  # the digits' names are their labels
        return data_load.select_classes(data_load.load_images(None, "test"), classes)

    def evaluate(self, model, args, device, out_path, backends=None):
        """eval.py for images: all pairs of the test images (--data-path, default the held-out digits);
        `backends` (backends.Backends) adds calibrated, normalised and PLDA scorers."""
        from e2e_verification.scoring import run_image_eval

        if args.test_data is not None or args.trials_path is not None:
            raise UserError(f"--test-data needs a speech model; this checkpoint holds {model.config['model']}")
        if args.batch_size <= 0:
            raise UserError(f"--batch-size must be > 0, got {args.batch_size}")
        dataset = data_load.load_images(args.data_path, "test")
        dataset = self.scored_images(model, dataset, "test", args.classes, args.items_per_class)
        cohort = lambda path: self.embed_cohort(model, path, args, device)  # noqa: E731
        flags = {"plot": args.plot, "backends": backends, "score_format": args.score_format, "embed_cohort": cohort}
        flags["provenance"] = model_provenance(model)
        return run_image_eval(model, dataset, device, args.batch_size, out_path, args.amp, **flags)

    @staticmethod
    def scored_images(model, dataset, what, classes=None, items=None):
        """An image dataset (data_load.load_images) as a model embeds it to score: no random crop or flip, its
        channels checked against `model`'s (`what` names it in the message), cut to `classes` and `items` per
        class (data_load.select_classes). eval.py's test images and cohort, embed.py's images."""
        data_load.set_augmentation(dataset, "none")  # a training split's crop and flip, off
        data_load.check_image_shape(dataset, model.config["encoder_args"]["in_channels"], what)
        return data_load.select_classes(dataset, classes, items)

    def embed_cohort(self, model, path, args, device):
        """eval.py --cohort for images: embeddings (c, emb) of the images at `path` (an image folder, IDX, CIFAR)."""
        from torch.utils.data import DataLoader

        from e2e_verification.scoring import embed_loader

        images = self.scored_images(model, data_load.load_images(path, "test"), "cohort")
        loader = DataLoader(images, batch_size=args.batch_size, shuffle=False)
        return embed_loader(model, loader, device, amp=args.amp, progress=True, desc="embedding cohort")[0]

    def bench_flags(self, batch, n_frames, image_path, make_hdf5):
        """train.py flags for a throughput bench: the given images, or none (CIFAR-shaped noise in memory)."""
        return ["--data-path", image_path] if image_path else []

    def bench_sizes(self, device):
        """(batch size, frames) of the throughput bench on this device type."""
        return (128, 0) if device.type == "cuda" else (32, 0)

    def file_input(self, model, state, cp_path, chunk_seconds, min_frames):
        """Image files, decoded and normalised as the training images were (image_input)."""
        from e2e_verification import image_input

        reader = image_input.from_checkpoint(state, cp_path)

        def embed(model, parts, device):
            return model.embed(torch.stack(parts).to(device)).float()

        return FileInput(lambda path: [reader.load(path)], embed)

    def export_spec(self, arg, image_size, stem_sizes, min_frames):
        """The exported encoder's input: (batch, channels, size, size), batch dynamic; `arg(key)` reads the
        encoder's arguments, `stem_sizes` the default size per stem."""
        channels = arg("in_channels")
        size = image_size or stem_sizes.get(arg("stem"), 32)
        notes = (
            f"float32 (batch, {channels}, {size}, {size}): pixels scaled to [0, 1], then normalised per channel as "
            "training did (data_load: CIFAR_STATS for CIFAR-10, IMAGENET_STATS for image folders, mean 0.286 / std "
            "0.353 for Fashion-MNIST, 0.3 / 0.4 for the digits); batch is dynamic, the size is fixed."
        )
        shape = ["batch", channels, size, size]
        return {"domain": self.name, "channels": channels, "size": [size, size], "shape": shape,
                "dynamic": {0: "batch"}, "notes": notes}  # fmt: skip


class SpeechTask(Task):
    """Speech: a speaker HDF5 from data_prep.py for training; a Kaldi trials file (or all pairs) for testing."""

    def resolve(self, args, given):
        args.digits = False
        if args.classes or args.valid_classes or args.test_classes or args.items_per_class:
            raise UserError(
                "--classes, --valid-classes and --test-classes select image classes; for speakers use "
                "the data (e.g. tools/asterisk_set.py --fold)"
            )
        for flag, value, default in (("--augment", args.augment, "auto"), ("--sampler", args.sampler, "balanced")):
            if value != default:
                raise UserError(f"{flag} {value} applies to images; speech batches are speaker groups")
        if args.final_norm:
            raise UserError("--final-norm applies to the image resnet")

    def has_validation(self, args):
        return bool(args.valid_hdf_file or getattr(args, "holdout_classes", None))

    def datasets(self, args):
        """(train, valid or None, n_classes, encoder_args); with --holdout-classes the validation set is the held-out
        speakers of the training file. Fine-tuning reads the data's own coefficient count, which
        pretrained.start_from checks against the model's (so a mismatch names the checkpoint, not --ncoef)."""
        if getattr(args, "pretrained_path", None):
            args = copy.copy(args)
            args.ncoef = None
        train, valid, n_classes, encoder_args = data_load.speech_training_sets(args)
        if args.channels is not None:
            encoder_args = {**encoder_args, "channels": args.channels}
        return train, valid, n_classes, encoder_args

    def groups_per_batch(self, args):
        """--batch-size counts speakers: groups of --samples-per-class utterances each (the seed's meaning)."""
        return args.batch_size

    def training_transform(self, args):
        """The seed's random truncation of every batch to [frames/4, frames], then SpecAugment with --specaug."""
        specaug = None
        if args.specaug:
            from e2e_verification.augment import SpecAugment

            specaug = SpecAugment()

        def transform(x):
            frames = x.shape[-1]
            keep = int(torch.randint(max(1, frames // 4), frames + 1, ()).item())
            x = x[..., :keep]
            return specaug(x) if specaug is not None else x

        return transform

    def frontend(self, args):
        """The feature settings data_prep.py recorded in the training HDF5 (a dict), or None for Kaldi features."""
        from e2e_verification.frontend import read_frontend

        found = read_frontend(args.train_hdf_file)
        return found.to_dict() if found is not None else None

    def memory_format(self, device):
        return None

    def final_test(self, args):
        return None

    def evaluate(self, model, args, device, out_path, backends=None):
        """eval.py for speech: embed every utterance the trials name once (whole, tiled to --min-frames), score;
        `backends` (backends.Backends) adds calibrated, normalised and PLDA scorers."""
        from e2e_verification.scoring import SCORERS, embed_matrices, report, trials_table

        if args.test_data is None:
            raise UserError("this checkpoint holds a speech model: give --test-data and --trials-path")
        if args.min_frames < 1:
            raise UserError(f"--min-frames must be >= 1, got {args.min_frames}")
        if args.trials_path:
            enroll, test, target = speech_data.read_trials(args.trials_path)
        elif args.spk2utt:
            enroll, test, target = speech_data.all_pairs_trials(args.spk2utt)
        else:
            raise UserError("speech evaluation needs --trials-path (or --spk2utt to score all pairs)")
        if target.all() or not target.any():
            raise UserError("the trials need at least one target and one non-target pair to compute metrics")
        wanted = list(dict.fromkeys([*enroll, *test]))
        self.check_frontend(model, args.test_data)
        items = speech_data.checked_features(args.test_data, wanted, model.config["encoder_args"].get("ncoef"))
        ids, emb = embed_matrices(model, items, device, args.min_frames, args.amp, progress=True, total=len(wanted))
        index = {utt: i for i, utt in enumerate(ids)}
        idx_a = np.fromiter((index[u] for u in enroll), dtype=np.int64, count=len(enroll))
        idx_b = np.fromiter((index[u] for u in test), dtype=np.int64, count=len(test))
        if backends is None:
            scorers = SCORERS
        else:
            embed_cohort = lambda path: self.embed_cohort(model, path, args, device)  # noqa: E731
            scorers = backends.scorers(model, emb, embed_cohort, args.amp)
        table = trials_table(model.distance, emb, idx_a, idx_b, target, amp=args.amp, ids=ids)
        line = "{trials} trials ({targets} target) over {utterances} utterances"
        extra = {"utterances": len(ids)}
        return report(
            table, scorers, out_path, extra, args.plot, True, line, args.score_format, model_provenance(model)
        )

    def embed_cohort(self, model, path, args, device):
        """eval.py --cohort for speech: embeddings (c, emb) of every utterance of the features at `path`
        (feats.scp, its folder or an HDF5), whole and tiled to --min-frames as the test utterances."""
        from e2e_verification.scoring import embed_matrices

        self.check_frontend(model, path)
        items = speech_data.checked_features(path, None, model.config["encoder_args"].get("ncoef"))
        return embed_matrices(model, items, device, args.min_frames, args.amp, progress=True)[1]

    def check_frontend(self, model, path):
        """Refuse features at `path` (HDF5, feats.scp or its folder) computed with another front end than the
        model's, naming the settings that differ. Unknown on either side (checkpoints from before front ends
        were recorded, features from Kaldi) passes: nothing can be compared."""
        from e2e_verification.frontend import FrontEnd, frontend_for_features

        recorded = model.config.get("frontend")
        if recorded is None:
            return
        found = frontend_for_features(path)
        if found is None:
            return
        difference = FrontEnd.from_dict(recorded, "the checkpoint's front end").describe_difference(found)
        if difference:
            raise UserError(f"{path} does not fit the model: {difference} (model vs features)")

    def bench_flags(self, batch, n_frames, image_path, make_hdf5):
        """train.py flags for a throughput bench: `make_hdf5(speakers, utts, frames, ncoef)` writes the data."""
        speakers = max(10, batch * 25 // 4)  # 25 batches an epoch
        hdf5 = make_hdf5(speakers, 20, n_frames, 30)
        return ["--train-hdf-file", hdf5, "--n-frames", str(n_frames), "--ncoef", "30"]

    def bench_sizes(self, device):
        return (24, 800) if device.type == "cuda" else (4, 200)

    def file_input(self, model, state, cp_path, chunk_seconds, min_frames):
        """Wav files through the checkpoint's front end, in chunks of about `chunk_seconds`, tiled to `min_frames`."""
        from e2e_verification.frontend import chunks, front_end_of, wav_features
        from e2e_verification.scoring import embed_matrices

        front_end = front_end_of(model.config, cp_path)
        chunk_frames = round(chunk_seconds * 1000.0 / front_end.frame_shift_ms)

        def embed(model, parts, device):
            return embed_matrices(model, enumerate(parts), device, min_frames)[1]

        return FileInput(lambda path: chunks(wav_features(front_end, path), chunk_frames), embed)

    def export_spec(self, arg, image_size, stem_sizes, min_frames):
        """The exported encoder's input: (batch, ncoef, frames), batch and frames dynamic."""
        ncoef = arg("ncoef")
        notes = (
            f"float32 (batch, {ncoef}, frames): feature matrices as train.py read them, transposed from Kaldi's "
            "(frames, ncoef); batch and frames are dynamic. Recordings shorter than 50 frames are tiled along time "
            f"first, as embed.py does (the graph is declared for {min_frames} frames and more)."
        )
        return {"domain": self.name, "ncoef": ncoef, "shape": ["batch", ncoef, "frames"],
                "dynamic": {0: "batch", 2: "frames"}, "notes": notes}  # fmt: skip


TASKS = {
    task.name: task
    for task in (
        ImageTask("image", "--data-path", "--valid-data-path"),
        SpeechTask("speech", "--train-hdf-file", "--valid-hdf-file"),
    )
}


def task_for_args(args):
    """The task of a training command line: speech when a training HDF5 is given, else images."""
    return TASKS["speech" if args.train_hdf_file else "image"]


def task_for_model(name):
    """The task of a registered encoder."""
    if name not in models.encoder_names():
        raise UserError(f"unknown model {name!r}; choose from {', '.join(models.encoder_names())}")
    return TASKS[models.encoder_domain(name)]
