"""Input files that used to be misread or crash (items 7, 10, 14, 16, 28, 33): every wav goes through
frontend.read_wav (+ check_recording for what is embedded), every image file through data_load.read_image;
each bad file is one line naming the cause, through the real verify.py / embed.py where it matters."""

import contextlib
import json
import os
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from test_embed_wav import run, write_speech_checkpoint, write_wav
from tiny_data import write_checkpoint

import data_load
import data_prep
import embed
import verify
from e2e_verification import frontend, image_input
from e2e_verification.checkpoints import load_checkpoint, save_checkpoint
from e2e_verification.frontend import FrontEnd, read_wav
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 8000


def script(name, *argv, cwd):
    """Run a command of the repository in a subprocess -> CompletedProcess (text)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, name), *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


def refused(done, name, *expected):
    """The command stopped with exit 2 and one stderr line `<name>: error: ...` holding every `expected`."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"{name}: error: ") and all(e in lines[0] for e in expected), lines[0]
    assert not done.stdout, done.stdout
    return lines[0]


def speech(seconds, seed=0, rate=RATE):
    """int16 samples of a tone plus noise."""
    n = int(rate * seconds)
    t = np.arange(n) / rate
    rng = np.random.default_rng(seed)
    return np.clip(3000 * np.sin(2 * np.pi * 220 * t) + rng.normal(0, 500, n), -32768, 32767).astype(np.int16)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    """A speech TDNN checkpoint on 8 kHz MFCCs, a 1 s enrollment recording and a wav folder for embed.py."""
    root = tmp_path_factory.mktemp("inputs_speech")
    paths = {"root": root, "cp": write_speech_checkpoint(root / "tdnn.pt", FrontEnd.mfcc(30, RATE).to_dict())}
    paths["enroll"] = str(root / "enroll.wav")
    write_wav(paths["enroll"], speech(1.0))
    return paths


def verify_argv(sp, test):
    return ["--cp-path", sp["cp"], "--enroll", sp["enroll"], "--test", str(test), "--device", "cpu"]


# ----------------------------------------------------------------------------- item 28: what a non-wav is


def riff(*chunks):
    """A RIFF/WAVE file's bytes from (id, body) chunks."""
    body = b"WAVE" + b"".join(c + struct.pack("<I", len(b)) + b + bytes(len(b) % 2) for c, b in chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def fmt(tag=1, channels=1, rate=RATE, bits=16):
    block = channels * bits // 8
    return b"fmt ", struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)


def test_item28_wav_refusals_name_the_cause(tmp_path):
    """Each way a file is not a usable wav gives its own cause, never empty parentheses."""
    cases = {
        "zero.wav": (b"", "is empty (0 bytes)"),
        "text.wav": (b"hello, I am a text file\n", "no RIFF/WAVE header"),
        "png.wav": (b"\x89PNG\r\n\x1a\n" + bytes(40), "no RIFF/WAVE header"),
        "short_header.wav": (b"RIFF", "no RIFF/WAVE header"),
        "no_fmt.wav": (riff((b"data", bytes(8))), "its data chunk comes before its fmt chunk"),
        "no_data.wav": (riff(fmt(), (b"LIST", b"abcd")), "it has no data chunk"),
        "cut_fmt.wav": (riff((b"fmt ", bytes(6))), "its fmt chunk is cut short"),
        "float.wav": (riff(fmt(3, bits=32), (b"data", bytes(16))), "its samples are IEEE floats (format tag 3)"),
        "alaw.wav": (riff(fmt(6, bits=8), (b"data", bytes(16))), "A-law"),
        "stereo.wav": (riff(fmt(channels=2), (b"data", bytes(16))), "has 2 channel(s) of 16-bit samples"),
        "8bit.wav": (riff(fmt(bits=8), (b"data", bytes(16))), "has 1 channel(s) of 8-bit samples"),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError) as err:
            read_wav(tmp_path / name)
        message = str(err.value)
        assert expected in message and "()" not in message and str(tmp_path / name) in message, (name, message)
    (tmp_path / "folder.wav").mkdir()
    with pytest.raises(UserError, match="cannot read .*folder.wav: Is a directory"):
        read_wav(tmp_path / "folder.wav")


