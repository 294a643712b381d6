"""Container health check: exit 0 when GET /healthz answers 200, 1 otherwise.

/healthz answers 200 when every wanted interface runs the program and 503 when one does not
(api/routes/health.py). The address comes from XDPFW_LISTEN like the service's own; a wildcard
listener is checked on loopback. Standard library only: the image has no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

__all__ = ["health_url", "main"]


def health_url(listen: str) -> str:
    """'127.0.0.1:8000' -> http://127.0.0.1:8000/healthz; '0.0.0.0:8000', ':8000' -> loopback."""
    text = listen.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def main() -> int:
    url = health_url(os.environ.get("XDPFW_LISTEN", "127.0.0.1:8000"))
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"healthcheck: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
