"""`python -m appliance.console PROJECT_DIR`: print where the project's console opens (nothing when it is off);
`make run` calls it before it serves."""

from __future__ import annotations

import sys
from pathlib import Path

from appliance.config.loader import load_project_files
from appliance.console.routes import console_url
from appliance.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m appliance.console PROJECT_DIR", file=sys.stderr)
        return 2
    try:
        config = load_project_files(Path(args[0])).config
    except ConfigError:
        return 0  # `serve` reports the project's problems itself
    if config.console.enabled:
        login = " (log in with the project's key)" if config.host not in ("127.0.0.1", "localhost", "::1") else ""
        print(f"Operator console: {console_url(config.host, config.port)}{login}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
