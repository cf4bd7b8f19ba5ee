"""Build a many-class open-set image set from Debian's font packages: a font file is a class, its glyphs the samples.

Each usable font renders the 62 characters a-z A-Z 0-9 as centred, size-normalised grayscale images (white ink on
black). A font is usable when at least --min-glyphs of them are real, distinct glyphs (not empty, not the font's
missing-glyph box); symbol fonts fail that test and fonts whose glyph set renders exactly like an earlier font's
are dropped as duplicates. Families (from the fonts' name tables) are split whole: --test-families unseen families
go to test/, the rest train; valid/ holds held-out glyphs of the training fonts (or, with --valid-open, the fonts
of further unseen families). The trees are image folders that data_load.load_images reads.
"""

import hashlib
import io
import os
import random
import signal
import string
import subprocess
import sys
from collections import Counter
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import UserError, atomic_folder, check_output_folder, cli, make_parser

# The Debian packages scanned by default (scripts/install.sh --test installs them): about 1,030 font files.
PACKAGES = (
    "fonts-3270 fonts-agave fonts-anonymous-pro fonts-bebas-neue fonts-beteckna fonts-bpg-georgian fonts-breip "
    "fonts-cabin fonts-cantarell fonts-cardo fonts-cmu fonts-comfortaa fonts-courier-prime fonts-croscore "
    "fonts-crosextra-caladea fonts-crosextra-carlito fonts-dejavu-extra fonts-dkg-handwriting fonts-dosis "
    "fonts-ebgaramond fonts-fantasque-sans fonts-firacode fonts-freefont-otf fonts-freefont-ttf fonts-go fonts-hack "
    "fonts-hermit fonts-humor-sans fonts-inconsolata fonts-inter fonts-jetbrains-mono fonts-junicode fonts-lato "
    "fonts-league-spartan fonts-liberation2 fonts-linuxlibertine fonts-lmodern fonts-manrope fonts-monoid "
    "fonts-mononoki fonts-noto-core fonts-noto-mono fonts-oflb-asana-math fonts-oflb-euterpe fonts-oldstandard "
    "fonts-open-sans fonts-paratype fonts-quicksand fonts-radisnoir fonts-recommended fonts-roboto-slab "
    "fonts-roboto-unhinted fonts-stix fonts-texgyre fonts-texgyre-math fonts-tuffy fonts-uralic fonts-urw-base35 "
    "fonts-vollkorn fonts-yanone-kaffeesatz"
).split()
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc", ".otc", ".pfb", ".pfa", ".t1")
GLYPHS = string.ascii_lowercase + string.ascii_uppercase + string.digits
MISSING = ("\U0010ffff", "\uffff")  # code points no font maps: they render the font's missing-glyph box
SELECT_PX = 128  # font size (pixels) at which glyphs are compared, so the kept fonts do not depend on --size
SPLITS = ("train", "valid", "test")
THUMB = 16  # side of the glyph thumbnails that near-duplicate fonts are found with
# Fonts whose Unicode cmap maps a-z A-Z 0-9 to symbols (URW's Dingbats and Symbol as OpenType): real, distinct
# glyphs, so only their name gives them away. Their Type 1 versions map by glyph name and fail --min-glyphs.
SYMBOL_FAMILIES = {"d050000l", "standard symbols ps"}


def glyph_name(char):
    """File stem of a glyph image: 'lower-a', 'upper-a', 'digit-0' (safe on case-insensitive file systems)."""
    kind = "digit" if char.isdigit() else "upper" if char.isupper() else "lower"
    return f"{kind}-{char.lower()}"


def package_fonts(packages):
    """(font files that dpkg lists for the installed `packages`, the packages that are not installed)."""
    files, missing = [], []
    for package in packages:
        try:
            done = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
        except FileNotFoundError:
            return [], list(packages)
        if done.returncode != 0:
            missing.append(package)
            continue
        files += [line for line in done.stdout.splitlines() if line.lower().endswith(FONT_EXTENSIONS)]
    return files, missing


