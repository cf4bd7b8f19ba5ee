"""Small real inputs for the reliability tests (PNG image folders, Kaldi features, speaker HDF5, checkpoints)
and a pseudo-terminal to run scripts on, so that their tqdm bars draw as they would for a person."""

import fcntl
import os
import pty
import select
import struct
import subprocess
import tempfile
import termios
import time

import h5py
import kaldiio
import numpy as np
from PIL import Image

import models
from e2e_verification.checkpoints import save_checkpoint


def make_image_tree(root, n_classes=4, per_class=50, size=8, seed=0, prefix="class"):
    """One folder of RGB PNGs per class (`prefix`0, `prefix`1, ...: trees with the same prefix share class
    names); each class has its own colour and stripe, plus noise."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        folder = os.path.join(root, f"{prefix}{c}")
        os.makedirs(folder)
        base = rng.integers(40, 216, size=(1, 1, 3))
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
            img[:, c * size // n_classes : (c + 1) * size // n_classes] = 255
            Image.fromarray(img).save(os.path.join(folder, f"{i}.png"))
    return str(root)


def model_config(model="densenet", n_classes=4, encoder_args=None):
    """A model_config as train.py writes it (default: image encoder; softmax head, one distance head)."""
    return {
        "model": model,
        "encoder_args": encoder_args or {"in_channels": 3, "stem": "cifar"},
        "n_classes": n_classes,
        "softmax": "softmax",
        "margin": 0.35,
        "scale": 30.0,
        "hidden_size": 64,
        "n_hidden": 1,
        "dropout_prob": 0.25,
        "ndiscriminators": 1,
        "rproj_size": 0,
        "trainable_rproj": False,
    }


def write_checkpoint(path, model="densenet", n_classes=4, encoder_args=None, seed=0):
    """An untrained but complete checkpoint (the format TrainLoop.save writes); default a small image model."""
    import torch

    torch.manual_seed(seed)
    net = models.build_model(model_config(model, n_classes, encoder_args))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    state = {
        "format": 1,
        "model_config": net.config,
        "model_state": net.state_dict(),
        "optimizer_state": opt.state_dict(),
        "scheduler_state": sched.state_dict(),
        "scheduler_kind": "plateau",
        "epoch": 1,
        "total_iters": 0,
        "history": {},
        "best": {"e2e": float("inf"), "cos": float("inf")},
        "args": {},
    }
    save_checkpoint(path, state)
    return path


def write_kaldi_dir(folder, n_speakers=3, n_utts=3, ncoef=30, seed=0, nan_utt=None, prefix="spk", frames=(20, 60)):
    """A Kaldi data dir: feats.ark/scp (float32 (frames, ncoef), via kaldiio), utt2spk, spk2utt, all-pairs trials.

    Each speaker's frames are noise around its own offset vector (learnable); lengths are drawn from
    `frames`. With `nan_utt` (an index into the sorted ids), that utterance gets a NaN and an Inf.
    Returns {utterance id: features}, sorted by id.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    feats, utt2spk = {}, {}
    for s in range(n_speakers):
        offset = rng.normal(0.0, 1.0, ncoef)
        for u in range(n_utts):
            utt = f"{prefix}{s}-u{u}"
            length = int(rng.integers(*frames))
            feats[utt] = (offset + rng.normal(0.0, 1.0, (length, ncoef))).astype(np.float32)
            utt2spk[utt] = f"{prefix}{s}"
    feats = dict(sorted(feats.items()))
    utts = list(feats)
    if nan_utt is not None:
        feats[utts[nan_utt]][3, :2] = (np.nan, np.inf)
    kaldiio.save_ark(os.path.join(folder, "feats.ark"), feats, scp=os.path.join(folder, "feats.scp"))
    with open(os.path.join(folder, "utt2spk"), "w") as handle:
        handle.writelines(f"{u} {utt2spk[u]}\n" for u in utts)
    with open(os.path.join(folder, "spk2utt"), "w") as handle:
        for spk in sorted(set(utt2spk.values())):
            handle.write(" ".join([spk] + [u for u in utts if utt2spk[u] == spk]) + "\n")
    with open(os.path.join(folder, "trials"), "w") as handle:
        for i, a in enumerate(utts):
            for b in utts[i + 1 :]:
                handle.write(f"{a} {b} {'target' if utt2spk[a] == utt2spk[b] else 'nontarget'}\n")
    return feats


def write_speaker_hdf5(path, utts_per_speaker, ncoef=30, frames=40, seed=0):
    """A speaker HDF5 as data_prep.py writes it: one group per speaker of (ncoef, frames) float32 datasets."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as h5:
        h5.attrs["ncoef"] = ncoef
        for spk, n in utts_per_speaker.items():
            group = h5.create_group(spk)
            for i in range(n):
                group.create_dataset(f"{spk}-{i}", data=rng.normal(size=(ncoef, frames)).astype(np.float32))
    return path


def start_on_terminal(cmd, **kwargs):
    """Start `cmd` with its stderr on a 200-column pseudo-terminal: -> (process, fd to read that stderr from)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=slave, **kwargs)
    os.close(slave)
    return proc, master


def read_terminal(master, timeout=0.5):
    """Bytes the terminal holds now (waiting up to `timeout`); b"" once the program closed it."""
    if not select.select([master], [], [], timeout)[0]:
        return None
    try:
        return os.read(master, 65536)
    except OSError:  # Linux reports a closed pseudo-terminal as EIO
        return b""


def run_on_terminal(cmd, timeout=300, **kwargs):
    """Run `cmd` to the end with stderr on a pseudo-terminal: -> (exit status, stdout text, terminal bytes)."""
    proc, master = start_on_terminal(cmd, stdout=subprocess.PIPE, text=True, **kwargs)
    terminal, deadline = b"", time.monotonic() + timeout
    try:
        while (chunk := read_terminal(master)) != b"" and time.monotonic() < deadline:
            terminal += chunk or b""
    finally:
        os.close(master)
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
    stdout = proc.stdout.read()
    proc.stdout.close()
    return proc.wait(), stdout, terminal


def unwritable_folder(tmp_path):
    """A folder no one can create files or folders in: a chmod'ed one, or /proc/self as root (root writes
    anywhere else); skips the test where even that takes new entries."""
    import pytest

    if os.geteuid() != 0:
        folder = os.path.join(str(tmp_path), "read_only")
        os.mkdir(folder)
        os.chmod(folder, 0o500)
        return folder
    try:
        os.rmdir(tempfile.mkdtemp(dir="/proc/self"))
    except OSError:
        return "/proc/self"
    pytest.skip("/proc/self takes new entries here")


class PicklePayload:
    """Unpickling this calls open(marker, 'w'): the file `marker` appears only if a loader runs pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
