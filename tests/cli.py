"""The `appliance` command line run in the test's own process (click's CliRunner): the same commands, options,
messages and exit codes, without starting Python again. The tests where the process itself is the point
(signals, systemd's notify socket, strace, a pty, a kill halfway) still start `python -m appliance.cli`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from appliance.commands.main import main


@dataclass
class Ran:
    """What a run of the command said, in the shape of subprocess.CompletedProcess."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def appliance(*args: object, env: dict[str, str] | None = None, stdin: str | None = None, data: Path | None = None,
              model: Path | None = None) -> Ran:
    """Run `appliance ARGS` with ``env`` over the test's environment (``data``/``model``: the data and model
    folders, as APPLIANCE_DATA_DIR/APPLIANCE_MODEL_DIR). An exception the command did not turn into a message
    and an exit status is re-raised: a traceback is a failure of the test, as it would be of the command."""
    extra = dict(env or {})
    if data is not None:
        extra["APPLIANCE_DATA_DIR"] = str(data)
    if model is not None:
        extra["APPLIANCE_MODEL_DIR"] = str(model)
    argv = [str(a) for a in args]
    result = CliRunner(env=extra).invoke(main, argv, input=stdin, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(argv, result.exit_code, result.stdout, result.stderr)
