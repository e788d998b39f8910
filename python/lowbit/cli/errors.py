"""The one exception the commands raise for user mistakes: main() prints it on one line and
exits 2, as argparse does for bad arguments, without a traceback."""


class CliError(Exception):
    pass