def folder_fonts(folder):
    """Font files under `folder` (followed into sub-folders and symlinks)."""
    if not os.path.isdir(folder):
        raise UserError(f"--fonts-dir not found: {folder}")
    found = []
    for dirpath, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [os.path.join(dirpath, name) for name in sorted(files) if name.lower().endswith(FONT_EXTENSIONS)]
    return found


def find_fonts(packages, folders):
    """Sorted absolute paths of the font files of `packages` and `folders`, one per real file."""
    files, missing = package_fonts(packages)
    for folder in folders:
        files += folder_fonts(folder)
    paths, seen = [], set()
    for path in sorted({os.path.abspath(p) for p in files if os.path.isfile(p)}):
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            paths.append(path)
    return paths, missing


def render(font, char):
    """`char` drawn white on black with `font`, cropped to its ink: an 'L' image, or None when it has no ink."""
    left, top, right, bottom = font.getbbox(char)
    margin = font.size // 2
    canvas = Image.new("L", (right - min(left, 0) + 2 * margin, bottom - min(top, 0) + 2 * margin), 0)
    ImageDraw.Draw(canvas).text((margin - min(left, 0), margin - min(top, 0)), char, font=font, fill=255)
    box = canvas.getbbox()
    return canvas.crop(box) if box else None


def open_font(path, px):
    """The font at `path` at `px` pixels, with the plain layout engine (the same glyphs with or without raqm)."""
    return ImageFont.truetype(path, px, layout_engine=ImageFont.Layout.BASIC)


def real_glyphs(font):
    """{char: cropped image} for the characters of GLYPHS that are real and distinct in `font`.

    A glyph is dropped when it is empty, identical to the missing-glyph box, or identical to an earlier glyph.
    """
    seen = {(im.size, im.tobytes()) for im in map(lambda c: render(font, c), MISSING) if im is not None}
    glyphs = {}
    for char in GLYPHS:
        image = render(font, char)
        if image is None or (image.size, image.tobytes()) in seen:
            continue
        seen.add((image.size, image.tobytes()))
        glyphs[char] = image
    return glyphs


