"""`appliance config`: the effective settings, and their reference."""

from __future__ import annotations

import json

import click

from appliance.commands.common import friendly_errors
from appliance.commands.common import settings_for as _settings


@click.group()
def config() -> None:
    """Settings."""


@config.command("show")
@click.pass_context
@friendly_errors
def config_show(ctx) -> None:
    """Print the effective settings."""
    settings = _settings(ctx)
    click.echo(json.dumps(settings.model_dump(mode="json"), indent=1))


@config.command("reference")
def config_reference() -> None:
    """Print the settings reference (docs/settings.md) as Markdown."""
    from appliance.config import settings_reference

    click.echo(settings_reference(), nl=False)
