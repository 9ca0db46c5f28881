"""`appliance tls` and `appliance users`: what opening the API to the lab's network needs (HTTPS, personal
logins). Registered on the `appliance` command by appliance.cli."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli_common import friendly_errors
from appliance.cli_common import settings_for as _settings


@click.group()
def tls() -> None:
    """HTTPS for the API."""


@tls.command("self-signed")
@click.option("--host", "hosts", multiple=True, required=True,
              help="The bench PC's name (or address) as browsers on the LAN will type it; repeat for more.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for cert.pem and key.pem (default: <data_dir>/tls).")
@click.option("--days", type=click.IntRange(1, 825), default=825, show_default=True)
@click.option("--force", is_flag=True, help="Replace a certificate already there.")
@click.pass_context
@friendly_errors
def tls_self_signed(ctx, hosts: tuple[str, ...], out_dir: Path | None, days: int, force: bool) -> None:
    """Make a self-signed certificate and key for the API, and print the settings that use them."""
    from appliance.api.tls import fingerprint, self_signed, write_pair

    settings = _settings(ctx)
    out_dir = out_dir or settings.data_dir / "tls"
    if (out_dir / "cert.pem").exists() and not force:
        raise click.ClickException(f"{out_dir / 'cert.pem'} exists; --force replaces it (clients that trust the "
                                   f"old one must then be given the new one)")
    cert_pem, key_pem = self_signed(list(hosts), days)
    cert, key = write_pair(out_dir, cert_pem, key_pem)
    click.echo(f"wrote {cert} and {key} (0600), valid {days} days for {', '.join(hosts)}")
    click.echo(f"SHA-256 fingerprint: {fingerprint(cert_pem)}")
    click.echo("add to /etc/appliance/appliance.toml and restart the service:")
    click.echo(f'  api_tls_cert = "{cert.absolute()}"\n  api_tls_key = "{key.absolute()}"')