def normalise(image, size):
    """Scale a cropped glyph so its longer side is size - 4 pixels and centre it on a black (size, size) square."""
    width, height = image.size
    scale = (size - 4) / max(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    out = Image.new("L", (size, size), 0)
    out.paste(image.resize(new, Image.Resampling.LANCZOS), ((size - new[0]) // 2, (size - new[1]) // 2))
    return out


def png_bytes(image):
    """PNG encoding of `image` without metadata (byte-identical for identical pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def examine(task):
    """Render one font file: a dict with family, style, its real glyphs as PNGs of (size, size), a digest of the
    glyph set and `thumbs`, the glyphs as (62, THUMB * THUMB) uint8 for near-duplicate tests (zero rows: missing).

    `task` is (path, size). Files that cannot be read or rendered come back with `error` set and no glyphs (a
    broken font file is dropped as unreadable, never a traceback from a worker process).
    """
    path, size = task
    try:
        font = open_font(path, SELECT_PX)
        family, style = font.getname()
        glyphs = real_glyphs(font)
        if glyphs and 4 * size != SELECT_PX:
            big = open_font(path, 4 * size)
            images = {char: render(big, char) for char in glyphs}
        else:
            images = glyphs
    except Exception as err:  # noqa: BLE001 (FreeType and PIL raise many kinds of error on a broken file)
        return {"path": path, "error": str(err) or type(err).__name__, "glyphs": []}
    digest = hashlib.sha1()
    thumbs = np.zeros((len(GLYPHS), THUMB * THUMB), np.uint8)
    for char, image in glyphs.items():
        digest.update(f"{char}{image.size}".encode() + image.tobytes())
        thumbs[GLYPHS.index(char)] = np.asarray(normalise(image, THUMB)).ravel()
    return {
        "path": path,
        "family": " ".join((family or os.path.splitext(os.path.basename(path))[0]).lower().split()),
        "style": " ".join((style or "regular").lower().split()),
        "digest": digest.hexdigest(),
        "thumbs": thumbs,
        "glyphs": [(glyph_name(c), png_bytes(normalise(im, size))) for c, im in images.items() if im is not None],
    }


# The signals a rendering process must not get before quiet_worker has set its own handlers.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def quiet_worker():
    """Pool initialiser: a rendering process leaves the process group, so the signals of Ctrl-C, `timeout` and
    the like reach only the parent, which stops the pool (a worker killed by them while it reads the task queue
    would leave the queue's lock held and the pool's shutdown stuck, and each printed a traceback); the pool's own
    SIGTERM then ends it silently. Last, the signals render_pool blocked are let in."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def render_pool(jobs):
    """A Pool of `jobs` rendering processes, started with SIGINT and SIGTERM blocked: its processes, and those its
    threads (which keep the mask) start later, get neither before quiet_worker has run."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return Pool(jobs, initializer=quiet_worker)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def slug(text):
    """`text` as a folder-name piece: lower-case letters, digits and '-'."""
    return "-".join("".join(c if c.isalnum() and c.isascii() else " " for c in text).split()) or "x"


def distances(records):
    """(n, n) RMS pixel difference in [0, 1] between the fonts' thumbnails, over the glyphs both fonts have."""
    total = np.zeros((len(records), len(records)))
    shared = np.zeros_like(total)
    for g in range(len(GLYPHS)):
        x = np.stack([rec["thumbs"][g] for rec in records]).astype(np.float64) / 255
        have = np.asarray([rec["thumbs"][g].any() for rec in records], np.float64)
        sq = (x * x).sum(1)
        both = have[:, None] * have[None, :]
        total += np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0) * both
        shared += both
    return np.sqrt(total / np.maximum(shared, 1) / (THUMB * THUMB))


def select(records, args):
    """Kept fonts (with a unique `cls` folder name, in `records` order) and the dropped ones (with a `reason`).

    A font is dropped when unreadable, a symbol font, short of --min-glyphs real glyphs, or a duplicate of an
    earlier kept font: an identical glyph set, or one within --dup-distance (the same outlines under another name).
    """
    candidates, dropped, digests = [], [], set()
    for rec in records:
        if "error" in rec:
            rec["reason"] = "unreadable"
        elif rec["family"] in SYMBOL_FAMILIES:
            rec["reason"] = "symbol font"
        elif len(rec["glyphs"]) < args.min_glyphs:
            rec["reason"] = f"fewer than {args.min_glyphs} real glyphs"
        elif rec["digest"] in digests:
            rec["reason"] = "identical to an earlier font"
        else:
            digests.add(rec["digest"])
            candidates.append(rec)
            continue
        dropped.append(rec)
    kept, close = [], distances(candidates) if candidates else None
    for index, rec in enumerate(candidates):
        twin = next((k for k in kept if close[index, k] < args.dup_distance), None)
        if twin is not None:
            rec["reason"], rec["twin"] = "within --dup-distance of an earlier font", candidates[twin]["path"]
            dropped.append(rec)
            continue
        kept.append(index)
    close = close[np.ix_(kept, kept)] if kept else None
    kept = [candidates[index] for index in kept]
    for rec in kept:
        path_hash = hashlib.sha1(rec["path"].encode()).hexdigest()[:8]
        rec["cls"] = f"{slug(rec['family'])}__{slug(rec['style'])}__{path_hash}"
    assert len({rec["cls"] for rec in kept}) == len(kept), "class folder names must be unique"
    return kept, dropped, close


def family_groups(kept, close, group_distance):
    """Set each kept font's `group`: families joined (transitively) when two of their fonts are within
    `group_distance` (clones of one design under several names, e.g. Times and its metric clones)."""
    parent = {rec["family"]: rec["family"] for rec in kept}

    def root(family):
        while parent[family] != family:
            family = parent[family]
        return family

    for i, j in zip(*np.nonzero(close < group_distance)):
        a, b = sorted((root(kept[i]["family"]), root(kept[j]["family"])))
        parent[b] = a
    for rec in kept:
        rec["group"] = root(rec["family"])


def assign_splits(kept, args):
    """Set each kept font's `split` by family group: a seeded shuffle of the sorted groups fills test/ (and valid/
    with --valid-open) until each holds at least the requested number of families; the rest train."""
    members = {}
    for rec in kept:
        members.setdefault(rec["group"], set()).add(rec["family"])
    order = sorted(members)
    random.Random(args.seed).shuffle(order)
    wanted = [("test", args.test_families)] + ([("valid", args.valid_families)] if args.valid_open else [])
    side, index = {}, 0
    for split, n_families in wanted:
        have = 0
        while have < n_families and index < len(order):
            side[order[index]] = split
            have += len(members[order[index]])
            index += 1
    n_train = sum(len(members[group]) for group in order[index:])
    if n_train < 2:
        raise UserError(
            f"{len(kept)} fonts in {sum(map(len, members.values()))} families ({len(members)} groups of near-identical"
            f" families) are too few for the requested split with 2 families left for training: lower"
            " --test-families / --valid-families or add fonts"
        )
    for rec in kept:
        rec["split"] = side.get(rec["group"], "train")


def write_tree(out, kept, dropped, args):
    """Write train/ valid/ test/, fonts.tsv (kept fonts) and dropped.tsv into the new folder `out`.

    Returns {split: (classes, families, images)}.
    """
    counts = {name: [set(), set(), 0] for name in SPLITS}
    rows = ["class\tfamily\tgroup\tstyle\tpath\tsplit\tglyphs"]
    for rec in sorted(kept, key=lambda r: r["cls"]):
        held = set()
        if rec["split"] == "train" and not args.valid_open and args.valid_glyphs > 0:
            names = sorted(name for name, _ in rec["glyphs"])
            held = set(random.Random(f"{args.seed}/{rec['cls']}").sample(names, args.valid_glyphs))
        for name, data in rec["glyphs"]:
            split = "valid" if name in held else rec["split"]
            folder = os.path.join(out, split, rec["cls"])
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, name + ".png"), "wb") as handle:
                handle.write(data)
            counts[split][0].add(rec["cls"])
            counts[split][1].add(rec["family"])
            counts[split][2] += 1
        fields = [rec[key] for key in ("cls", "family", "group", "style", "path", "split")]
        rows.append("\t".join(fields + [str(len(rec["glyphs"]))]))
    with open(os.path.join(out, "fonts.tsv"), "w") as handle:
        handle.write("\n".join(rows) + "\n")
    rows = ["path\tfamily\tstyle\treason\tsame_as"]
    for rec in dropped:
        rows.append(
            "\t".join([rec["path"], rec.get("family", ""), rec.get("style", ""), rec["reason"], rec.get("twin", "")])
        )
    with open(os.path.join(out, "dropped.tsv"), "w") as handle:
        handle.write("\n".join(rows) + "\n")
    return {name: (len(classes), len(families), images) for name, (classes, families, images) in counts.items()}


