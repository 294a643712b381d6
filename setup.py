"""Build hook: the one thing pyproject.toml cannot say.

The C program lives at the top of the repository (bpf/), beside the package rather than
inside it, and an installed xdpfw needs it at run time (bcc compiles it when the service
starts). `package_dir` maps the package `xdpfw._bpf` onto bpf/, so a wheel carries
bpf/*.c and bpf/*.h as xdpfw/_bpf/ without copying anything in the tree; xdpfw.abi.BPF_DIR
finds them there, or at <checkout>/bpf in a checkout or an editable install. A static
`[tool.setuptools.packages.find]` cannot list a package that has no directory of its own,
hence the packages are listed here. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["xdpfw", "xdpfw.*", "api", "api.*"]), "xdpfw._bpf"],
    package_dir={"xdpfw._bpf": "bpf"},
    package_data={"xdpfw": ["py.typed"], "xdpfw._bpf": ["*.c", "*.h"]},
)
