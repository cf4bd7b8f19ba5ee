"""embed.py on images: one vector per image of an image-folder tree or IDX folder, labelled by class, the same
vectors eval.py's cos scorer compares, taken by train_plda.py, train_distance.py and eval.py's back-ends; and the
refusals of a source of the other domain."""

import gzip
import os
import struct

import h5py
import kaldiio
import numpy as np
import pytest
from PIL import Image
from tiny_data import make_image_tree, write_checkpoint, write_kaldi_dir, write_speaker_hdf5

import embed
import eval as eval_script
import train
import train_distance
import train_plda
from e2e_verification import embedding_files
from e2e_verification.calibration import read_scores
from e2e_verification.checkpoints import load_model, model_provenance
from utils import cli

CPU = ["--device", "cpu"]
ARCH = ["--model", "resnet", "--width", "8", "--hidden-size", "16", "--ndiscriminators", "2"]


def write_idx(folder, prefix, labels, size=6, seed=0):
    """Gzipped unsigned-byte IDX images (n, size, size) and labels (n,), as Fashion-MNIST ships them."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(len(labels), size, size), dtype=np.uint8)
    with gzip.open(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), "wb") as handle:
        handle.write(struct.pack(">IIII", 0x0803, len(labels), size, size) + images.tobytes())
    with gzip.open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as handle:
        handle.write(struct.pack(">II", 0x0801, len(labels)) + np.asarray(labels, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """A resnet trained one epoch on a 4-class tree; a 3-class test tree (one file named with a space, one in a
    sub-folder); a larger tree for the back-ends; an IDX folder with a 1-channel checkpoint; speech features and a
    speech checkpoint."""
    root = tmp_path_factory.mktemp("embed_images")
    paths = {"train": make_image_tree(str(root / "train"), n_classes=4, per_class=10, seed=0)}
    paths["test"] = make_image_tree(str(root / "test"), n_classes=3, per_class=6, seed=3)
    paths["many"] = make_image_tree(str(root / "many"), n_classes=4, per_class=20, seed=4)  # more than 64 + 4
    os.rename(root / "test" / "class0" / "5.png", root / "test" / "class0" / "a b.png")
    os.makedirs(root / "test" / "class1" / "more")
    os.rename(root / "test" / "class1" / "5.png", root / "test" / "class1" / "more" / "5.png")
    argv = ["--data-path", paths["train"], "--checkpoint-path", str(root / "cp"), "--epochs", "1",
            "--batch-size", "20", "--lr", "0.05", "--verbose", "0", "--softmax", "am_softmax", *ARCH, *CPU]  # fmt: skip
    assert train.main(argv) == 0
    paths["cp"] = str(root / "cp" / "checkpoint_1ep.pt")
    os.makedirs(root / "idx")
    write_idx(str(root / "idx"), "train", [0, 1, 2] * 4, seed=1)
    write_idx(str(root / "idx"), "t10k", [2, 0, 1, 1, 0, 2, 0, 1, 2, 0, 1, 2], seed=2)
    paths["idx"] = str(root / "idx")
    paths["cp_gray"] = write_checkpoint(
        str(root / "gray.pt"), "resnet", 3, {"in_channels": 1, "stem": "cifar", "width": 8}
    )
    paths["kaldi"] = str(root / "kaldi")
    write_kaldi_dir(paths["kaldi"])
    paths["h5"] = str(root / "feats.hdf")
    write_speaker_hdf5(paths["h5"], {"spk0": 2, "spk1": 2})
    paths["cp_speech"] = write_checkpoint(str(root / "tdnn.pt"), "TDNN", 3, {"ncoef": 30, "latent_size": 16})
    return paths


def embed_to(out, data, cp, *extra):
    assert embed.main(["--data", data, "--cp-path", cp, "--out-path", str(out), *CPU, *extra]) == 0
    return str(out)


def in_order(folder):
    """(ids, (N, d) vectors) of embed.py's output in the order written (the scp's)."""
    table = kaldiio.load_scp(os.path.join(folder, "embeddings.scp"))
    ids = list(table)
    return ids, np.stack([table[i] for i in ids])


def test_an_image_tree_gives_one_labelled_vector_per_image_with_provenance(d, tmp_path):
    out = embed_to(tmp_path / "emb", d["test"], d["cp"], "--batch-size", "4")
    expected = {f"class{c}-{i}" for c in range(3) for i in range(5)} | {"class0-a_b", "class1-more-5", "class2-5"}
    ids, vectors = in_order(out)
    assert set(ids) == expected and len(ids) == 18
    assert ids[:6] == ["class0-0", "class0-1", "class0-2", "class0-3", "class0-4", "class0-a_b"]  # the folder's order
    model = load_model(d["cp"], device="cpu")
    with h5py.File(os.path.join(out, "embeddings.h5"), "r") as h5:
        assert set(h5) == expected and h5.attrs["embedding_size"] == model.encoder.embedding_size == vectors.shape[1]
        assert {item: h5[item].attrs["spk"] for item in ids} == {item: item.split("-")[0] for item in ids}
        assert h5["class0-a_b"].attrs["path"] == os.path.join("class0", "a b.png")
        assert h5["class1-more-5"].attrs["path"] == os.path.join("class1", "more", "5.png")
        np.testing.assert_array_equal(np.stack([h5[item][()] for item in ids]), vectors)
    vectors_read, speakers, provenance = embedding_files.read_labelled(out)
    assert provenance == model_provenance(model) and sorted(set(speakers)) == ["class0", "class1", "class2"]
    assert np.isfinite(vectors_read).all() and vectors_read.shape == (18, model.encoder.embedding_size)


@pytest.mark.parametrize("select", [[], ["--classes", "0,2", "--items-per-class", "4"]], ids=["all", "selected"])
def test_cosine_of_two_vectors_is_eval_cos_score(d, tmp_path, select):
    """eval.py scores all pairs of the same images (named by position); embed.py writes them in that order, with
    the same --classes / --items-per-class draw, and the class labels agree with eval's target flags."""
    scores = str(tmp_path / "scores.out")
    assert eval_script.main(["--data-path", d["test"], "--cp-path", d["cp"], "--out-path", scores, *CPU, *select]) == 0
    ids, vectors = in_order(embed_to(tmp_path / "emb", d["test"], d["cp"], *select))
    assert len(ids) == (18 if not select else 8)
    found = read_scores(scores, ["cos"], ids=True)
    a, b = (np.asarray(x).astype(int) for x in (found.enroll, found.test))
    assert len(a) == len(ids) * (len(ids) - 1) // 2
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose((unit[a] * unit[b]).sum(1), found.columns["cos"], atol=2e-6)
    classes = np.array([item.split("-")[0] for item in ids])
    np.testing.assert_array_equal(classes[a] == classes[b], found.labels)


