"""The command line of every script, and the errors that end one in a single line.

Each of gpt_dataset.py, gpt_train.py and infer.py describes its settings as one dataclass; here that
dataclass becomes its --flags (help text from each field's comment), and a UsageError raised
anywhere below main() becomes one line on stderr and a non-zero exit, never a traceback.
"""

import argparse
import dataclasses
import inspect
import re
import sys
import types


class UsageError(Exception):
    """Bad input from the user (flags, files, network); the message says what is wrong and what to do."""


class DataError(UsageError):
    """A shard, manifest or source that cannot be used."""


class CheckpointError(UsageError):
    """A model or checkpoint directory that cannot be used."""


def field_comments(cls):
    """{field: comment} from the `name: type = default  # comment` lines of a dataclass's source."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def parse_config(cls, argv=None, description=None):
    """An instance of dataclass `cls` from the command line: one --flag per field, help from comments."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        kind = f.type
        if isinstance(kind, types.UnionType):  # `int | None`: parse as int
            kind = next(t for t in kind.__args__ if t is not type(None))
        help_text = comments.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        else:
            parser.add_argument(flag(f.name), dest=f.name, type=kind, default=f.default, help=help_text,
                                metavar=kind.__name__.upper())
    return cls(**vars(parser.parse_args(argv)))


def flag(name):
    """The command-line spelling of a config field: max_steps -> --max-steps."""
    return "--" + name.replace("_", "-")


def run_cli(main):
    """Runs main() and returns the exit status: bad input ends in one line on stderr and a non-zero
    status instead of a traceback."""
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    return 0
