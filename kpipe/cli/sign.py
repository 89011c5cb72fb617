"""kpipe sign: sign a module or artifact (built-in sign-file-compatible signer or a configured one)."""

from __future__ import annotations

from pathlib import Path

import typer

from kpipe.cli.context import print_json, state
from kpipe.cli.params import WORD


def sign_cmd(
    target: str = typer.Argument(..., metavar="TARGET", click_type=WORD, help="An artifact id, or a module file."),
    key: str | None = typer.Option(None, "--key", metavar="FILE",
                                   help="Private key (PEM/DER; KBUILD_SIGN_PIN if encrypted)."),
    cert: str | None = typer.Option(None, "--cert", metavar="FILE", help="X.509 certificate of the key (PEM/DER)."),
    hash_name: str = typer.Option("sha256", "--hash", metavar="ALGO", help="sha224, sha256, sha384 or sha512."),
    keyid: bool = typer.Option(False, "--keyid", help="Name the signer by subject key id (sign-file -k)."),
    signer: str | None = typer.Option(None, "--signer", metavar="NAME",
                                      help="A signer named in kpipe.toml (signing.signers.NAME)."),
    output: str | None = typer.Option(None, "--output", "-o", metavar="FILE",
                                      help="For a file: where to write (default: in place)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Sign a module file (in place or to --output) or an artifact (stored as a new signed artifact)."""
    from kpipe.errors import ConfigError, UsageError

    if (key or cert) and signer:
        raise UsageError("give either --key/--cert or --signer, not both")
    if bool(key) != bool(cert):
        raise UsageError("--key and --cert go together")
    path = Path(target)
    if path.is_file():
        from kpipe.elf.sign import sign_file, sign_with_signer

        out = Path(output) if output else path
        if key and cert:
            sign_file(path, out, key, cert, hash_name, keyid=keyid)
            used = "builtin"
        else:
            ws = state().workspace
            name = signer or ws.default_signer
            if not name or name not in ws.signers:
                raise ConfigError(f"no signer {name!r} configured" if name else "no signer given",
                                  hint="pass --key KEY --cert CERT, or --signer NAME from kpipe.toml")
            sign_with_signer(ws.signers[name], path, out, root=ws.root)
            used = name
        if json_out:
            print_json({"output": str(out), "signer": used})
        else:
            state().console.print(f"signed {path} -> {out} ({used})", markup=False)
        return
    from kpipe.artifacts import get_artifact
    from kpipe.validation import sign_artifact

    ws = state().workspace
    art = get_artifact(ws.store, target)
    new = sign_artifact(ws, art, signer, key=key, cert=cert, hash_name=hash_name, keyid=keyid)
    if json_out:
        print_json({"id": new.id, "parent_id": new.parent_id, "status": new.status, "signed": new.signed,
                    "sha256": new.sha256, "signer": new.meta.get("signer", "")})
    else:
        state().console.print(f"{new.id}  (signed from {art.id}, status {new.status})", markup=False)


def register(app: typer.Typer) -> None:
    """Add `kpipe sign` to the root app."""
    app.command("sign")(sign_cmd)