def test_item28_readable_wavs_still_read(tmp_path):
    """A LIST chunk before the samples, an odd-sized chunk's pad byte, WAVE_FORMAT_EXTENSIBLE holding PCM."""
    samples = np.array([0, 1, -1, 32767, -32768, 1234], dtype="<i2")
    data = (b"data", samples.tobytes())
    (tmp_path / "list.wav").write_bytes(riff((b"LIST", b"odd"), fmt(), (b"junk", b"x"), data))
    guid = struct.pack("<H", 1) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    ext = struct.pack("<HHIIHHHHI", 0xFFFE, 1, 16000, 32000, 2, 16, 22, 16, 4) + guid
    (tmp_path / "ext.wav").write_bytes(riff((b"fmt ", ext), data))
    piped = bytearray(riff(fmt(), data))
    for placeholder in (0x7FFFF000, 0xFFFFFFFF):  # sox / ffmpeg writing to a pipe: the samples run to the end
        piped[40:44] = struct.pack("<I", placeholder)
        (tmp_path / f"pipe{placeholder:x}.wav").write_bytes(piped)
    names = {"list.wav": RATE, "ext.wav": 16000, "pipe7ffff000.wav": RATE, "pipeffffffff.wav": RATE}
    for name, rate in names.items():
        got, got_rate = read_wav(tmp_path / name)
        assert got.tolist() == samples.tolist() and got_rate == rate and got.dtype == np.float32, name
    (tmp_path / "pipe_cut.wav").write_bytes(piped[:-1])
    with pytest.raises(UserError, match="pipe_cut.wav is truncated: its data chunk holds an odd number of bytes"):
        read_wav(tmp_path / "pipe_cut.wav")


def test_item28_verify_names_the_cause(sp, tmp_path, capsys):
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "notes.wav").write_text("this is not audio\n")
    for name, expected in (("zero.wav", "is empty (0 bytes)"), ("notes.wav", "no RIFF/WAVE header")):
        code, out, err = run(verify.main, verify_argv(sp, tmp_path / name), capsys)
        assert code == 2 and expected in err and "()" not in err and len(err.strip().splitlines()) == 1, err
    refused(script("verify.py", *verify_argv(sp, tmp_path / "zero.wav"), cwd=tmp_path), "verify.py", "0 bytes")


# ----------------------------------------------------------------------------- item 14: truncated wavs


def test_item14_truncated_wav_is_refused_by_the_reader(tmp_path):
    write_wav(tmp_path / "whole.wav", speech(0.5))
    raw = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "cut_odd.wav").write_bytes(raw[:-1])  # the header announces 1 byte more than is there
    (tmp_path / "cut_even.wav").write_bytes(raw[:-1000])
    (tmp_path / "odd_chunk.wav").write_bytes(riff(fmt(), (b"data", bytes(1999))))  # half a sample
    for name in ("cut_odd.wav", "cut_even.wav", "odd_chunk.wav"):
        with pytest.raises(UserError, match=f"{name} is truncated: its data chunk"):
            read_wav(tmp_path / name)
    assert len(read_wav(tmp_path / "whole.wav")[0]) == 4000


def test_item14_truncated_wav_in_verify_and_embed_wav_dir(sp, tmp_path):
    write_wav(tmp_path / "whole.wav", speech(0.5, seed=1))
    cut = tmp_path / "cut.wav"
    cut.write_bytes((tmp_path / "whole.wav").read_bytes()[:-1])
    refused(script("verify.py", *verify_argv(sp, cut), cwd=tmp_path), "verify.py", f"{cut} is truncated")
    wavs = tmp_path / "wavs"
    for spk in ("anna", "bert"):
        (wavs / spk).mkdir(parents=True)
        write_wav(wavs / spk / "u0.wav", speech(0.6, seed=len(spk)))
    (wavs / "bert" / "u1.wav").write_bytes(cut.read_bytes())
    out = tmp_path / "emb"
    argv = ["--wav-dir", wavs, "--cp-path", sp["cp"], "--out-path", out, "--device", "cpu"]
    refused(script("embed.py", *argv, cwd=tmp_path), "embed.py", "u1.wav is truncated")
    assert not out.exists()


def test_item14_truncated_wav_in_data_prep(tmp_path, capsys):
    write_wav(tmp_path / "a.wav", speech(0.5))
    (tmp_path / "b.wav").write_bytes((tmp_path / "a.wav").read_bytes()[:-1])
    (tmp_path / "wav.scp").write_text(f"s1-a {tmp_path / 'a.wav'}\ns1-b {tmp_path / 'b.wav'}\n")
    (tmp_path / "utt2spk").write_text("s1-a s1\ns1-b s1\n")
    argv = ["--wav-scp", str(tmp_path / "wav.scp"), "--out-path", str(tmp_path / "out"), "--out-name", "x.hdf"]
    code, _, err = run(data_prep.main, argv, capsys)
    assert code == 2 and "b.wav is truncated" in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- item 33: implausible rates


