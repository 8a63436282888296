"""The ``linlens`` command line (see :mod:`linlens.cli.main`)."""
