"""Shared helpers: user errors, atomic outputs, devices, seeding."""

import _thread
import argparse
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

# first, before torch loads libgomp: a waiting OpenMP thread sleeps instead of spinning (e2e_verification/threads.py)
from e2e_verification import threads

# isort: split
import numpy as np
import torch


class UserError(Exception):
    """An error the user caused (a path, a format, a flag value); printed as one line, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by `timeout`, Slurm, `kill`) raised as an exception, so it takes Ctrl-C's path: every
    `atomic_path` removes its temporary file and `cli` exits with 143 (128 + SIGTERM)."""


# Code whose exceptions Python prints as "Exception ignored in ..." and then goes on: a Terminated raised
# there would be lost and the run would finish (and commit its outputs) as if no SIGTERM had come.
_FINALIZER_MODULES = ("weakref", "_weakrefset")


def _in_finalizer(frame):
    """True when `frame` runs inside a __del__ method or a weak-reference callback."""
    while frame is not None:
        if frame.f_code.co_name == "__del__" or frame.f_globals.get("__name__") in _FINALIZER_MODULES:
            return True
        frame = frame.f_back
    return False


def _raise_terminated(signum, frame):
    if _in_finalizer(frame):  # raise it again a moment later, back in ordinary code
        threading.Timer(0.01, _thread.interrupt_main, (signal.SIGTERM,)).start()
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def user_message(err):
    """The one line to print for a UserError. One raised in a DataLoader worker comes back re-raised with
    torch's "Caught UserError in DataLoader worker ... Original Traceback ..." text: keep its last line,
    the original message, without the exception's name."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return re.sub(rf"^(?:[\w.]+\.)?{type(err).__name__}: ", "", last)


def cli(main, argv=None):
    """Run `main(argv)` as a command: a UserError becomes one line on stderr and exit status 2; Ctrl-C
    (SIGINT) exits with 130 and SIGTERM with 143, each after the temporary outputs are removed. torch computes
    with the threads threads.configure() chooses while `main` runs."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    torch_threads = torch.get_num_threads()
    try:
        threads.configure()  # the CPUs the job was given, or E2E_THREADS / OMP_NUM_THREADS
        code = main(argv)
    except UserError as err:
        prog = os.path.basename(sys.argv[0]) or "e2e"
        print(f"{prog}: error: {user_message(err)}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        torch.set_num_threads(torch_threads)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors, so `cli` prints one line (no usage block) and exits 2.

    Abbreviated flags are off: `--epoch 1` is an error, not a silent `--epochs 1` (and the digits demo,
    which reads which flags were typed, would not see it).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see --help)")

    def convert_arg_line_to_args(self, line):
        """A line of an @file (recipes/*.args): a flag and its value, split as the shell splits them; # comments."""
        return shlex.split(line, comments=True)

    def expand_arg_files(self, argv):
        """`argv` with every @file replaced by the arguments it holds (when this parser reads @files), so that
        callers that look at which flags were typed see the recipe's flags too."""
        if not self.fromfile_prefix_chars:
            return list(argv)
        return self._read_args_from_files(list(argv))


def add_options(parser, *tables):
    """Add tables of options to `parser` (or one of its argument groups), in order.

    A table is a dict {flag: spec}. A spec is (type, default, help) for an option that takes a value,
    (help,) for an on/off switch, or a dict of add_argument's keyword arguments for anything else (a plain
    text option: dict(help=...); choices, nargs, dest, ...). A flag with aliases is a tuple of its spellings.
    """
    for table in tables:
        for flags, spec in table.items():
            flags = flags if isinstance(flags, tuple) else (flags,)
            if isinstance(spec, dict):
                parser.add_argument(*flags, **spec)
            elif len(spec) == 1:
                parser.add_argument(*flags, action="store_true", help=spec[0])
            else:
                kind, default, text = spec
                parser.add_argument(*flags, type=kind, default=default, help=text)


def make_parser(doc, epilog, *tables, **kwargs):
    """A script's parser: `doc` (its module docstring) as the description, `epilog` (example command lines)
    after the flags, kept as written, and the options of `tables` (see add_options), in order. A table given
    as (title, table) becomes a --help section of that title."""
    parser = ArgumentParser(
        description=doc, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
    )
    for table in tables:
        if isinstance(table, tuple):
            title, table = table
            add_options(parser.add_argument_group(title), table)
        else:
            add_options(parser, table)
    return parser


def _umask():
    """The process's file-creation mask, read without changing it (temporary files are made 0600; outputs get
    the permissions a plain open() would have given them)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` on success, delete it on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"output folder does not exist: {folder}")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    umask = _umask()
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """Open a temporary file beside `path` for writing; it replaces `path` only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle


def write_json(path, obj):
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")


# ----------------------------------------------------------------------------- devices and seeds


def flag_value(args, flag):
    """The parsed value of `flag` in `args` ('--valid-data-path' -> args.valid_data_path)."""
    return getattr(args, flag[2:].replace("-", "_"))


def choose_device(name=None):
    """Pick the torch device: `name` if given, else cuda when present."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"bad --device {name!r}: {err}") from None
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu, ... parse but are not supported by this toolkit
        raise UserError(f"bad --device {name!r}: only cpu, cuda and cuda:N are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def add_device_flags(parser):
    """The device flags every script shares: --device, the seed's --no-cuda and --cuda True/False, --amp."""
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda when available)")
    parser.add_argument("--no-cuda", action="store_true", help="seed spelling of --device cpu")
    parser.add_argument("--cuda", type=str2bool, default=None, help="seed spelling: True/False")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")


def device_from_args(args):
    """The device that add_device_flags' flags ask for (--no-cuda / --cuda False mean the CPU)."""
    if args.no_cuda or args.cuda is False:
        args.device = args.device or "cpu"
    return choose_device(args.device)


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_algorithms():
    """Make training repeatable: the same seed and flags give the same weights, also with several threads.

    Without this, some CPU kernels (index accumulation in the pair loss's backward) sum in a thread-
    dependent order, and two runs drift apart. On CUDA it selects deterministic kernels (cuBLAS needs
    the workspace setting below, which must be in place before its first use); operations that have no
    deterministic version only warn.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def str2bool(text):
    """Strict true/false parser for flags such as the seed's `--cuda True`."""
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", "none"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def git_commit():
    """The git commit of this code, or 'unknown' outside a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


# ----------------------------------------------------------------------------- the output guard
#
# Every command that writes calls check_outputs (files) or check_output_folder (folders) with its inputs,
# before any work: an output never replaces one of the command's inputs, never lands on a folder, and a
# folder is replaced (--force) only when it holds the marker of the same tool's earlier output.

OUTPUT_MARKER = ".e2e-output.json"


def _named(paths):
    """{flag: path} (or an iterable of (flag, path)) without the None paths, each path as text."""
    items = paths.items() if isinstance(paths, dict) else paths
    return [(flag, os.fspath(path)) for flag, path in items if path is not None]


def same_path(a, b):
    """True when paths `a` and `b` name the same file or folder (symbolic and hard links resolved)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path, folder):
    """True when `path` is `folder` or lies anywhere under it (real paths)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_writable_folder(folder, flag="output", create=False):
    """UserError unless `folder` exists, is a folder and takes new files (tried with a temporary file). With
    `create` (the command makes it when missing), a missing folder's nearest existing parent is tried instead."""
    folder = folder or "."
    parts = os.path.abspath(folder)
    while not os.path.lexists(parts):
        parts = os.path.dirname(parts)
    if not os.path.isdir(parts):
        raise UserError(f"{flag}: output folder {folder} is under {parts}, which is a file")
    if not os.path.isdir(folder) and not create:
        raise UserError(f"{flag}: output folder does not exist: {folder}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".e2e-probe.", dir=parts)
    except OSError as err:
        raise UserError(f"{flag}: cannot write in output folder {parts}: {err.strerror or err}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.remove(probe)


def scp_targets(path):
    """The files a Kaldi scp names (`utt rxfilename` lines: an ark with its `:offset` dropped, a wav; not a
    piped command), each once, relative paths as the scp's readers take them (from the current folder)."""
    targets = {}
    with open(path, errors="replace") as handle:
        for line in handle:
            parts = line.split(None, 1)
            if len(parts) == 2 and not parts[1].rstrip().endswith("|"):
                targets.setdefault(re.sub(r":\d+$", "", parts[1].strip()), None)
    return list(targets)


def _with_scp_targets(inputs):
    """`inputs` ((flag, path) pairs) and, after each Kaldi scp (*.scp) among them or in a folder among them, the
    files it names: an output must not replace the ark or the recordings behind an input table either."""
    found, seen = [], set()
    for flag, path in inputs:
        if path in seen:  # a path listed again (e.g. a table per utterance) is checked, and read, once
            continue
        seen.add(path)
        found.append((flag, path))
        tables = [path] if path.endswith(".scp") else []
        if os.path.isdir(path):  # a folder of tables (feats.scp, embeddings.scp, ...) is read whole
            tables = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".scp"))
        for table in filter(os.path.isfile, tables):
            named = [target for target in scp_targets(table) if target not in seen]
            seen.update(named)
            found += [(f"{flag} ({os.path.basename(table)} names it)", target) for target in named]
    return found