EXAMPLE = "example:\n  python tools/font_set.py --out data/fonts32 --size 32 --test-families 40 --jobs 2"

# The builder's flags (see utils.add_options).
OPTIONS = {
    "--out": dict(required=True, help="output folder (train/, valid/, test/, fonts.tsv)"),
    "--fonts-dir": dict(action="append", default=[], help="also scan this folder for font files (repeatable)"),
    "--packages": dict(
        nargs="*",
        default=None,
        help="Debian packages to take fonts from (default: the built-in list of 60; none: only --fonts-dir)",
    ),
    "--size": (int, 32, "image side in pixels (default 32)"),
    "--min-glyphs": (int, 50, "keep fonts with at least this many real, distinct glyphs of a-z A-Z 0-9 (default 50)"),
    "--test-families": (int, 40, "unseen families in test/ (default 40)"),
    "--valid-glyphs": (int, 6, "glyphs per training font held out in valid/ (default 6; 0: no valid/)"),
    "--valid-open": ("valid/ holds the fonts of --valid-families further unseen families instead of held-out glyphs",),
    "--valid-families": (int, 20, "unseen families in valid/ with --valid-open (default 20)"),
    "--dup-distance": (
        float,
        0.03,
        "drop a font whose glyphs are within this RMS difference (0-1, 16-pixel thumbnails) of an earlier "
        "kept font's: the same outlines under another name (default 0.03; 0: only identical ones)",
    ),
    "--group-distance": (
        float,
        0.08,
        "put families on one side of the split when two of their fonts are within this RMS difference "
        "(default 0.08: clones of one design; 0: families only)",
    ),
    "--seed": (int, 0, "seed of the family split and held-out glyphs (default 0)"),
    "--jobs": (int, 2, "parallel rendering processes (default 2)"),
    "--force": ("replace --out when it holds an earlier output of this tool (other folders are never replaced)",),
}


