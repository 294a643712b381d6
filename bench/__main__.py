"""`python -m bench` (also `sudo make bench ARGS=...`)."""

from bench.cli import main

raise SystemExit(main())