def test_image_embeddings_train_plda_and_a_distance_that_eval_uses(d, tmp_path):
    emb = embed_to(tmp_path / "emb", d["many"], d["cp"])
    plda, distance = str(tmp_path / "plda.json"), str(tmp_path / "distance.pt")
    assert train_plda.main(["--embeddings", emb, "--out", plda, "--lda-dim", "3", "--iterations", "5"]) == 0
    argv = ["--embeddings", emb, "--out", distance, "--steps", "5", "--batch-size", "10", "--hidden-size", "8", *CPU]
    assert train_distance.main(argv) == 0
    scores = str(tmp_path / "scores.out")
    backends = ["--plda", plda, "--distance", distance, "--cohort", os.path.join(emb, "embeddings.h5")]
    assert (
        eval_script.main(["--data-path", d["test"], "--cp-path", d["cp"], "--out-path", scores, *backends, *CPU]) == 0
    )
    found = read_scores(scores)
    assert {"plda", "snorm_cos"} <= set(found.columns) and all(np.isfinite(v).all() for v in found.columns.values())


def test_an_idx_folder_is_numbered_per_class_and_split(d, tmp_path):
    ids, vectors = in_order(embed_to(tmp_path / "test", d["idx"], d["cp_gray"]))
    assert ids == ["2-0", "0-0", "1-0", "1-1", "0-1", "2-1", "0-2", "1-2", "2-2", "0-3", "1-3", "2-3"]
    train_ids, _ = in_order(embed_to(tmp_path / "train", d["idx"], d["cp_gray"], "--split", "train"))
    assert train_ids[:4] == ["0-0", "1-0", "2-0", "0-1"] and len(train_ids) == 12
    picked, picked_vectors = in_order(embed_to(tmp_path / "sel", d["idx"], d["cp_gray"], "--classes", "1,2"))
    assert picked == [i for i in ids if i[0] in "12"]  # the same names, so the same items
    np.testing.assert_allclose(picked_vectors, vectors[[ids.index(i) for i in picked]], atol=1e-6)
    with h5py.File(tmp_path / "test" / "embeddings.h5", "r") as h5:
        assert h5["1-3"].attrs["spk"] == "1" and "path" not in h5["1-3"].attrs


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("image-cp-kaldi-folder", "holds speech features: embedding them needs a speech model"),
        ("image-cp-speech-hdf5", "holds speech features: embedding them needs a speech model"),
        ("image-cp-wav-dir", "--wav-dir needs a speech model; this checkpoint holds resnet (an image model)"),
        ("image-cp-utt2spk", "--utt2spk needs a speech model"),
        ("image-cp-min-frames", "--min-frames needs a speech model"),
        ("image-cp-split-of-tree", "is one split already"),
        ("image-cp-gray-idx", "have 1 channel(s) but the model takes 3"),
        ("image-cp-zero-items", "--items-per-class must be >= 1"),
        ("speech-cp-image-tree", "holds images: embedding them needs an image model; this checkpoint holds TDNN"),
        ("speech-cp-classes", "--classes needs an image model; this checkpoint holds TDNN (a speech model)"),
    ],
)
def test_a_source_of_the_other_domain_is_one_line_and_writes_nothing(d, tmp_path, capsys, case, expected):
    argv = {
        "image-cp-kaldi-folder": ["--data", d["kaldi"]],
        "image-cp-speech-hdf5": ["--data", d["h5"]],
        "image-cp-wav-dir": ["--wav-dir", d["test"]],
        "image-cp-utt2spk": ["--data", d["test"], "--utt2spk", os.path.join(d["kaldi"], "utt2spk")],
        "image-cp-min-frames": ["--data", d["test"], "--min-frames", "10"],
        "image-cp-split-of-tree": ["--data", d["test"], "--split", "train"],
        "image-cp-gray-idx": ["--data", d["idx"]],
        "image-cp-zero-items": ["--data", d["test"], "--items-per-class", "0"],
        "speech-cp-image-tree": ["--data", d["test"]],
        "speech-cp-classes": ["--data", d["kaldi"], "--classes", "0-1"],
    }[case]
    cp = d["cp_speech"] if case.startswith("speech") else d["cp"]
    out = tmp_path / "emb"
    with pytest.raises(SystemExit) as stop:
        cli(embed.main, [*argv, "--cp-path", cp, "--out-path", str(out), *CPU])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(lines) == 1 and expected in lines[0], lines
    assert not out.exists()


def test_two_images_that_would_share_an_id_are_refused(d, tmp_path, capsys):
    tree = make_image_tree(str(tmp_path / "tree"), n_classes=2, per_class=3)
    Image.open(os.path.join(tree, "class1", "2.png")).save(os.path.join(tree, "class1", "2.jpg"))
    with pytest.raises(SystemExit) as stop:
        cli(embed.main, ["--data", tree, "--cp-path", d["cp"], "--out-path", str(tmp_path / "emb"), *CPU])
    line = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "2.png would both be embedded as class1-2: rename one of them" in line
    assert not (tmp_path / "emb").exists()
