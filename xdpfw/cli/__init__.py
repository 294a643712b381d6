"""The `xdpfw` command: a client of the REST API, plus `serve` (which starts it) and `detach`.

- `main`: the entry point (`xdpfw.cli.main:main`); `parser`: every command's flags and examples.
- one module per command group: `status`, `rules` (rule add/rm/ls/show), `importing`,
  `stats`, `top`, `serve` (serve and detach).
- `connection` (the connection options -> a Client), `output` (JSON, errors, a rule in words).
- `client`: the httpx client of the API and the typed shapes of its answers.
- `humanize`: durations, counts and tables for people.

The CLI imports neither `api` nor bcc, except `serve.cmd_serve`, the one place that starts
the server (tests/test_layers.py checks it).
"""

from xdpfw.cli.main import main

__all__ = ["main"]
