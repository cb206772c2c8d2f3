"""`python -m randbp_cli ...` is the `randbp` command."""

from .cli.main import main

if __name__ == "__main__":
    main()
