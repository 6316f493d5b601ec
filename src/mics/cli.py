"""The `mics` command: dev, gateway, backend, chat."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mics.observability.logging import setup_logging
from mics.runtime import run, wait_for_stop_signal

if TYPE_CHECKING:
    from mics.backend.config import BackendConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MICS messaging gateway")


@app.command()
def dev(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Gateway port")] = 8080,
    backend_port: Annotated[int, typer.Option(help="Reference backend port")] = 8090,
    data_dir: Annotated[
        str, typer.Option(help="Directory of the offline store; '' for a temporary one")
    ] = ".mics-dev",
    log_level: Annotated[str, typer.Option(help="Log level")] = "WARNING",
) -> None:
    """Run the whole system on this machine with embedded defaults."""
    from mics.dev import DevOptions, DevStack

    setup_logging(log_level)

    async def main() -> None:
        stack = DevStack(
            DevOptions(host=host, gateway_port=port, backend_port=backend_port, data_dir=data_dir)
        )
        await stack.start()
        print(stack.banner(), flush=True)
        try:
            await wait_for_stop_signal()
        finally:
            print("stopping...", flush=True)
            await stack.stop()

    run(main)


@app.command()
def gateway(
    config: Annotated[
        Path | None, typer.Option(help="TOML file; environment variables apply too")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (overrides PORT)")] = None,
    redis: Annotated[
        str | None,
        typer.Option(help="Redis address: join a cluster (overrides REDIS__CONNECTION)"),
    ] = None,
) -> None:
    """Run one gateway node (configured by environment variables or --config)."""
    from pydantic import ValidationError

    from mics.gateway.app import GatewayServer
    from mics.gateway.config import load_settings

    try:
        settings = load_settings(config, port=port, redis_connection=redis)
    except (ValidationError, OSError, ValueError) as exc:
        typer.echo(f"invalid gateway configuration: {exc}", err=True)
        raise typer.Exit(2) from exc
    setup_logging(settings.log_level)

    async def main() -> None:
        server = GatewayServer(settings)
        await server.start()
        try:
            await wait_for_stop_signal()
        finally:
            await server.stop()

    run(main)


backend_app = typer.Typer(no_args_is_help=False, help="The reference tenant backend and its jobs")
app.add_typer(backend_app, name="backend")

ConfigOption = Annotated[Path | None, typer.Option(help="TOML or JSON config file")]


def _load_backend_config(config: Path | None, demo: bool) -> BackendConfig:
    from mics.backend.config import ConfigError, load_config
    from mics.backend.demo import demo_config

    if config is None and not demo:
        typer.echo("give --config FILE or --demo", err=True)
        raise typer.Exit(2)
    try:
        return load_config(config) if config is not None else demo_config(port=8090)
    except (ConfigError, OSError) as exc:
        typer.echo(f"invalid backend configuration: {exc}", err=True)
        raise typer.Exit(2) from exc


@backend_app.callback(invoke_without_command=True)
def backend(
    ctx: typer.Context,
    config: ConfigOption = None,
    demo: Annotated[bool, typer.Option(help="Serve the demo tenant")] = False,
    port: Annotated[int | None, typer.Option(help="Listen port")] = None,
    log_level: Annotated[str, typer.Option(help="Log level")] = "INFO",
) -> None:
    """Run the reference tenant backend: hooks, offline consumer and store, jobs."""
    if ctx.invoked_subcommand is not None:
        return
    from mics.backend.app import BackendServer

    setup_logging(log_level)
    cfg = _load_backend_config(config, demo)
    if port is not None:
        cfg = cfg.model_copy(update={"port": port})

    async def main() -> None:
        server = BackendServer(cfg)
        await server.start()
        try:
            await wait_for_stop_signal()
        finally:
            await server.stop()

    run(main)


@backend_app.command()
def migrate(config: ConfigOption = None, revision: str = "head") -> None:
    """Create or upgrade the offline store's schema (Alembic migrations)."""
    from mics.backend.store.engine import migrate_sync

    setup_logging("INFO")
    cfg = _load_backend_config(config, demo=False)
    migrate_sync(cfg.database_url, revision)
    typer.echo(f"offline store at {revision}")


@backend_app.command()
def cleanup(
    config: ConfigOption = None,
    days: Annotated[int | None, typer.Option(help="Delete delivered rows older than this")] = None,
) -> None:
    """Delete delivered offline messages older than the retention, in batches."""
    from mics.backend.jobs import run_cleanup

    setup_logging("INFO")
    cfg = _load_backend_config(config, demo=False)
    deleted = asyncio.run(run_cleanup(cfg.database_url, days or cfg.retention_days))
    typer.echo(f"deleted {deleted} delivered rows")


@backend_app.command()
def reconcile(
    config: ConfigOption = None,
    day: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: yesterday, UTC)")] = None,
) -> None:
    """Compare events consumed with rows stored for one day; exit 1 past 1% apart."""
    from mics.backend.jobs import run_reconcile

    setup_logging("INFO")
    cfg = _load_backend_config(config, demo=False)
    results = asyncio.run(run_reconcile(cfg.database_url, day))
    for result in results:
        typer.echo(json.dumps(result.as_dict(), default=str))
    if any(result.alert for result in results):
        raise typer.Exit(1)


@app.command()
def chat(
    as_user: Annotated[str, typer.Option("--as", help="Demo user to sign in as")],
    to: Annotated[str | None, typer.Option(help="Recipient user (omit to only listen)")] = None,
    group: Annotated[str | None, typer.Option(help="Group to send to")] = None,
    url: Annotated[str, typer.Option(help="Gateway WebSocket URL")] = "ws://127.0.0.1:8080/ws",
    tenant: Annotated[str, typer.Option(help="Tenant id")] = "demo",
    token: Annotated[str | None, typer.Option(help="Token (default: <user>-token)")] = None,
    device: Annotated[str, typer.Option(help="Device id")] = "cli",
) -> None:
    """A tiny terminal chat client on the Python SDK: type lines, see deliveries."""
    from mics.client import ClientOptions, MicsClient, MicsClientError

    async def main() -> None:
        client = MicsClient(
            ClientOptions(
                url=url, tenant_id=tenant, token=token or f"{as_user}-token", device_id=device
            )
        )
        try:
            ack = await client.connect()
        except MicsClientError as exc:
            await client.close()
            typer.echo(f"could not connect: {exc}", err=True)
            raise typer.Exit(1) from exc
        print(f"connected as {ack.user_id} on {ack.node_id}", flush=True)

        async def show() -> None:
            async for message in client.deliveries():
                sender = message.user_id
                print(f"<{sender}> {message.msg_body.decode('utf-8', 'replace')}", flush=True)

        printer = asyncio.create_task(show())
        loop = asyncio.get_running_loop()
        try:
            if not (group or to):
                await printer  # listen only, until Ctrl-C
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    break
                body = line.rstrip("\n").encode("utf-8")
                if group:
                    result = await client.send_group(group, body)
                else:
                    result = await client.send_single(to or "", body)
                status = "sent" if result.status == 0 else "failed"
                print(f"  [{status}{': ' + result.reason if result.reason else ''}]", flush=True)
        finally:
            printer.cancel()
            await client.close()

    run(main)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