def test_item33_implausible_sample_rates_are_refused_before_resampling(sp, tmp_path, capsys):
    for rate in (0, 7, 3999, 384001, 4_000_000):
        path = tmp_path / f"r{rate}.wav"
        path.write_bytes(riff(fmt(rate=rate), (b"data", speech(0.5).tobytes())))
        with pytest.raises(UserError, match=f"sample rate is {rate} Hz, outside the 4000..384000 Hz"):
            read_wav(path)
    for rate in (4000, 384000):
        write_wav(tmp_path / f"ok{rate}.wav", speech(0.1, rate=rate), rate=rate)
        assert read_wav(tmp_path / f"ok{rate}.wav")[1] == rate
    with pytest.raises(UserError, match="sample rate within 4000..384000 Hz"):
        FrontEnd.mfcc(30, 7)
    write_wav(tmp_path / "seven.wav", speech(2.0), rate=7)  # 16000 samples that claim to last 38 minutes
    done = script("verify.py", *verify_argv(sp, tmp_path / "seven.wav"), cwd=tmp_path)
    refused(done, "verify.py", "seven.wav says its sample rate is 7 Hz, outside the 4000..384000 Hz")


# ----------------------------------------------------------------------------- item 10: too short, silence


def test_item10_check_recording_rule():
    """At least one 25 ms analysis window of samples at the file's rate, and not digital silence."""
    frontend.check_recording(speech(0.025), RATE, "x.wav", 25.0)  # 200 samples: one window
    with pytest.raises(UserError, match=r"x.wav is too short: 199 samples at 8000 Hz .* one 25 ms analysis window"):
        frontend.check_recording(speech(0.025)[:199], RATE, "x.wav", 25.0)
    with pytest.raises(UserError, match="too short: 399 samples at 16000 Hz"):
        frontend.check_recording(speech(0.025, rate=16000)[:399], 16000, "x.wav", 25.0)
    with pytest.raises(UserError, match="holds no audio samples"):
        frontend.check_recording(np.zeros(0, np.float32), RATE, "x.wav", 25.0)
    rng = np.random.default_rng(0)
    for samples, where in (
        (np.zeros(16000, np.float32), "is 0"),
        (np.full(16000, 1000, np.float32), "is 1000"),
        (rng.integers(-1, 2, 16000).astype(np.float32), "lies between -1 and 1"),
    ):
        with pytest.raises(UserError, match=f"x.wav is digital silence: every one of its 16000 samples {where}"):
            frontend.check_recording(samples, RATE, "x.wav", 25.0)
    frontend.check_recording(
        rng.integers(-2, 2, 16000).astype(np.float32), RATE, "x.wav", 25.0
    )  # 3 steps: faint, not nothing


def test_item10_short_and_silent_recordings_in_verify(sp, tmp_path, capsys):
    write_wav(tmp_path / "short.wav", speech(0.01))  # 80 samples, 10 ms: one frame once tiled
    write_wav(tmp_path / "dither.wav", np.random.default_rng(0).integers(-1, 2, 2 * RATE))
    for name, expected in (("short.wav", "too short: 80 samples"), ("dither.wav", "is digital silence")):
        code, out, err = run(verify.main, verify_argv(sp, tmp_path / name), capsys)
        assert code == 2 and expected in err and not out and len(err.strip().splitlines()) == 1, err
    write_wav(tmp_path / "silence.wav", np.zeros(2 * RATE))
    refused(
        script("verify.py", *verify_argv(sp, tmp_path / "silence.wav"), cwd=tmp_path),
        "verify.py",
        "silence.wav is digital silence: every one of its 16000 samples is 0",
    )


def test_item10_silent_recording_in_embed(sp, tmp_path, capsys):
    wavs = tmp_path / "wavs"
    (wavs / "anna").mkdir(parents=True)
    write_wav(wavs / "anna" / "u0.wav", speech(0.6))
    write_wav(wavs / "anna" / "u1.wav", np.zeros(RATE))
    out = tmp_path / "emb"
    argv = ["--wav-dir", str(wavs), "--cp-path", sp["cp"], "--out-path", str(out), "--device", "cpu"]
    code, _, err = run(embed.main, argv, capsys)
    assert code == 2 and "u1.wav is digital silence" in err and not out.exists(), err


# ----------------------------------------------------------------------------- item 7: image modes