def check_outputs(outputs, inputs=(), create=False):
    """Refuse, before any work, output files that would destroy an input or cannot be written.

    `outputs` and `inputs` are {flag: path} or (flag, path) pairs (None paths are skipped). Each output must
    not be any input, nor a file a Kaldi scp input names (real paths, symbolic and hard links resolved), must
    not be a folder, and its folder must exist (with `create`, or be creatable: the command makes it) and take
    new files.
    """
    inputs = _with_scp_targets(_named(inputs))
    for flag, out in _named(outputs):
        for in_flag, source in inputs:
            if os.path.lexists(source) and same_path(out, source):
                raise UserError(f"{flag} would overwrite {source} ({in_flag}), an input of this run; write elsewhere")
        if os.path.isdir(out):
            raise UserError(f"{flag} {out} is a folder; name a file")
        check_writable_folder(os.path.dirname(os.path.abspath(out)), flag, create)


def check_inputs_outside(flag, folder, held=(), around=()):
    """Refuse output folder `folder` (of option `flag`) that is or holds an input of `held` ({flag: path}), or
    that lies inside an input folder of `around`, where it would read as part of the data (real paths, links
    resolved; None paths skipped)."""
    for in_flag, source in _named(held):
        if os.path.lexists(source) and _inside(source, folder):
            raise UserError(f"{flag} {folder} holds {in_flag} {source}: refusing to write over an input of this run")
    for in_flag, source in _named(around):
        if os.path.lexists(source) and _inside(folder, source) and not same_path(folder, source):
            raise UserError(
                f"{flag} {folder} lies inside {in_flag} {source}: refusing to write into an input of this command"
            )


def check_output_folder(flag, path, tool, force=False, inputs=(), legacy=None, around=(), create=False):
    """Refuse, before any work, an output folder that would destroy an input or a user's files.

    The folder `path` is filled (or, with `force`, replaced) by `tool`. Refused: an input (of `inputs`,
    {flag: path}) inside it or the folder inside an input file; a file at `path`; a missing or read-only
    parent; an existing non-empty folder without `force`, or, with `force`, one that does not hold the
    marker of `tool`'s earlier output (see mark_output_folder), so a mistyped path never deletes other files.
    `legacy` names a file that marked `tool`'s outputs before the marker existed (accepted when unmarked);
    the folder must not lie inside an input folder of `around` either. With `create`, missing parent folders
    are fine when the nearest existing one takes new folders (atomic_folder makes them). An existing folder
    must take new files itself, since replacing it moves it aside.
    """
    check_inputs_outside(flag, path, inputs, around)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} exists and is not a folder")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), flag, create)
    if os.path.isdir(path):
        check_writable_folder(path, flag)
    if os.path.isdir(path) and os.listdir(path):
        if not force:
            raise UserError(f"{flag} {path} exists and is not empty (give --force to replace an earlier output)")
        found = output_folder_tool(path)
        earlier = found is None and legacy is not None and os.path.isfile(os.path.join(path, legacy))
        if found != tool and not earlier:
            raise UserError(
                f"--force replaces only an earlier output of {tool} (a folder holding {OUTPUT_MARKER}); "
                f"{path} is not one, so it is left alone"
            )
    return os.path.abspath(path)


def mark_output_folder(path, tool, **record):
    """Record in folder `path` that `tool` wrote it (the marker check_output_folder looks for)."""
    write_json(os.path.join(path, OUTPUT_MARKER), {"tool": tool, **record})


def output_folder_tool(path):
    """The tool whose marker folder `path` holds, or None."""
    try:
        with open(os.path.join(path, OUTPUT_MARKER)) as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return None
    return marker.get("tool") if isinstance(marker, dict) else None


@contextlib.contextmanager
def atomic_folder(path, tool=None, **record):
    """Yield a fresh temporary folder beside `path` (missing parents are made) to write a whole output in. When
    the block succeeds it gets `tool`'s marker (mark_output_folder, with `record`) and replaces `path`, an
    earlier `path` being deleted only once the new one is in place; when it fails it is deleted."""
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        if tool is not None:
            mark_output_folder(tmp, tool, **record)
        os.chmod(tmp, 0o777 & ~_umask())
        _put_in_place(tmp, os.path.join(parent, name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _put_in_place(tmp, out):
    """Rename the finished folder `tmp` onto `out`; an earlier `out` is restored if the rename fails."""
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    parent, name = os.path.split(out)
    old = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=parent)
    os.replace(out, os.path.join(old, name))
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(os.path.join(old, name), out)
        os.rmdir(old)
        raise
    shutil.rmtree(old)
