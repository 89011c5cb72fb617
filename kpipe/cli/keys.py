"""kpipe keys: module-signing keys in the kernel's certificate format."""

from __future__ import annotations

from pathlib import Path

import typer

from kpipe.cli.context import print_json, state

keys_app = typer.Typer(help="Module-signing keys (the kernel's X.509 format).", no_args_is_help=True)


@keys_app.command("generate")
def generate_cmd(
    signer: str | None = typer.Option(None, "--signer", metavar="NAME",
                                         help="Write the key and certificate that \\[signing.signers.NAME] names "
                                              "(default: \\[signing] default)."),
    key: str | None = typer.Option(None, "--key", metavar="FILE", help="Private key to write (with --cert; "
                                      "no workspace needed)."),
    cert: str | None = typer.Option(None, "--cert", metavar="FILE", help="Certificate to write (with --key)."),
    key_type: str = typer.Option("rsa", "--type", metavar="TYPE", help="rsa or ecdsa (P-384)."),
    bits: int = typer.Option(3072, "--bits", metavar="BITS", help="RSA key size: 2048, 3072 or 4096."),
    days: int = typer.Option(3650, "--days", metavar="DAYS", help="Certificate validity in days."),
    common_name: str = typer.Option("kpipe module signing key", "--cn", metavar="NAME",
                                    help="The certificate's common name."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Create a module-signing key (0600) and its self-signed certificate, as the kernel's certs/ does."""
    from kpipe.errors import ConfigError, UsageError
    from kpipe.keys import generate_signing_key

    if (key or cert) and signer:
        raise UsageError("give either --signer or --key/--cert, not both")
    if bool(key) != bool(cert):
        raise UsageError("--key and --cert go together")
    if key and cert:
        key_path, cert_path = Path(key).expanduser().absolute(), Path(cert).expanduser().absolute()
    else:
        ws = state().workspace
        name = signer or ws.default_signer
        if not name:
            raise ConfigError(f"{ws.file}: no signer given and [signing] names no default",
                              hint="pass --signer NAME, or --key FILE --cert FILE")
        conf = ws.signers.get(name)
        if conf is None:
            raise ConfigError(f"{ws.file}: no signer named {name!r} in [signing.signers]",
                              hint=f"signers: {', '.join(sorted(ws.signers)) or 'none'}")
        if conf.type != "builtin" or not conf.key or not conf.cert:
            raise ConfigError(f"{ws.file}: signer {name!r} is not a builtin signer with key and cert paths",
                              hint="a vendor's command signer keeps its keys itself")
        key_path, cert_path = ws.path(conf.key), ws.path(conf.cert)
    made = generate_signing_key(key_path, cert_path, common_name=common_name, key_type=key_type, bits=bits,
                                days=days, force=force)
    if json_out:
        print_json(made)
        return
    out = state().console
    out.print(f"private key  {made.key} (0600, stays on this machine)", markup=False)
    out.print(f"certificate  {made.cert}", markup=False)
    out.print(f"subject      {made.subject}", markup=False)
    out.print(f"key id       {made.subject_key_id}", markup=False)


def register(app: typer.Typer) -> None:
    """Add `kpipe keys` to the root app."""
    app.add_typer(keys_app, name="keys")
