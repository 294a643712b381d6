"""xdpfw: an XDP firewall driven live over a REST API (the service is in api/).

``__version__`` is the installed distribution's version (pyproject.toml), read from its
metadata, so it is defined once.
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__: str = version("xdpfw")
except PackageNotFoundError:  # a checkout imported without being installed
    __version__ = "0+unknown"
