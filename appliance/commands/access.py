"""`appliance tls` and `appliance users`: what opening the API to the lab's network needs (HTTPS, personal
logins). Registered on the `appliance` command by appliance.cli."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.commands.common import friendly_errors
from appliance.commands.common import settings_for as _settings


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


@click.group()
def users() -> None:
    """Reviewers who log in to the browser viewer (docs/user-guide.md, "Reviewing cases in a browser")."""


def _as_root(what: str) -> str:
    """The Unix user doing it, for the audit; only root may change who can sign cases off."""
    import getpass
    import os

    if os.geteuid() != 0:
        raise click.ClickException(f"{what} needs root (sudo appliance users ...): who may sign cases off is the "
                                   f"service's to decide")
    return os.environ.get("SUDO_USER") or getpass.getuser()


@users.command("add")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input (for scripts).")
@click.pass_context
@friendly_errors
def users_add(ctx, name: str, password_stdin: bool) -> None:
    """Add a reviewer, or give one a new password (which enables a disabled one again)."""
    import sys

    from appliance.api.logins import check_name, hash_password
    from appliance.store import CaseStore

    by = _as_root("adding a reviewer")
    try:
        check_name(name)
        if password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = click.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)
        password_hash = hash_password(password)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    store = CaseStore(_settings(ctx).db_path)
    try:
        new = store.set_user(name, password_hash, by=by)
    finally:
        store.close()
    click.echo(f"reviewer {name} {'added' if new else 'has a new password'}; they log in at /viewer/")


@users.command("disable")
@click.argument("name")
@click.pass_context
@friendly_errors
def users_disable(ctx, name: str) -> None:
    """A reviewer can no longer log in (their sign-offs stay in the audit under their name)."""
    from appliance.store import CaseStore

    by = _as_root("disabling a reviewer")
    store = CaseStore(_settings(ctx).db_path)
    try:
        store.disable_user(name, by=by)
    finally:
        store.close()
    click.echo(f"reviewer {name} disabled (a running daemon ends their sessions at their next request)")


@users.command("list")
@click.pass_context
@friendly_errors
def users_list(ctx) -> None:
    """The reviewers, when they were added, and whether they are disabled."""
    from appliance.store import CaseStore

    store = CaseStore(_settings(ctx).db_path)
    try:
        rows = store.users()
    finally:
        store.close()
    if not rows:
        click.echo("no reviewers yet: sudo appliance users add NAME")
    for r in rows:
        state = f"disabled {r['disabled_at']}" if r["disabled_at"] else "active"
        click.echo(f"{r['name']:24s} added {r['created_at']}  {state}")
