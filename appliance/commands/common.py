"""What every `appliance` subcommand module shares: named errors as one clear line, and the settings of the
invocation (the --config file given to the top-level command, plus the subcommand's overrides)."""

from __future__ import annotations

from functools import wraps

import click

from appliance.config import load_settings
from appliance.errors import ApplianceError
from appliance.terms import ACCESSION, ACCESSION_PATTERN, EngineName
from firmware_bridge.errors import BridgeError


ENGINES = click.Choice([e.value for e in EngineName])  # --engine


def accession_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--accession: the lab's accession / order number, checked here so a typo is refused before any work."""
    if value is not None and not ACCESSION.match(value):
        raise click.BadParameter(f"{value!r} is not an accession number: 1-64 letters, digits and . _ / : - "
                                 f"(starting with a letter or digit; pattern {ACCESSION_PATTERN})")
    return value


def friendly_errors(fn):
    """A named error (the appliance's or the link's) becomes one line and exit status 1, not a traceback."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ApplianceError, BridgeError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def settings_for(ctx: click.Context, **overrides):
    """The settings of this invocation: the top-level --config file, then ``overrides``."""
    return load_settings(ctx.find_root().obj["config_file"], **overrides)
