"""python -m server: parse settings once and run the app."""

from server.cli import main

raise SystemExit(main())
