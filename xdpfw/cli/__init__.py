"""The `xdpfw` command: a client of the REST API, plus `serve` (which starts it) and `detach`.

- `main`: the argument parser and the commands.
- `client`: the httpx client of the API and the typed shapes of its answers.
- `humanize`: durations, counts and tables for people.

The CLI imports neither `api` nor bcc, except `serve`, the one place that starts the server.
"""

from xdpfw.cli.main import main

__all__ = ["main"]
