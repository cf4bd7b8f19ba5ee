"""train_plda.py end to end on embeddings in embed.py's formats (HDF5 with `spk` attributes, Kaldi ark/scp)."""

import h5py
import kaldiio
import numpy as np
import pytest

import train_plda
from e2e_verification.metrics import compute_eer
from e2e_verification.plda import PLDA
from utils import UserError


def make_embeddings(folder, speakers=12, per_speaker=6, dim=10, labelled=True, seed=0):
    """Write embeddings.h5 and embeddings.ark/scp as embed.py does; returns ({utt: spk}, {utt: vector})."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(speakers, dim)) * 2
    utt2spk, vectors = {}, {}
    for s in range(speakers):
        for u in range(per_speaker):
            utt = f"spk{s:03d}-utt{u:02d}"
            utt2spk[utt] = f"spk{s:03d}"
            vectors[utt] = (centres[s] + rng.normal(size=dim)).astype(np.float32)
    with h5py.File(folder / "embeddings.h5", "w") as h5:
        h5.attrs["embedding_size"] = dim
        h5.attrs["model"] = "TDNN"
        for utt, vec in vectors.items():
            dataset = h5.create_dataset(utt, data=vec)
            if labelled:
                dataset.attrs["spk"] = utt2spk[utt]
    with kaldiio.WriteHelper(f"ark,scp:{folder / 'embeddings.ark'},{folder / 'embeddings.scp'}") as writer:
        for utt, vec in vectors.items():
            writer(utt, vec)
    with open(folder / "utt2spk", "w") as handle:
        handle.writelines(f"{utt} {spk}\n" for utt, spk in utt2spk.items())
    return utt2spk, vectors


def test_trains_from_hdf5_speakers(tmp_path, capsys):
    utt2spk, vectors = make_embeddings(tmp_path)
    out = tmp_path / "plda.json"
    assert train_plda.main(["--embeddings", str(tmp_path / "embeddings.h5"), "--out", str(out), "--lda-dim", "6"]) == 0
    printed = capsys.readouterr().out
    assert "72 embeddings of 10 dimensions from 12 speakers" in printed
    assert "PLDA of 6 dimensions" in printed
    model = PLDA.load(out)
    x = np.stack(list(vectors.values()))
    labels = np.array(list(utt2spk.values()))
    scores = model.score_matrix(x, x)
    i, j = np.triu_indices(len(x), 1)
    assert compute_eer(scores[i, j], labels[i] == labels[j]) < 0.1


def test_scp_and_hdf5_give_the_same_model(tmp_path):
    make_embeddings(tmp_path)
    utt2spk = str(tmp_path / "utt2spk")
    train_plda.main(
        ["--embeddings", str(tmp_path / "embeddings.scp"), "--utt2spk", utt2spk, "--out", str(tmp_path / "a.json")]
    )
    train_plda.main(["--embeddings", str(tmp_path), "--out", str(tmp_path / "b.json")])  # the folder: embeddings.h5
    a, b = PLDA.load(tmp_path / "a.json"), PLDA.load(tmp_path / "b.json")
    np.testing.assert_array_equal(a.between, b.between)
    np.testing.assert_array_equal(a.transform, b.transform)


def test_utt2spk_selects_and_labels_unlabelled_hdf5(tmp_path, capsys):
    utt2spk, _ = make_embeddings(tmp_path, labelled=False)
    subset = [utt for utt in utt2spk if not utt.startswith("spk011")]
    (tmp_path / "part").write_text("".join(f"{utt} {utt2spk[utt]}\n" for utt in subset))
    argv = ["--embeddings", str(tmp_path / "embeddings.h5"), "--utt2spk", str(tmp_path / "part"), "--no-length-norm"]
    assert train_plda.main(argv + ["--out", str(tmp_path / "p.json")]) == 0
    assert "66 embeddings of 10 dimensions from 11 speakers" in capsys.readouterr().out
    assert PLDA.load(tmp_path / "p.json").length_norm is False


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing file", "embeddings not found"),
        ("empty folder", "no embeddings.h5 or embeddings.scp"),
        ("no speakers", "have no `spk` attribute: give their speakers with --utt2spk"),
        ("scp without utt2spk", "give --utt2spk"),
        ("one speaker", "at least 2 classes"),
        ("utt2spk lists none", "are listed in"),
        ("lda too large", "lda_dim 12 is larger than the embedding size 10"),
        ("missing out folder", "output folder does not exist"),
    ],
)
def test_bad_input(tmp_path, case, message):
    data = tmp_path / "emb"
    data.mkdir()
    utt2spk, _ = make_embeddings(data, labelled=case != "no speakers")
    h5, out = str(data / "embeddings.h5"), str(tmp_path / "plda.json")
    argv = {
        "missing file": ["--embeddings", str(tmp_path / "nope.h5"), "--out", out],
        "empty folder": ["--embeddings", str(tmp_path), "--out", out],
        "no speakers": ["--embeddings", h5, "--out", out],
        "scp without utt2spk": ["--embeddings", str(data / "embeddings.scp"), "--out", out],
        "one speaker": ["--embeddings", h5, "--utt2spk", str(tmp_path / "one"), "--out", out],
        "utt2spk lists none": ["--embeddings", h5, "--utt2spk", str(tmp_path / "other"), "--out", out],
        "lda too large": ["--embeddings", h5, "--lda-dim", "12", "--out", out],
        "missing out folder": ["--embeddings", h5, "--out", str(tmp_path / "no" / "plda.json")],
    }[case]
    (tmp_path / "one").write_text("".join(f"{utt} spk000\n" for utt in list(utt2spk)[:6]))
    (tmp_path / "other").write_text("someone-else spk999\n")
    with pytest.raises(UserError, match=message) as info:
        train_plda.main(argv)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "plda.json").exists()
