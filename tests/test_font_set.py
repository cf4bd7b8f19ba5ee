"""tools/font_set.py on a dozen real Debian font files: family split, determinism, dropped fonts, sizes, bad input."""

import csv
import hashlib
import os
import shutil

import pytest
from PIL import Image

import data_load
from tools import font_set
from utils import UserError

FONTS = [
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Bold.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSerif-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSerif-Bold.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationMono-Regular.ttf",
    "/usr/share/fonts/truetype/hack/Hack-Regular.ttf",
    "/usr/share/fonts/truetype/hack/Hack-Bold.ttf",
    "/usr/share/fonts/truetype/comfortaa/Comfortaa-Regular.ttf",
    "/usr/share/fonts/truetype/comfortaa/Comfortaa-Bold.ttf",
    "/usr/share/fonts/opentype/cantarell/Cantarell-Regular.otf",
    "/usr/share/fonts/opentype/cantarell/Cantarell-Bold.otf",
]
SYMBOL = "/usr/share/fonts/opentype/urw-base35/D050000L.otf"  # Dingbats: a-z mapped to dingbats
NO_LATIN = "/usr/share/fonts/truetype/noto/NotoKufiArabic-Regular.ttf"  # Arabic only: Latin renders the .notdef box
FAMILIES = 6

pytestmark = pytest.mark.skipif(
    not all(os.path.isfile(p) for p in FONTS + [SYMBOL, NO_LATIN]),
    reason="Debian font packages not installed (scripts/install.sh --test)",
)


@pytest.fixture
def fonts_dir(tmp_path):
    """A folder of font files: 11 usable ones in 6 families, a renamed copy, a symbol and an Arabic-only font."""
    folder = tmp_path / "fonts"
    folder.mkdir()
    for path in FONTS + [SYMBOL, NO_LATIN]:
        os.symlink(path, folder / os.path.basename(path))
    shutil.copy(FONTS[0], folder / "zz-copy-of-LiberationSans.ttf")
    return str(folder)


def build(out, fonts_dir, *flags):
    argv = ["--out", str(out), "--packages", "--fonts-dir", fonts_dir, "--test-families", "2", *flags]
    assert font_set.main(argv) == 0
    return str(out)


def read_tsv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def tree_hashes(folder):
    """{relative path: sha1} of every file under `folder`."""
    hashes = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as handle:
                hashes[os.path.relpath(path, folder)] = hashlib.sha1(handle.read()).hexdigest()
    return hashes


def test_split_drops_and_images(tmp_path, fonts_dir):
    out = build(tmp_path / "set", fonts_dir, "--size", "24", "--valid-glyphs", "4")
    fonts = read_tsv(os.path.join(out, "fonts.tsv"))
    assert len(fonts) == len(FONTS)
    assert len({row["family"] for row in fonts}) == FAMILIES
    sides = {}
    for row in fonts:
        sides.setdefault(row["family"], set()).add(row["split"])
        sides.setdefault(row["group"], set()).add(row["split"])
    assert all(len(s) == 1 for s in sides.values()), sides
    test_families = {row["family"] for row in fonts if row["split"] == "test"}
    assert len(test_families) >= 2 and test_families != {row["family"] for row in fonts}
    dropped = {os.path.basename(row["path"]): row["reason"] for row in read_tsv(os.path.join(out, "dropped.tsv"))}
    assert dropped == {
        "zz-copy-of-LiberationSans.ttf": "identical to an earlier font",
        os.path.basename(SYMBOL): "symbol font",
        os.path.basename(NO_LATIN): "fewer than 50 real glyphs",
    }
    for row in fonts:
        folders = [os.path.join(out, split, row["class"]) for split in font_set.SPLITS]
        pngs = [os.path.join(f, name) for f in folders if os.path.isdir(f) for name in os.listdir(f)]
        assert len(pngs) == int(row["glyphs"]) >= 50
        if row["split"] == "train":
            assert len(os.listdir(os.path.join(out, "valid", row["class"]))) == 4
        for path in pngs[:5]:
            with Image.open(path) as image:
                assert image.size == (24, 24) and image.mode == "L"
    train = data_load.load_images(os.path.join(out, "train"), "train")
    assert train.image_shape == (3, 24, 24)
    assert int(train.labels.max()) + 1 == sum(row["split"] == "train" for row in fonts)


def test_missing_glyphs_are_not_counted():
    font = font_set.open_font(NO_LATIN, font_set.SELECT_PX)
    assert len(font_set.real_glyphs(font)) < 20
    assert len(font_set.real_glyphs(font_set.open_font(FONTS[0], font_set.SELECT_PX))) == 62


def test_two_runs_are_byte_identical(tmp_path, fonts_dir):
    first = tree_hashes(build(tmp_path / "a", fonts_dir, "--jobs", "1"))
    second = tree_hashes(build(tmp_path / "b", fonts_dir, "--jobs", "2"))
    assert len(first) > 500 and first == second
    third = tree_hashes(build(tmp_path / "c", fonts_dir, "--jobs", "1", "--seed", "1"))
    assert third != first


def test_valid_open_holds_unseen_families(tmp_path, fonts_dir):
    out = build(tmp_path / "set", fonts_dir, "--valid-open", "--valid-families", "1")
    fonts = read_tsv(os.path.join(out, "fonts.tsv"))
    families = {split: {r["family"] for r in fonts if r["split"] == split} for split in font_set.SPLITS}
    assert all(families.values())
    assert not (families["train"] & families["valid"]) and not (families["train"] & families["test"])
    assert sorted(os.listdir(os.path.join(out, "valid"))) == sorted(r["class"] for r in fonts if r["split"] == "valid")


def test_bad_input(tmp_path, fonts_dir):
    with pytest.raises(UserError, match="--fonts-dir not found"):
        build(tmp_path / "x", str(tmp_path / "nowhere"))
    symbols = tmp_path / "symbols"
    symbols.mkdir()
    os.symlink(SYMBOL, symbols / "d.otf")
    with pytest.raises(UserError, match=r"none of the 1 font files is usable \(1 symbol font\)"):
        build(tmp_path / "x", str(symbols))
    with pytest.raises(UserError, match="too few for the requested split"):
        build(tmp_path / "x", fonts_dir, "--test-families", "5")
    with pytest.raises(UserError, match="--jobs must be >= 1"):
        build(tmp_path / "x", fonts_dir, "--jobs", "0")
    assert not os.path.exists(tmp_path / "x") and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    out = build(tmp_path / "set", fonts_dir)
    with pytest.raises(UserError, match="exists and is not empty"):
        build(out, fonts_dir)
    before = tree_hashes(out)
    build(out, fonts_dir, "--force", "--seed", "3")
    assert tree_hashes(out) != before and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
