"""The command line: every `appliance` command group, on top of everything else (nothing imports it)."""