def gray8():
    """An 8x8 8-bit grayscale picture using the whole 0..255 range."""
    return np.array([[(i * 8 + j) * 255 // 63 for j in range(8)] for i in range(8)], dtype=np.uint8)


def digits_checkpoint(path):
    """An untrained image checkpoint whose input record is the digits demo's (1x8x8)."""
    write_checkpoint(str(path), encoder_args={"in_channels": 1, "stem": "cifar"})
    state = load_checkpoint(str(path))
    state["model_config"]["image_input"] = image_input.ImageInput("digits", 1, 8, 8, (0.3,), (0.4,)).to_dict()
    save_checkpoint(str(path), state)
    return str(path)


def save_modes(folder, a):
    """The picture `a` (8x8 uint8) saved as every kind of file that should read as `a` -> {name: path}."""
    os.makedirs(folder, exist_ok=True)
    paths = {}

    def put(name, img, **kw):
        paths[name] = os.path.join(folder, name)
        img.save(paths[name], **kw)

    put("L.png", Image.fromarray(a))
    put("I16.png", Image.fromarray(a.astype(np.uint16) * 257))  # mode I;16
    put("I16.tif", Image.fromarray(a.astype(np.uint16) * 257))
    put("I16B.tif", Image.frombytes("I;16B", (8, 8), (a.astype(">u2") * 257).tobytes()))
    put("I32.tif", Image.fromarray(a.astype(np.int32) * 257, "I"))
    put("F01.tif", Image.fromarray(a.astype(np.float32) / 255))
    put("F255.tif", Image.fromarray(a.astype(np.float32)))
    put("LA.png", Image.fromarray(np.stack([a, np.full_like(a, 255)], -1), "LA"))
    put("RGBA.png", Image.fromarray(np.stack([a, a, a, np.full_like(a, 255)], -1), "RGBA"))
    put("CMYK.tif", Image.fromarray(a).convert("RGB").convert("CMYK"))
    put("P.png", Image.fromarray(a).convert("P"))
    pgm = os.path.join(folder, "I.pgm")  # 16-bit PGM: Pillow reads mode I
    with open(pgm, "wb") as handle:
        handle.write(b"P5 8 8 65535\n" + (a.astype(">u2") * 257).tobytes())
    paths["I.pgm"] = pgm
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: store the picture turned back
    put("exif.png", Image.fromarray(np.rot90(a, 1).copy()), exif=exif.tobytes())
    return paths


def test_item7_every_image_mode_reads_as_the_8bit_picture(tmp_path):
    """verify's reader (ImageInput.load) and the training folders' (read_rgb) give the 8-bit picture's values."""
    a = gray8()
    paths = save_modes(tmp_path / "modes", a)
    modes = set()
    for path in paths.values():
        with Image.open(path) as img:
            modes.add(img.mode)
    assert modes >= {"I;16", "I;16B", "I", "F", "LA", "RGBA", "CMYK", "P"}, modes
    reader = image_input.ImageInput("digits", 1, 8, 8, (0.0,), (1.0,))
    for name, path in paths.items():
        got = reader.load(path)[0].numpy() * 255
        np.testing.assert_allclose(got, a, atol=1e-3, err_msg=name)
        rgb = np.asarray(data_load.read_rgb(path))
        assert all(np.array_equal(rgb[..., c], a) for c in range(3)), name


def test_item7_transparency_is_composited_over_black(tmp_path):
    """Transparent pixels read as black whatever colour they hide, in every mode that carries transparency."""
    a = gray8()
    a[0, 0] = 255  # the hidden colour of the transparent pixel
    want = a.copy()
    want[0, 0] = 0
    clear = np.full_like(a, 255)
    clear[0, 0] = 0
    p = Image.fromarray(a).convert("P")
    cases = {
        "LA.png": (Image.fromarray(np.stack([a, clear], -1), "LA"), {}),
        "RGBA.png": (Image.fromarray(np.stack([a, a, a, clear], -1), "RGBA"), {}),
        "P.png": (p, {"transparency": p.getpixel((0, 0))}),
        "L_trns.png": (Image.fromarray(a), {"transparency": 255}),
        "I16_trns.png": (Image.fromarray(a.astype(np.uint16) * 257), {"transparency": 65535}),
    }
    for name, (img, kw) in cases.items():
        img.save(tmp_path / name, **kw)
        got = np.asarray(data_load.read_image(tmp_path / name, "L"))
        keep = a != 255  # other pure-white pixels are transparent too with a transparent colour of 255
        np.testing.assert_array_equal(got[keep], want[keep], err_msg=name)
        assert got[0, 0] == 0, name


def test_item7_values_outside_the_depth_are_refused(tmp_path):
    Image.fromarray(np.full((8, 8), 70000, np.int32), "I").save(tmp_path / "big.tif")
    Image.fromarray(np.full((8, 8), -1.0, np.float32)).save(tmp_path / "neg.tif")
    for name, expected in (("big.tif", "outside 16-bit 0..65535"), ("neg.tif", "outside 0..1 and 0..255")):
        with pytest.raises(UserError, match=f"{name} holds .* {expected}"):
            data_load.read_image(tmp_path / name, "L")


def test_item7_16bit_png_scores_as_the_8bit_copy(tmp_path):
    """The reported case: verify.py on the digits model, the same picture as 8-bit and 16-bit PNG."""
    cp = digits_checkpoint(tmp_path / "digits.pt")
    paths = save_modes(tmp_path / "modes", gray8())
    tests = [paths[name] for name in ("L.png", "I16.png", "I.pgm", "F01.tif")]
    done = script("verify.py", "--cp-path", cp, "--enroll", tests[0], "--test", *tests, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    for result in results[1:]:
        for column, value in results[0]["scores"].items():
            assert result["scores"][column] == pytest.approx(value, abs=1e-5), (result["test"], column)
        assert result["accept"] == results[0]["accept"]


def test_item7_image_folder_of_16bit_pngs_trains_on_the_same_pixels(tmp_path):
    """A training folder of 16-bit PNGs gives the tensors of its 8-bit copy (FolderImages reads through read_rgb)."""
    for bits in (8, 16):
        for c in range(2):
            folder = tmp_path / f"b{bits}" / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(2):
                a = np.random.default_rng(c * 2 + i).integers(0, 256, (8, 8)).astype(np.uint8)
                img = Image.fromarray(a if bits == 8 else a.astype(np.uint16) * 257)
                img.save(folder / f"{i}.png")
    eight, sixteen = (data_load.load_images(str(tmp_path / f"b{bits}"), "test") for bits in (8, 16))
    assert len(eight) == len(sixteen) == 4
    for i in range(4):
        assert np.array_equal(eight[i][0].numpy(), sixteen[i][0].numpy()) and eight[i][1] == sixteen[i][1]


# ----------------------------------------------------------------------------- item 16: decompression bombs


def png_header(path, width, height):
    """A gray PNG whose header says `width` x `height` but which holds a few rows only: how a decompression bomb
    looks before it is decoded (reading its header must be enough to refuse it)."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(bytes(width + 1) * 2)
    head = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + head + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


@contextlib.contextmanager
def no_warnings():
    """Fail when any warning (Pillow's DecompressionBombWarning) is issued inside."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not caught, [str(w.message) for w in caught]


def test_item16_huge_images_are_refused_from_the_header(tmp_path):
    """Ours (8193x8192), Pillow's warning zone (10000x10000) and its error zone (20000x20000): one UserError,
    no warning, no decoding; the limit itself still opens."""
    for width, height in ((8193, 8192), (10000, 10000), (20000, 20000)):
        path = png_header(tmp_path / f"{width}.png", width, height)
        with no_warnings():
            with pytest.raises(UserError, match=f"{width}.png is too large to decode: .*over the limit of 67,108,864"):
                data_load.read_image(path, "L")
            assert "too large to decode" in data_load._image_size(path)
    img = data_load.open_image(png_header(tmp_path / "limit.png", 8192, 8192))
    assert img.size == (8192, 8192)
    img.close()


def test_item16_bomb_in_verify_and_in_an_image_folder(tmp_path):
    cp = digits_checkpoint(tmp_path / "digits.pt")
    Image.fromarray(gray8()).save(tmp_path / "d.png")
    bomb = png_header(tmp_path / "bomb.png", 20000, 20000)
    done = script("verify.py", "--cp-path", cp, "--enroll", tmp_path / "d.png", "--test", bomb, cwd=tmp_path)
    refused(done, "verify.py", "bomb.png is too large to decode: 400,000,000 pixels")
    tree = tmp_path / "tree"
    for c in range(2):
        (tree / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(gray8()).convert("RGB").save(tree / f"class{c}" / f"{i}.png")
    dataset = data_load.load_images(str(tree), "train")
    png_header(tree / "class1" / "1.png", 20000, 20000)  # replaced after the check: read in a worker process
    with pytest.raises(UserError, match="1.png is too large to decode"):
        list(torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1))
    Image.fromarray(gray8()).convert("RGB").save(tree / "class1" / "1.png")
    png_header(tree / "class1" / "huge.png", 10000, 10000)  # Pillow would only warn, and decode it
    with no_warnings(), pytest.raises(UserError) as err:
        data_load.load_images(str(tree), "train")
    assert "1 image file(s) cannot be decoded, e.g." in str(err.value)
    assert "huge.png, which is too large to decode: 100,000,000 pixels" in str(err.value)
