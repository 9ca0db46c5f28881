"""`python -m appliance.cli` and the `appliance` entry point: the command line is appliance.commands."""

from appliance.commands.main import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
