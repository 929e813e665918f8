"""``python -m adaptkit`` (and ``accelerate launch -m adaptkit``) runs the CLI."""

from adaptkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
