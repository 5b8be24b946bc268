"""What the package's commands share: usage errors on one line."""

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (exit 2) instead of the usage
    block, so scripts can show it as is."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
