"""kpipe artifacts: list, show, log and export the modules in the store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from kpipe.cli import complete
from kpipe.cli.params import WORD

if TYPE_CHECKING:  # imported inside the commands: `kpipe --help` stays fast
    from kpipe.store import Store

artifacts_app = typer.Typer(help="Built and signed modules in the store.", no_args_is_help=True)


@artifacts_app.command("list")
def list_cmd(
    kernel: str | None = typer.Option(None, "--kernel", "-k", autocompletion=complete.kernels, metavar="RELEASE",
                                      help="Only this kernel release."),
    recipe: str | None = typer.Option(None, "--recipe", "-r", autocompletion=complete.recipes, metavar="RECIPE",
                                      help="Only this recipe."),
    status: str | None = typer.Option(None, "--status", metavar="STATUS",
                                      help="Only built, valid or rejected artifacts."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List artifacts, newest first."""
    from kpipe.cli.listings import artifacts_list  # the body kpipe.cli.fast runs without Typer too

    artifacts_list(kernel=kernel, recipe=recipe, status=status, json_out=json_out)


@artifacts_app.command("show")
def show_cmd(
    artifact_id: str = typer.Argument(..., autocompletion=complete.artifacts, metavar="ID", click_type=WORD,
                                      help="Artifact id (or a unique prefix)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    tail: int = typer.Option(20, "--tail", metavar="N", min=0, help="Lines of the build log to show."),
) -> None:
    """Show an artifact: metadata, validation summary, preflight and the end of its build log."""
    from rich.markup import escape

    from kpipe.artifacts import get_artifact, preflight_records, validation_records
    from kpipe.cli.context import print_json, state

    st = state()
    store = st.workspace.store
    art = get_artifact(store, artifact_id)
    log_tail = _log_text(store, art.log_sha256).splitlines()[-tail:] if tail and art.log_sha256 else []
    validations, preflights = validation_records(store, art.id), preflight_records(store, art.id)
    if json_out:
        d = art.to_dict()
        d["path"] = str(store.blob_path(art.sha256))  # shown, not read: `show` inspects a damaged artifact too
        d["log_tail"] = log_tail
        d["validations"] = [{**{k: v for k, v in r.items() if k != "report"},
                             "summary": _validation_summary(r["report"])} for r in validations]
        d["preflights"] = [{k: v for k, v in r.items() if k != "result"} for r in preflights]
        print_json(d)
        return
    c = st.console
    rows = [("id", art.id), ("sha256", art.sha256), ("module", art.module_name), ("file", art.filename),
            ("kernel", art.kernel), ("arch", art.arch), ("recipe", art.recipe), ("status", art.status),
            ("signed", "yes" if art.signed else "no"), ("parent", art.parent_id), ("builder", art.builder),
            ("builder version", art.builder_version), ("build host", art.build_host),
            ("build time", f"{art.duration_s:.1f} s" if art.duration_s else ""), ("inputs digest", art.inputs_digest),
            ("created", _when(art.created_at))]
    for k, v in rows:
        if v:
            c.print(f"[bold]{k:16}[/bold] {escape(str(v))}")
    c.print(f"[bold]{'validation':16}[/bold] {escape(_validation_summary(art.validation))}")
    for f in (art.validation or {}).get("findings", [])[:20]:
        if isinstance(f, dict):
            c.print(f"  {escape(str(f.get('severity', '')))} {escape(str(f.get('id', '')))}: "
                    f"{escape(str(f.get('message', '')))}")
    c.print(f"[bold]{'preflight':16}[/bold] {escape(_preflight_summary(art.preflight))}")
    trials = [r for r in validations if not r["own"]]
    if trials or len(preflights) > 1:
        c.print(f"[bold]{'records':16}[/bold] {len(validations)} validation(s), {len(trials)} of them trials "
                f"that did not change the status; {len(preflights)} preflight(s)")
        for r in trials[-5:]:
            c.print(f"  validation {_when(r['at'])} {escape(_options_text(r['options']))}: "
                    f"{escape(_validation_summary(r['report']))}")
        for r in preflights[-5:]:
            c.print(f"  preflight {_when(r['at'])} {escape(_options_text(r['options']))}: {escape(r['status'])}")
    if log_tail:
        c.print(f"[bold]build log[/bold] (last {len(log_tail)} lines; `kpipe artifacts log {art.id}` for all):")
        for line in log_tail:
            c.print(f"  {escape(line)}", soft_wrap=True)


@artifacts_app.command("log")
def log_cmd(artifact_id: str = typer.Argument(..., autocompletion=complete.artifacts, metavar="ID", click_type=WORD,
                                              help="Artifact id.")) -> None:
    """Print the artifact's whole build log."""
    import sys

    from kpipe.artifacts import get_artifact
    from kpipe.cli.context import state
    from kpipe.errors import NotFoundError

    store = state().workspace.store
    art = get_artifact(store, artifact_id)
    sha = art.log_sha256
    if not sha and art.parent_id:  # a signed artifact: its log is its parent's
        sha = get_artifact(store, art.parent_id).log_sha256
    if not sha:
        raise NotFoundError(f"artifact {art.id} has no build log", hint="it was added without a build")
    sys.stdout.buffer.write(store.get_bytes(sha))
    sys.stdout.flush()


@artifacts_app.command("export")
def export_cmd(
    artifact_id: str = typer.Argument(..., autocompletion=complete.artifacts, metavar="ID", click_type=WORD,
                                      help="Artifact id."),
    output: Path = typer.Option(..., "--output", "-o", metavar="FILE", help="File to write the module to."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write the artifact's module to a file (checksum verified)."""
    import os
    import tempfile

    from kpipe.artifacts import get_artifact
    from kpipe.cli.context import state
    from kpipe.errors import ConfigError

    st = state()
    store = st.workspace.store
    art = get_artifact(store, artifact_id)
    out = output.expanduser()
    if out.is_dir():
        out = out / art.filename
    if out.exists() and not force:
        raise ConfigError(f"{out} exists", hint="pass --force to overwrite it")
    data = store.get_bytes(art.sha256)  # checked: NotFoundError when missing, StoreCorrupt when changed
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror}") from None
    st.console.print(f"{out} ({art.sha256})", markup=False)


def _log_text(store: Store, sha: str) -> str:
    from kpipe.errors import NotFoundError
    from kpipe.store import StoreCorrupt

    try:
        return store.get_bytes(sha).decode("utf-8", "replace")
    except NotFoundError:
        return ""
    except StoreCorrupt as e:  # `show` still shows the rest; `artifacts log` refuses
        return f"({e.message})"


def _when(ts: float) -> str:
    from kpipe.cli.listings import when

    return when(ts)


def _validation_summary(v: dict[str, Any]) -> str:
    if not v:
        return "not validated"
    findings = v.get("findings") or []
    sev: dict[str, int] = {}
    for f in findings:
        if isinstance(f, dict):
            sev[str(f.get("severity", "?"))] = sev.get(str(f.get("severity", "?")), 0) + 1
    ok = v.get("ok")
    head = "passed" if ok else "FAILED" if ok is not None else "recorded"
    return head + (" (" + ", ".join(f"{n} {s}" for s, n in sorted(sev.items())) + ")" if sev else "")


def _options_text(options: dict[str, Any]) -> str:
    """The options that differ from a default run, as short text."""
    parts = [f"{k}={v}" for k, v in sorted(options.items()) if v not in (None, False, "", [], ())]
    return "(" + (", ".join(parts) or "default options") + ")"


def _preflight_summary(p: dict[str, Any]) -> str:
    if not p:
        return "not run"
    return str(p.get("status", "recorded")) + (f": {p['detail']}" if p.get("detail") else "")


def register(app: typer.Typer) -> None:
    """Add `kpipe artifacts ...` to the root app."""
    app.add_typer(artifacts_app, name="artifacts")
