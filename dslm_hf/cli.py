"""What every console command (dslm-pretrain, dslm-finetune, dslm-publish, dslm-export, dslm-diagnose) does with bad
input, and the `dslm COMMAND ...` front end (`main`) that runs each of them (`dslm pretrain` is `dslm-pretrain`).

A user error is a `UserError` whose message names the input and says what to do. `run_command` prints it as one
line on stderr, `PROG: error: MESSAGE`, and exits with status 2, without a traceback; `--debug` on the command
line or `DSLM_DEBUG=1` in the environment shows the traceback instead. Anything else (a bug) keeps its traceback.
The cheap checks every command shares (a writable output folder, a readable text file, config keys) live here so
that each command runs them before its expensive work.
"""

import difflib
import errno
import importlib
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

EXIT_USER_ERROR = 2  # argparse's status for a usage error: the same for every bad input
DEBUG_FLAG = "--debug"
DEBUG_ENV = "DSLM_DEBUG"


class UserError(ValueError):
    """Bad input (an argument, a path, a file's content): the message names the input and what to do."""


class CommandExit(SystemExit):
    """Status 2 after the error line was printed; `str()` is that line, for callers that run `main` in-process."""

    def __init__(self, line: str):
        super().__init__(EXIT_USER_ERROR)
        self.line = line

    def __str__(self) -> str:
        return self.line


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def run_command(prog: str, run: Callable[[list[str]], object], argv: list[str] | None = None) -> int:
    """Run `run(argv)` as the console command `prog`; 0 on success (console scripts do `sys.exit(main())`).

    A `UserError` becomes one stderr line and status 2 (`CommandExit`); other exits (--help, a status a command
    chose) and other exceptions pass through unchanged.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        check_arguments_are_utf8(argv)
        try:
            run(argv)
        except OSError as error:  # what the machine refused (disk full, a name too long), wherever it happened
            if error.errno not in MACHINE_LIMITS:
                raise
            raise UserError(describe_machine_limit(error)) from error
    except UserError as error:
        if debug:
            raise
        message = " ".join(str(error).split())  # one line, whatever the message's own line breaks
        message = message.removeprefix(f"{prog}: ").removeprefix("error: ")
        line = f"{prog}: error: {message}"
        print(line, file=sys.stderr, flush=True)
        raise CommandExit(line) from None
    return 0


# errno -> what to do, for the OSErrors that are the machine's limits, not bugs: `run_command` prints them as one line
MACHINE_LIMITS = {
    errno.ENOSPC: "free space (or choose a folder on another disk) and rerun",
    errno.EDQUOT: "free space within your quota (or choose another folder) and rerun",
    errno.EFBIG: "this file system does not take files this large: choose a folder on another file system",
    errno.ENAMETOOLONG: "a file or folder name is longer than the file system allows (255 bytes): choose a shorter path",
    errno.EACCES: "fix the permissions or choose another folder",
    errno.EPERM: "fix the permissions or choose another folder",
    errno.EROFS: "the file system is read-only: choose another folder",
}


def describe_machine_limit(error: OSError) -> str:
    where = f": {error.filename}" if error.filename else ""
    kept = ("; the files written before it are kept (a checkpoint is complete or absent, never half-written)"
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "")
    return f"{error.strerror or error}{where}{kept}: {MACHINE_LIMITS[error.errno]}"


def check_arguments_are_utf8(argv: list[str]) -> None:
    """Refuse an argument holding bytes that are not UTF-8 (a Latin-1 file name): Python carries them as surrogate
    escapes, but the tokenizers and safetensors libraries cannot open such a path and json cannot write it."""
    for index, argument in enumerate(argv):
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError as error:
            flag, _, value = argument.partition("=") if argument.startswith("--") and "=" in argument else (
                argv[index - 1] if index and argv[index - 1].startswith("-") else f"argument {index + 1}", "", argument)
            shown = os.fsencode(value).decode("utf-8", "backslashreplace")
            raise UserError(f"{flag} {shown} is not UTF-8 (byte 0x{ord(argument[error.start]) - 0xDC00:02x}): the "
                            "tokenizers and safetensors libraries cannot use such a path; rename it to UTF-8 (e.g. "
                            "convmv -f latin1 -t utf-8)") from None


def usage_errors_as_user_errors(parser):
    """Make the parser's usage errors (an unknown flag, a value of the wrong type) UserErrors, so that `run_command`
    prints them as one line too, instead of argparse's usage block. Returns the parser."""
    def error(message: str):
        raise UserError(f"{message} (see {parser.prog} --help)")

    parser.error = error
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Cheap checks, run before anything expensive
# ----------------------------------------------------------------------------------------------------------------
def check_output_dir(path: str | Path, flag: str = "--output_dir") -> None:
    """Refuse an output folder that is a file or cannot be written (tried for real, so it holds for root and for
    read-only file systems too), before any data is prepared."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder: choose a folder (new or existing)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path} cannot be created: {existing} is a file; choose another folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"{flag} {path} is not writable ({existing}: {error.strerror}): choose a folder you can "
                        "write to") from None


def check_known_keys(keys, known, source: str) -> None:
    """Refuse keys that are not in `known`, naming the closest valid one (a misspelt config key is otherwise
    stored and silently ignored)."""
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(known))}"
            raise UserError(f"{source}: unknown key {key!r}; {hint}")


class Range(NamedTuple):
    """The finite numbers an argument accepts, in interval notation: Range(0, 1, low_open=True) is (0, 1]."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def admits(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        return (math.isfinite(value) and (self.low < value if self.low_open else self.low <= value)
                and (value < self.high if self.high_open else value <= self.high))

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.high == math.inf:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        return (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
SHARE = Range(0, 1, low_open=True, high_open=True)  # strictly between 0 and 1
COUNT = Range(1, integer=True)
NON_NEGATIVE_COUNT = Range(0, integer=True)


def range_problems(args, ranges: dict[str, Range]):
    """(argument, what is allowed) for each argument of the dataclass `args` outside its Range (NaN and infinity
    never are inside); None means unset and is left to the argument's own default."""
    for name, allowed in ranges.items():
        value = getattr(args, name)
        if value is not None and not allowed.admits(value):
            yield name, f"expected {allowed}"


def check_ranges(args, ranges: dict[str, Range]) -> None:
    """Refuse the first argument outside its range, as one line: `--NAME=VALUE is invalid: expected ...`."""
    for name, allowed in range_problems(args, ranges):
        raise UserError(f"--{name}={getattr(args, name)!r} is invalid: {allowed}")


# ----------------------------------------------------------------------------------------------------------------
# `dslm COMMAND ARGS`: one front end; the `dslm-COMMAND` console scripts stay, as aliases of the same `main`s
# ----------------------------------------------------------------------------------------------------------------
COMMANDS = {  # command -> (module whose `main(argv)` runs it, what it does); imported only when chosen
    "pretrain": ("dslm_hf.pretraining", "train a DeepScaleLM model from scratch (dslm-pretrain)"),
    "finetune": ("dslm_hf.finetuning", "fine-tune a checkpoint with Trainer, optionally LoRA (dslm-finetune)"),
    "publish": ("dslm_hf.publishing", "stage and push a checkpoint as a Hub repository (dslm-publish)"),
    "export": ("dslm_hf.export", "export a checkpoint to a native transformers architecture (dslm-export)"),
    "diagnose": ("dslm_hf.diagnostics", "measure per-layer signal propagation of any model (dslm-diagnose)"),
}


def front_end_help() -> str:
    lines = ["usage: dslm COMMAND [ARGS ...]   (dslm COMMAND --help for a command's flags)", "", "commands:"]
    lines += [f"  {name:<10}{summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines + ["", "Flags are snake_case (--output_dir); the kebab-case spellings of dslm-publish, "
                               "dslm-export and dslm-diagnose still work."])


def unknown_command(argv: list[str]) -> None:
    if not argv:
        raise UserError(f"give a command: {', '.join(COMMANDS)} (see dslm --help)")
    close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"commands: {', '.join(COMMANDS)}"
    raise UserError(f"unknown command {argv[0]!r}; {hint} (see dslm --help)")


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`dslm`): `dslm COMMAND ARGS` is `dslm-COMMAND ARGS`, the same function and exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(front_end_help())
        return 0
    if not argv or argv[0] not in COMMANDS:
        return run_command("dslm", lambda _: unknown_command(argv), [])
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
