"""The commands' argument helpers: usage errors on one line, checked argument
types. Imports nothing of the package, so a command takes only what it runs
(converting a checkpoint does not import the generation loop)."""

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (exit 2) instead of the usage
    block, so scripts can show it as is."""

    def error(self, message):
        message = message.replace("\n", "\\n")  # one line, whatever the arguments held
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def checked(parse, check):
    """An argparse `type=` that parses the text and then applies the API's own
    check, so a value the API refuses is a usage error with the same message."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = text  # the check names it as given
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def str2bool(value: str) -> bool:
    if value.lower() in ("true", "t", "1", "yes"):
        return True
    if value.lower() in ("false", "f", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")