def build_parser():
    """The command line of the font set builder."""
    return make_parser(__doc__, EXAMPLE, OPTIONS, allow_abbrev=False)


def check_args(args):
    """One-line errors for flag values a user can get wrong."""
    if args.size < 8:
        raise UserError(f"--size must be at least 8 pixels, got {args.size}")
    if not 1 <= args.min_glyphs <= len(GLYPHS):
        raise UserError(f"--min-glyphs must be in [1, {len(GLYPHS)}], got {args.min_glyphs}")
    if args.test_families < 1:
        raise UserError(f"--test-families must be >= 1, got {args.test_families}")
    if args.valid_open and args.valid_families < 1:
        raise UserError(f"--valid-families must be >= 1 with --valid-open, got {args.valid_families}")
    if not 0 <= args.valid_glyphs < args.min_glyphs:
        raise UserError(f"--valid-glyphs must be in [0, --min-glyphs), got {args.valid_glyphs}")
    if not (0 <= args.dup_distance <= 1 and 0 <= args.group_distance <= 1):
        raise UserError(
            f"--dup-distance and --group-distance must be in [0, 1], got {args.dup_distance}, {args.group_distance}"
        )
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    fonts = [("--fonts-dir", folder) for folder in args.fonts_dir]
    return check_output_folder("--out", args.out, "font_set", args.force, fonts, around=fonts, create=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = check_args(args)
    packages = PACKAGES if args.packages is None else args.packages
    paths, missing = find_fonts(packages, args.fonts_dir)
    print(f"packages: {len(packages) - len(missing)} installed, {len(missing)} missing {' '.join(missing)}".rstrip())
    if not paths:
        raise UserError(
            "no font files found: install the font packages (scripts/install.sh --test) or give --fonts-dir"
        )
    tasks = [(path, args.size) for path in paths]
    bar = dict(total=len(tasks), desc="fonts", unit="font", disable=None)
    if args.jobs == 1:
        records = [examine(task) for task in tqdm(tasks, **bar)]
    else:
        with render_pool(args.jobs) as pool:
            records = list(tqdm(pool.imap(examine, tasks, chunksize=4), **bar))
    kept, dropped, close = select(records, args)
    if not kept:
        reasons = Counter(rec["reason"] for rec in dropped)
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
        raise UserError(f"none of the {len(paths)} font files is usable ({reasons})")
    family_groups(kept, close, args.group_distance)
    assign_splits(kept, args)
    with atomic_folder(out, "font_set") as tmp:
        counts = write_tree(tmp, kept, dropped, args)
    n_families, n_groups = len({r["family"] for r in kept}), len({r["group"] for r in kept})
    print(f"fonts: {len(paths)} found, {len(kept)} kept in {n_families} families ({n_groups} groups of clones)")
    for reason, count in sorted(Counter(rec["reason"] for rec in dropped).items()):
        print(f"dropped: {count} {reason}")
    for name in SPLITS:
        classes, families, images = counts[name]
        print(f"{name}: {classes} classes, {families} families, {images} images")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    cli(main)
