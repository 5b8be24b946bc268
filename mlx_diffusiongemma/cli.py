"""What the package's commands share: usage errors on one line."""

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (exit 2) instead of the usage
    block, so scripts can show it as is."""

    def error(self, message):
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
