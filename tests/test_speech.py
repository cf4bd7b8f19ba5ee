"""The speech pipeline: HDF5 speaker datasets, the seed's VoxCeleb command lines (data_prep, train, eval), embed.py."""

import argparse
import os
import pickle

import h5py
import kaldiio
import numpy as np
import pytest
import torch
from tiny_data import write_kaldi_dir
from torch.utils.data import DataLoader

import data_load
import data_prep
import embed
import eval as eval_script
import train
from e2e_verification import training
from e2e_verification.checkpoints import load_checkpoint
from e2e_verification.scoring import embed_matrices
from utils import UserError

NCOEF = 30


@pytest.fixture(scope="module")
def speech_set(tmp_path_factory):
    """Train (6 speakers x 8) and test (3 other speakers x 4) Kaldi dirs, made into HDF5 by data_prep.py."""
    root = str(tmp_path_factory.mktemp("speech"))
    dirs = {"train": os.path.join(root, "train"), "test": os.path.join(root, "test")}
    feats = {
        "train": write_kaldi_dir(dirs["train"], 6, 8, NCOEF, seed=0, prefix="spk", frames=(20, 120)),
        "test": write_kaldi_dir(dirs["test"], 3, 4, NCOEF, seed=1, prefix="tst", frames=(20, 120)),
    }
    for name, out_name in (("train", "train.hdf"), ("test", "valid.hdf")):
        argv = ["--path-to-data", dirs[name] + "/", "--data-info-path", dirs[name] + "/", "--out-path", root + "/",
                "--out-name", out_name, "--min-recordings", "2"]  # fmt: skip
        assert data_prep.main(argv) == 0
    return {"root": root, "dirs": dirs, "feats": feats, "train": os.path.join(root, "train.hdf"),
            "valid": os.path.join(root, "valid.hdf")}  # fmt: skip


def make_hdf(path, utts_per_speaker, frames=10, ncoef=NCOEF):
    with h5py.File(path, "w") as h5:
        h5.attrs["ncoef"] = ncoef
        for spk, n in utts_per_speaker.items():
            group = h5.create_group(spk)
            for i in range(n):
                group.create_dataset(f"{spk}-{i}", data=np.zeros((ncoef, frames), np.float32))
    return path


def speech_args(**overrides):
    args = argparse.Namespace(train_hdf_file=None, valid_hdf_file=None, n_frames=50, ncoef=NCOEF, samples_per_class=5,
                              valid_max_items=100, latent_size=16, verbose=0)  # fmt: skip
    vars(args).update(overrides)
    return args


# ----------------------------------------------------------------------------- datasets


def test_training_crops_are_windows_or_tiles_labelled_by_sorted_speaker(speech_set):
    data = data_load.SpeakerCrops(speech_set["train"], n_frames=50, ncoef=NCOEF)
    assert data.speakers == [f"spk{s}" for s in range(6)] and len(data) == 48
    assert data.labels.tolist() == [s for s in range(6) for _ in range(8)]
    feats = speech_set["feats"]["train"]
    torch.manual_seed(0)
    for index, (spk, utt) in enumerate(data.items):
        x, label = data[index]
        assert x.dtype == torch.float32 and x.shape == (NCOEF, 50) and label == data.speakers.index(spk)
        full = feats[utt].T
        if full.shape[1] >= 50:
            starts = [s for s in range(full.shape[1] - 49) if np.array_equal(full[:, s : s + 50], x.numpy())]
            assert starts, f"{utt}: the crop is not a window of the utterance"
        else:
            reps = -(-50 // full.shape[1])
            np.testing.assert_array_equal(x.numpy(), np.tile(full, (1, reps))[:, :50])


def test_hdf5_is_opened_lazily_in_each_worker(speech_set):
    data = data_load.SpeakerCrops(speech_set["train"], n_frames=40, ncoef=NCOEF)
    assert data._h5 is None
    data[0]
    assert data._h5 is not None and pickle.loads(pickle.dumps(data))._h5 is None
    sampler = data_load.GroupBatchSampler(data.labels, 5, 2, seed=1)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=2)
    batches = list(loader)
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == (10, NCOEF, 40) and len(set(y[:5].tolist())) == 1 and len(set(y[5:].tolist())) == 1


