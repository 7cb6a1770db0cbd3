"""The package version (one place; ``mechcna --version`` and ``mechcna.__version__``)."""

__version__ = "0.1.0"
