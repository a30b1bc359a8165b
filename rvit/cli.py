"""What every entry point and `python -m` tool shares on the command line: its parser, the
one-line error wrapper and its progress bars. Torch-free, so that prepare_data.py can use it too.
"""
import argparse
import sys

from tqdm import tqdm


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help appends each flag's default, unless it is None (the help says where the value
    comes from), False (an off switch) or an empty list."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def parser(description):
    """An ArgumentParser that shows defaults in --help and takes no abbreviated flags (argparse
    would otherwise read `--epoch 1` as `--epochs 1`, silently)."""
    return argparse.ArgumentParser(description=description, allow_abbrev=False,
                                   formatter_class=DefaultsHelpFormatter)


def progress_bar(iterable=None, show=True, **kwargs):
    """A tqdm bar on stderr when stderr is a terminal, and nowhere else: a stderr captured into
    a log file gets no bar lines (tqdm's disable=None). `show` False turns it off everywhere
    (processes other than rank 0). Other keyword arguments go to tqdm."""
    return tqdm(iterable, disable=None if show else True, **kwargs)


def run_cli(name, main, args, errors=(ValueError, OSError, ImportError, RuntimeError)):
    """Run an entry point's main(args): a bad file, flag or input ends as one line naming it
    (exit 1), the first of its message; the rest (a library's multi-line explanation) and the
    traceback only under --debug."""
    try:
        main(args)
    except errors as e:
        if args.debug:
            raise
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"{name}: error: {lines[0]}", file=sys.stderr)
        sys.exit(1)
