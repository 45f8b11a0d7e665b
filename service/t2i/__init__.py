"""The Illustrious text-to-image service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("illustrious-t2i")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
