"""The `lowbit` command line; the parser and dispatch live in lowbit.cli.main."""
