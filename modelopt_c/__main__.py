"""``python -m modelopt_c``: the command-line tool (see ``modelopt_c.cli``)."""

from modelopt_c.cli import main

raise SystemExit(main())