def test_validation_crops_are_fixed_and_interleave_speakers(speech_set):
    data = data_load.FixedCrops(speech_set["train"], n_frames=60, ncoef=NCOEF, max_items=8)
    assert len(data) == 8 and data.labels.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert [utt for _, utt in data.items[:2]] == ["spk0-u0", "spk1-u0"]
    first = data[0][0]
    torch.testing.assert_close(first, data[0][0])
    full = speech_set["feats"]["train"]["spk0-u0"].T
    expected = np.tile(full, (1, -(-60 // full.shape[1])))[:, :60]
    np.testing.assert_array_equal(first.numpy(), expected)


def test_speech_training_sets_returns_classes_and_encoder_args(speech_set):
    args = speech_args(train_hdf_file=speech_set["train"], valid_hdf_file=speech_set["valid"], valid_max_items=5)
    train_set, valid_set, n_classes, encoder_args = data_load.speech_training_sets(args)
    assert n_classes == 6 and encoder_args == {"ncoef": NCOEF, "latent_size": 16}
    assert len(valid_set) == 5 and valid_set.labels.tolist() == [0, 1, 2, 0, 1]


def test_bad_speech_files_are_user_errors(speech_set, tmp_path):
    with pytest.raises(UserError, match="holds 30 coefficients per frame but --ncoef is 23"):
        data_load.speech_training_sets(speech_args(train_hdf_file=speech_set["train"], ncoef=23))
    with pytest.raises(UserError, match="no speakers"):
        data_load.SpeakerCrops(make_hdf(str(tmp_path / "empty.h5"), {}), 50)
    few = make_hdf(str(tmp_path / "few.h5"), {"a": 5, "b": 4, "c": 2})
    with pytest.raises(UserError, match="1 of 3 speakers have 5 or more utterances"):
        data_load.speech_training_sets(speech_args(train_hdf_file=few))
    with pytest.raises(UserError, match="not an HDF5 file"):
        data_load.SpeakerCrops(os.path.join(speech_set["dirs"]["train"], "feats.scp"), 50)
    with pytest.raises(UserError, match="validation needs at least 2"):
        data_load.FixedCrops(make_hdf(str(tmp_path / "one.h5"), {"a": 3}), 50)
    with pytest.raises(UserError, match="--n-frames must be at least 20"):
        data_load.speech_training_sets(speech_args(train_hdf_file=speech_set["train"], n_frames=12))


def test_seed_layout_hdf5_is_read(tmp_path):
    """The seed's data_prep wrote (1, ncoef, frames) datasets and no ncoef attribute."""
    path = str(tmp_path / "seed.hdf")
    rng = np.random.default_rng(0)
    mats = {f"s{s}-{u}": rng.standard_normal((1, 7, 30)).astype(np.float32) for s in range(2) for u in range(5)}
    with h5py.File(path, "w") as h5:
        for utt, mat in mats.items():
            h5.require_group(utt.split("-")[0]).create_dataset(utt, data=mat)
    data = data_load.FixedCrops(path, n_frames=20, ncoef=7)
    x, label = data[1]
    spk, utt = data.items[1]
    assert label == 1 and spk == "s1"
    np.testing.assert_array_equal(x.numpy(), mats[utt][0, :, :20])


def test_embed_matrices_batches_equal_lengths_without_changing_results():
    import models

    torch.manual_seed(0)
    model = models.build_model(
        {
            "model": "TDNN",
            "encoder_args": {"ncoef": 8, "latent_size": 4},
            "n_classes": 3,
            "softmax": "softmax",
            "margin": 0.35,
            "scale": 30.0,
            "hidden_size": 8,
            "n_hidden": 1,
            "dropout_prob": 0.0,
            "ndiscriminators": 1,
            "rproj_size": 0,
        }  # fmt: skip
    ).eval()
    mats = [torch.randn(8, n) for n in (30, 30, 30, 7, 45, 45)]
    keys, emb = embed_matrices(model, enumerate(mats), torch.device("cpu"), min_frames=20, max_batch=2)
    assert keys == list(range(6)) and emb.shape == (6, 512)
    tiled = torch.cat([mats[3]] * 3, dim=1)[:, :20]
    singles = [model.embed(m[None]) for m in mats[:3]] + [model.embed(tiled[None])]
    singles += [model.embed(m[None]) for m in mats[4:]]
    torch.testing.assert_close(emb, torch.cat(singles), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the seed's command lines


def voxceleb_train_argv(speech_set, cp, logdir):
    """The seed README's VoxCeleb train.py command line, every flag, with small values."""
    return [
        "--checkpoint-path", cp, "--save-every", "1", "--train-hdf-file", speech_set["train"],
        "--valid-hdf-file", speech_set["valid"], "--workers", "2", "--seed", "1", "--model", "TDNN",
        "--max-gnorm", "20.0", "--batch-size", "2", "--valid-batch-size", "4", "--lr", "1.5",
        "--momentum", "0.85", "--l2", "1e-5", "--warmup", "20", "--epochs", "2", "--ncoef", "30",
        "--n-frames", "50", "--latent-size", "32", "--hidden-size", "16", "--n-hidden", "2",
        "--dropout-prob", "0.01", "--softmax", "am_softmax", "--smoothing", "0.05", "--logdir", logdir,
    ]  # fmt: skip


def test_seed_voxceleb_lr_is_a_noam_scale():
    args = training.build_parser().parse_args(["--train-hdf-file", "x.hdf", "--lr", "1.5", "--warmup", "2000"])
    args = training.resolve_defaults(args, [])
    model = torch.nn.Linear(2, 2)
    opt, sched = training.make_optimizer(args, model)
    assert args.lr_schedule == "noam" and opt.param_groups[0]["nesterov"]
    used = {}
    for step in range(1, 8001):
        used[step] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    assert used[1] == pytest.approx(1.5 * 2000**-1.5, rel=1e-9)
    assert used[2000] == pytest.approx(0.033541, rel=1e-4) and max(used.values()) == used[2000]
    assert used[8000] == pytest.approx(1.5 / 8000**0.5, rel=1e-9)


@pytest.fixture(scope="module")
def voxceleb_run(speech_set, tmp_path_factory):
    """The seed's VoxCeleb train.py command line, run once: (checkpoint folder, TensorBoard folder)."""
    root = tmp_path_factory.mktemp("run")
    cp, logdir = str(root / "cp"), str(root / "logs")
    assert train.main(voxceleb_train_argv(speech_set, cp, logdir)) == 0
    return cp, logdir


def test_seed_voxceleb_train_command_line(voxceleb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cp, logdir = voxceleb_run
    assert sorted(os.listdir(cp)) == ["args.json", "checkpoint_1ep.pt", "checkpoint_2ep.pt"]
    state = load_checkpoint(os.path.join(cp, "checkpoint_2ep.pt"))
    assert state["model_config"]["encoder_args"] == {"ncoef": 30, "latent_size": 32}
    assert state["model_config"]["n_classes"] == 6 and state["total_iters"] == 6  # 6 groups of 5, 2 per batch
    acc = EventAccumulator(logdir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"Train/Total loss", "Train/Cross entropy", "Train/Binary loss", "Info/LR", "Valid/E2E EER",
            "Valid/Cosine EER", "Valid/Fus EER"} <= tags  # fmt: skip
    for event in acc.Scalars("Info/LR"):  # logged after step s: the LR of step s + 1
        t = event.step + 1
        assert event.value == pytest.approx(1.5 * min(t**-0.5, t * 20**-1.5), rel=1e-6)
    assert len(acc.Scalars("Valid/E2E EER")) == 2


def test_seed_voxceleb_eval_then_embed(speech_set, voxceleb_run, tmp_path, capsys):
    checkpoint = os.path.join(voxceleb_run[0], "checkpoint_2ep.pt")
    test_dir = speech_set["dirs"]["test"]
    out = str(tmp_path / "scores.out")
    argv = ["--test-data", f"{test_dir}/feats.scp", "--trials-path", f"{test_dir}/trials",
            "--cp-path", checkpoint, "--model", "TDNN", "--out-path", out]  # fmt: skip
    assert eval_script.main(argv) == 0
    lines = [line.split() for line in open(out) if not line.startswith("#")]  # after the header
    assert len(lines) == 66 and sum(row[-1] == "target" for row in lines) == 18
    assert "eer" in open(out + ".json").read() and "mindcf_0.01" in capsys.readouterr().out

    emb_dir = str(tmp_path / "emb")
    assert embed.main(["--path-to-data", f"{test_dir}/", "--cp-path", checkpoint, "--out-path", emb_dir,
                       "--min-frames", "100", "--device", "cpu"]) == 0  # fmt: skip
    from_ark = kaldiio.load_scp(os.path.join(emb_dir, "embeddings.scp"))
    with h5py.File(os.path.join(emb_dir, "embeddings.h5"), "r") as h5:
        from_h5 = {utt: h5[utt][()] for utt in h5}
        assert h5["tst0-u0"].attrs["spk"] == "tst0"
    model = eval_script.load_model(checkpoint, "TDNN", torch.device("cpu"))
    feats = speech_set["feats"]["test"]
    keys, in_memory = embed_matrices(model, ((u, feats[u].T) for u in sorted(feats)), torch.device("cpu"))
    assert sorted(from_ark) == sorted(from_h5) == keys
    for i, utt in enumerate(keys):
        np.testing.assert_array_equal(from_ark[utt], from_h5[utt])
        np.testing.assert_allclose(from_h5[utt], in_memory[i].numpy(), rtol=1e-5, atol=1e-6)

    # eval.py's cosine column is the cosine of these embeddings (both tile to 100 frames)
    a, b = from_h5[lines[0][0]], from_h5[lines[0][1]]
    assert float(lines[0][3]) == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-5)


def test_eval_names_unknown_trial_utterances(speech_set, voxceleb_run, tmp_path):
    trials = tmp_path / "trials"
    trials.write_text("tst0-u0 nobody-1 target\ntst0-u1 nobody-2 nontarget\n")
    argv = ["--test-data", speech_set["dirs"]["test"], "--trials-path", str(trials), "--cp-path",
            os.path.join(voxceleb_run[0], "checkpoint_1ep.pt")]  # fmt: skip
    with pytest.raises(UserError, match="nobody-1, nobody-2"):
        eval_script.main(argv)
