"""Run builds on build hosts: stage, start detached, follow, fetch, record.

A build runs in `<workdir>/<inputs digest[:16]>/` on its host, started with
`setsid nohup` so that neither a dropped SSH connection nor a killed kpipe
stops it. The folder holds `pid`, `log` (the builder's output), `exit` (its
status, written last and atomically), `started`/`finished` and, for
kpatch-build, `cachedir-build.log` ($CACHEDIR/build.log copied right after the
run, because the next run deletes it). A later build with the same inputs
finds the folder and reattaches: it follows the log from its current offset
until `exit` appears. Each concurrent build takes one slot lock
(`<workdir>/cache/slot-N.lock`, flock) and uses that slot's private CACHEDIR.

The host-side scripts are constants (kpipe/builder/remote.py); user values
reach them only as "$1"... (Command.script), so shell metacharacters in
recipes, patch names and paths stay data.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpipe.artifacts import Artifact, ArtifactStatus, add_artifact, find_by_inputs, get_artifact
from kpipe.builder.hosts import pick_host, select_hosts
from kpipe.builder.records import (
    any_tool_version,
    build_record,
    cached_tool_version,
    ensure_schema,
    find_cached,
    record,
    save_tool_version,
)
from kpipe.builder.remote import FOLLOW_SCRIPT, LAUNCH_SCRIPT, PROBE_PREFIX, RUN_SCRIPT, SAFE_WORKDIR
from kpipe.builder.states import BuildEventKind, BuildRecordStatus, BuildStatus, LaunchState
from kpipe.errors import BuildFailed, ConfigError, ExitCode, KpipeError, TransportError

if TYPE_CHECKING:
    # A cache hit (answered from the store) needs none of these (tarfile, thread pools, the builders, the
    # transports): they load when a build runs (tests/test_startup_budget.py: a cache hit's import budget).
    from kpipe.builder.base import Builder, BuildPlan
    from kpipe.builder.spec import BuildSpec
    from kpipe.builder.warmup import HostWarmup
    from kpipe.transport.base import Transport
    from kpipe.transport.ssh import SshPool, SshTransport  # paramiko and Fabric load only for a remote host
    from kpipe.workspace import BuildHost, Workspace

POLL_ROUNDS = 20  # one follow request waits at most 20 x 50 ms for news
CHUNK_BYTES = 1 << 20
BATCH_ROUNDS = 5  # new output alone returns the first follow request after 5 x 50 ms (then 10, 20)
MODULE_INLINE_BYTES = 32 << 20  # a module up to this size comes with the last follow answer (else SFTP)


# -- data -----------------------------------------------------------------------

@dataclass(frozen=True)
class BuildEvent:
    """Progress of one build, for the CLI (which renders it) and tests."""

    key: str  # "<recipe>@<kernel>"
    kind: BuildEventKind
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


EventSink = Callable[[BuildEvent], None]


def _ignore(_: BuildEvent) -> None:
    pass


@dataclass
class BuildResult:
    """What happened to one build (partial failure is data)."""

    key: str
    recipe: str
    kernel: str
    status: BuildStatus
    host: str = ""
    builder: str = ""
    inputs_digest: str = ""
    artifact_id: str = ""
    artifact_status: str = ""
    signed_id: str = ""
    module_name: str = ""
    remote_dir: str = ""
    pid: int = 0
    reattached: bool = False
    duration_s: float = 0.0
    category: str = ""
    lines: list[str] = field(default_factory=list)
    hint: str = ""
    message: str = ""
    exit_code: int = 0

    @property
    def ok(self) -> bool:
        return self.status in (BuildStatus.BUILT, BuildStatus.CACHED)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _errored(res: BuildResult, e: KpipeError) -> None:
    # a KpipeError ends one build with its own line, hint and exit code; the matrix goes on
    res.status, res.message, res.hint, res.exit_code = BuildStatus.ERROR, e.message, e.hint or "", int(e.exit_code)


@dataclass
class BuildOptions:
    """How to run a set of builds."""

    force: bool = False  # rebuild even when the store has the artifact
    host: str | None = None  # only this build host
    jobs: int | None = None  # make jobs override (does not change the inputs digest)
    validate: bool = True  # run kpipe.validation after a build


# -- transports -----------------------------------------------------------------

class Connections:
    """Transports to build hosts: one per (host, lane) so concurrent builds never share a channel lock."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self._pool: SshPool | None = None
        self._lock = threading.Lock()

    def transport(self, host: BuildHost, lane: int = 0) -> Transport:
        """A Transport to host (LocalTransport for `local`)."""
        if host.is_local:
            from kpipe.transport.local import LocalTransport

            return LocalTransport(host.name)
        return self._ssh(host, lane)

    def connect(self, host: BuildHost, lane: int = 0) -> Transport:
        """The transport to a remote host, its connection opened now (TransportError when it cannot be)."""
        return self._ssh(host, lane).connect()

    def _ssh(self, host: BuildHost, lane: int) -> SshTransport:
        from kpipe.host import Host
        from kpipe.transport.ssh import SshPool

        with self._lock:
            if self._pool is None:
                self._pool = SshPool(self.ws.ssh, known_hosts=[self.ws.path(self.ws.ssh.known_hosts)])
            pool = self._pool
        ident = host.identity_file or self.ws.ssh.identity_file
        target = Host(name=host.name if lane == 0 else f"{host.name}#{lane}", address=host.address,
                           port=host.port, user=host.user, identity_file=str(self.ws.path(ident)) if ident else "")
        return pool.transport(target)

    def close(self) -> None:
        """Close every connection to the build hosts."""
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None


# -- one build ------------------------------------------------------------------

def _kv(stdout: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in stdout.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out.setdefault(k.strip(), v.strip())
    return out


def _tarball(plan: BuildPlan) -> bytes:
    """The build folder's initial contents as a tar archive (run.sh + the plan's files)."""
    import io
    import tarfile

    from kpipe.builder.base import StagedFile

    buf = io.BytesIO()
    files = [StagedFile("run.sh", RUN_SCRIPT.encode(), 0o755), *plan.files]
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in files:
            info = tarfile.TarInfo(f.name)
            info.size = len(f.data)
            info.mode = f.mode
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(f.data))
    return buf.getvalue()


class _LineSplitter:
    """Turns log chunks into complete lines."""

    def __init__(self) -> None:
        self.partial = ""

    def feed(self, text: str) -> list[str]:
        text = self.partial + text
        *lines, self.partial = text.split("\n")
        return lines

    def flush(self) -> list[str]:
        rest, self.partial = self.partial, ""
        return [rest] if rest else []


def _lossless(text: str, size: str) -> bytes | None:
    """The log's bytes from the followed text when it decoded losslessly and is complete, else None."""
    data = text.encode("utf-8")
    if "\ufffd" in text or str(len(data)) != size:
        return None
    return data


_prewarm_lock = threading.Lock()
_prewarm_started = False


def _prewarm_validation() -> None:
    """Import kpipe.validation (pyelftools, the checks) in a background thread while the build runs on its
    host, once per process: the wait for the build hides that import instead of the import following it."""
    global _prewarm_started
    with _prewarm_lock:
        if _prewarm_started:
            return
        _prewarm_started = True

    def load() -> None:
        try:
            import kpipe.validation  # noqa: F401
        except Exception:  # noqa: S110  (the import after the build raises it again, where it is reported)
            pass

    threading.Thread(target=load, name="kpipe-prewarm", daemon=True).start()


def _module_bytes(kv: dict[str, str]) -> bytes | None:
    """The module as the last follow answer carried it (base64), when it is there whole; else None."""
    import base64
    import binascii

    text, size = kv.get("moduledata", ""), kv.get("modulesize", "")
    if not text or not size.isdigit():
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if len(data) == int(size) else None


@dataclass
class _Probe:
    workdir: str
    version: str


def probe_host(transport: Transport, host: BuildHost, builder_name: str) -> _Probe:
    """The host's absolute work folder and the builder's version there (one command)."""
    from kpipe.builder.base import get_builder, parse_version_output
    from kpipe.commands import Command

    builder = get_builder(builder_name)
    cmd = Command.script(PROBE_PREFIX + builder.version_script, host.workdir, *builder.version_args(host),
                         label="probe", timeout=60)
    r = transport.run(cmd)
    kv = _kv(r.stdout)
    if r.exit_status != 0 or "workdir" not in kv:
        raise BuildFailed(f"build host {host.name}: cannot use work folder {host.workdir!r}: "
                          f"{(r.stderr or r.stdout).strip()[-300:]}",
                          hint="check the build host's workdir in kpipe.toml and its permissions")
    if not SAFE_WORKDIR.fullmatch(kv["workdir"]):
        raise ConfigError(f"build host {host.name}: workdir {kv['workdir']!r} contains whitespace or characters "
                          "that make and kpatch-build cannot handle in paths",
                          hint="set the build host's workdir in kpipe.toml to a plain path, e.g. /srv/kpipe/builds")
    if kv.get("kpatch-build") == "missing":
        raise BuildFailed(f"build host {host.name}: {host.tool('kpatch-build')} is not installed",
                          hint="install kpatch-build on the build host or set tools.kpatch-build in kpipe.toml")
    return _Probe(kv["workdir"], parse_version_output(r.stdout))


class BuildRunner:
    """Runs BuildSpecs on the workspace's build hosts and records the results."""

    def __init__(self, ws: Workspace, *, on_event: EventSink | None = None, options: BuildOptions | None = None,
                 connections: Connections | None = None):
        self.ws = ws
        self.store = ws.store
        self.emit = on_event or _ignore
        self.options = options or BuildOptions()
        self.connections = connections or Connections(ws)
        self._probes: dict[tuple[str, str], _Probe] = {}
        self._versions: dict[str, str] = {}  # inputs digest -> the builder version it was computed with
        self._probe_lock = threading.Lock()
        self._stop = threading.Event()  # set on Ctrl-C: stop following, leave the builds running
        self._warm: HostWarmup | None = None
        ensure_schema(self.store)

    def prepare(self, release: str) -> None:
        """Start connecting, in the background, to the build host run() will pick for one build for `release`
        (kpipe.builder.warmup): the connection's network waits then overlap the caller's rendering of the
        recipe. Only when a build will contact the host anyway: with --force, or when no candidate host has a
        probed builder version (so the store cannot answer). Never raises: run() reports what it meets."""
        from kpipe.kernel import parse_release

        if self._warm is not None:
            return
        where = str(self.ws.file)
        try:
            entry = self.ws.kernel(release)
            arch = entry.arch or parse_release(release).arch
            hosts = select_hosts(self.ws.build_hosts, release, arch, only=self.options.host, where=where)
            host = pick_host(hosts, release, arch, where=where)
        except (KpipeError, ValueError):
            return
        if host.is_local or (not self.options.force and any_tool_version(self.store, [h.name for h in hosts])):
            return
        from kpipe.builder.warmup import HostWarmup

        # The SSH stack's import is CPU (~0.15 s), as is the rendering that follows: threads share one core's
        # worth of Python, so it is done here, before the thread starts, and the thread's network waits
        # (connect, authenticate, probe) are what overlaps the rendering.
        try:
            from kpipe.transport import ssh  # noqa: F401
        except Exception:  # noqa: BLE001 -- a missing SSH library is reported by the build, as without this
            return

        self._warm = HostWarmup(host, lambda: self.connections.connect(host),
                                lambda t, builder: self._probe(t, host, builder))

    def name_builder(self, builder: str | None) -> None:
        """The builder the prepared build will use, as soon as it is known: the warm-up probes the host for it
        while the recipe still renders (None: unknown yet; run() names it)."""
        if self._warm is not None:
            self._warm.name_builder(builder)

    def _signed(self, key: str, artifact_id: str) -> None:
        self.emit(BuildEvent(key, BuildEventKind.SIGNED, f"signed -> artifact {artifact_id}",
                             {"artifact": artifact_id}))

    # -- the matrix ---------------------------------------------------------------
    def run(self, specs: list[BuildSpec], input_keys: list[str | None] | None = None) -> list[BuildResult]:
        """Build every spec: cache hits first (no host contact), the rest in parallel up to each host's slots.

        input_keys (kpipe.builder.memo.input_key of each spec's recipe inputs, taken before it rendered):
        each usable result is remembered under its key, so the next run answers without rendering."""
        results = self._run(specs)
        for spec, res, key in zip(specs, results, input_keys or [], strict=False):
            if key and res.ok and res.inputs_digest:
                self._remember(spec, res, key)
        return results

    def _remember(self, spec: BuildSpec, res: BuildResult, key: str) -> None:
        from kpipe.builder import memo

        version = self._versions.get(res.inputs_digest)
        if version is None or spec.inputs_digest(version) != res.inputs_digest:
            return  # not this spec's digest (cannot happen today; a wrong memo row would answer wrongly)
        memo.remember(self.store, key, builder=spec.builder, builder_version=version,
                      inputs_digest=res.inputs_digest, arch=spec.kernel_entry.arch or spec.kernel.arch,
                      sign=bool((spec.signing or {}).get("sign")))

    def _run(self, specs: list[BuildSpec]) -> list[BuildResult]:
        import queue
        from concurrent.futures import ThreadPoolExecutor

        results: dict[int, BuildResult] = {}
        todo: list[tuple[int, BuildSpec, BuildHost]] = []
        load: dict[str, int] = {}
        where = str(self.ws.file)
        for i, spec in enumerate(specs):
            key = f"{spec.recipe}@{spec.kernel.release}"
            arch = spec.kernel_entry.arch or spec.kernel.arch
            try:
                hosts = select_hosts(self.ws.build_hosts, spec.kernel.release, arch, only=self.options.host,
                                     where=where)
                if not self.options.force:
                    hit = find_cached(self.ws, spec, hosts)
                    if hit is not None:
                        self._versions[hit[0].inputs_digest] = cached_tool_version(self.store, hit[1].name,
                                                                                   spec.builder) or ""
                        results[i] = self._cached(spec, key, *hit)
                        continue
                host = pick_host(hosts, spec.kernel.release, arch, load=load, where=where)
            except KpipeError as e:
                results[i] = BuildResult(key, spec.recipe, spec.kernel.release, BuildStatus.ERROR, builder=spec.builder,
                                         message=e.message, hint=e.hint or "", exit_code=int(e.exit_code))
                self.emit(BuildEvent(key, BuildEventKind.ERROR, e.message))
                continue
            load[host.name] = load.get(host.name, 0) + 1
            todo.append((i, spec, host))

        if todo:
            lanes: dict[str, queue.Queue[int]] = {}
            for _, _, h in todo:
                if h.name not in lanes:
                    q: queue.Queue[int] = queue.Queue()
                    for lane in range(h.slots):
                        q.put(lane)
                    lanes[h.name] = q
            workers = sum(min(h.slots, load[h.name]) for h in {h.name: h for _, _, h in todo}.values())

            def one(item: tuple[int, BuildSpec, BuildHost]) -> tuple[int, BuildResult]:
                i, spec, host = item
                lane = lanes[host.name].get()
                try:
                    return i, self.build_on(spec, host, lane=lane)
                finally:
                    lanes[host.name].put(lane)

            ex = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="kpipe-build")
            try:
                for i, res in ex.map(one, todo):
                    results[i] = res
            except KeyboardInterrupt:
                # Stop following (the detached builds go on); the workers notice within one poll.
                self._stop.set()
                ex.shutdown(wait=True, cancel_futures=True)
                raise
            ex.shutdown(wait=True)
        return [results[i] for i in range(len(specs))]

    def close(self) -> None:
        """Close the build hosts' connections (a warm-up still connecting closes them when it ends)."""
        warm, self._warm = self._warm, None
        if warm is not None and not warm.abandon(self.connections.close):
            return
        self.connections.close()

    def answer_from_memo(self, recipe: str, release: str, input_key: str) -> BuildResult | None:
        """The cache hit of recipe x release without rendering it (kpipe.builder.memo), or None: then render
        and run(). Looks the artifact up exactly as run() does (each candidate host's probed builder version,
        in workspace order); a recipe that signs is answered only when its signed artifact exists."""
        from kpipe.builder import memo

        if self.options.force:
            return None
        rows = memo.recall(self.store, input_key)
        if not rows:
            return None
        by_version = {(r["builder"], r["builder_version"]): r for r in rows}
        try:
            hosts = select_hosts(self.ws.build_hosts, release, rows[0]["arch"], only=self.options.host,
                                 where=str(self.ws.file))
        except KpipeError:
            return None  # the full path reports it, with the rendered recipe's context
        builder = rows[0]["builder"]
        for h in hosts:
            row = by_version.get((builder, cached_tool_version(self.store, h.name, builder)))
            art = find_by_inputs(self.store, row["inputs_digest"]) if row is not None else None
            if row is None or art is None:
                continue
            key = f"{recipe}@{release}"
            res = BuildResult(key, recipe, release, BuildStatus.CACHED, host=art.build_host or h.name,
                              builder=builder, inputs_digest=art.inputs_digest, artifact_id=art.id,
                              artifact_status=art.status, module_name=art.module_name, duration_s=art.duration_s)
            if art.status == ArtifactStatus.VALID and row["sign"]:
                signed = self._signed_child(art)
                if signed is None:
                    return None  # signing needs the rendered recipe's signer: the full path signs it
                res.signed_id = signed
            self.emit(BuildEvent(key, BuildEventKind.CACHED, f"answered from the store: artifact {art.id} "
                                 f"({art.status})", {"artifact": art.id, "host": art.build_host}))
            return res
        return None

    def _signed_child(self, art: Artifact) -> str | None:
        """The id of a valid signed artifact made from art, if there is one."""
        from kpipe.artifacts import list_artifacts

        for other in list_artifacts(self.store, kernel=art.kernel):
            if other.parent_id == art.id and other.signed and other.status == ArtifactStatus.VALID:
                return other.id
        return None

    def _cached(self, spec: BuildSpec, key: str, art: Artifact, host: BuildHost) -> BuildResult:
        self.emit(BuildEvent(key, BuildEventKind.CACHED, f"answered from the store: artifact {art.id} ({art.status})",
                             {"artifact": art.id, "host": art.build_host}))
        res = BuildResult(key, spec.recipe, spec.kernel.release, BuildStatus.CACHED, host=art.build_host or host.name,
                          builder=spec.builder, inputs_digest=art.inputs_digest, artifact_id=art.id,
                          artifact_status=art.status, module_name=art.module_name, duration_s=art.duration_s)
        if art.status == ArtifactStatus.VALID and (spec.signing or {}).get("sign"):
            self._ensure_signed(spec, key, art, res)
        return res

    def _ensure_signed(self, spec: BuildSpec, key: str, art: Artifact, res: BuildResult) -> None:
        """A cached module the recipe wants signed: reuse its signed artifact, or sign it now
        (the signer may have been configured after the build)."""
        signed_id = self._signed_child(art)
        if signed_id is not None:
            res.signed_id = signed_id
            return
        try:
            from kpipe import validation

            signed = validation.sign_artifact(self.ws, art, (spec.signing or {}).get("signer"))
        except KpipeError as e:
            _errored(res, e)
            return
        res.signed_id = signed.id
        self._signed(key, signed.id)

    # -- one build on one host ---------------------------------------------------
    def build_on(self, spec: BuildSpec, host: BuildHost, *, lane: int = 0) -> BuildResult:
        """Build spec on host (reattaching to a running build of the same inputs); never raises KpipeError."""
        key = f"{spec.recipe}@{spec.kernel.release}"
        res = BuildResult(key, spec.recipe, spec.kernel.release, BuildStatus.ERROR, host=host.name,
                          builder=spec.builder)
        try:
            return self._build_on(spec, host, lane, res)
        except BuildFailed as e:
            res.status, res.message, res.hint = BuildStatus.FAILED, e.message, e.hint or ""
            res.category = res.category or "environment"
            res.exit_code = int(e.exit_code)
        except KpipeError as e:
            _errored(res, e)
            if (isinstance(e, TransportError) or e.exit_code == ExitCode.INTERRUPTED) and res.remote_dir:
                res.hint = (f"the build keeps running on {host.name} in {res.remote_dir}; run the same "
                            "`kpipe build` again to reattach")
        except Exception as e:  # one build's surprise must not abort the matrix (partial failure is data)
            if os.environ.get("KPIPE_DEBUG", "") not in ("", "0"):
                raise
            res.status, res.exit_code = BuildStatus.ERROR, 1
            res.message = f"internal error while building on {host.name}: {type(e).__name__}: {e}"
            res.hint = "rerun with KPIPE_DEBUG=1 and report it"
        self.emit(BuildEvent(key, BuildEventKind.ERROR if res.status == BuildStatus.ERROR else BuildEventKind.FAILED,
                             res.message,
                             {"category": res.category, "hint": res.hint}))
        return res

    def _probe(self, transport: Transport, host: BuildHost, builder: str) -> _Probe:
        with self._probe_lock:
            p = self._probes.get((host.name, builder))
        if p is None:
            p = probe_host(transport, host, builder)
            save_tool_version(self.store, host.name, builder, p.version, p.workdir)
            with self._probe_lock:
                self._probes[(host.name, builder)] = p
        return p

    def _build_on(self, spec: BuildSpec, host: BuildHost, lane: int, res: BuildResult) -> BuildResult:
        from kpipe.builder.base import get_builder

        key = res.key
        builder = get_builder(spec.builder)
        warm = self._warm
        if warm is not None and lane == 0 and warm.host.name == host.name:
            # first: its connection (or the error connecting met) and maybe the probe; then the pool hands out
            # that connected transport (asked for while the warm-up builds it, it would make a second one)
            warm.wait(spec.builder)
        t = self.connections.transport(host, lane)
        self.emit(BuildEvent(key, BuildEventKind.HOST, f"build host {host.name}", {"host": host.name}))
        probe = self._probe(t, host, spec.builder)
        digest = spec.inputs_digest(probe.version)
        self._versions[digest] = probe.version
        res.inputs_digest = digest
        if not self.options.force:
            art = find_by_inputs(self.store, digest)
            if art is not None:  # the host's version changed back, or another kpipe just finished it
                return self._cached(spec, key, art, host)
        name = digest[:16]
        build_dir = f"{probe.workdir}/{name}"
        res.remote_dir = build_dir
        plan = builder.plan(spec, host, build_dir, jobs=self.options.jobs)
        res.module_name = plan.module_name
        prior = build_record(self.store, digest, host.name)
        # attach: take over a running or finished-but-uncollected build; fresh: restart unless running.
        finished = prior is not None and prior["status"] != BuildRecordStatus.RUNNING
        mode = "fresh" if self.options.force or finished else "attach"
        pid, state = self._launch(t, key, host, probe, name, plan, mode)
        res.pid = pid
        res.reattached = state in (LaunchState.RUNNING, LaunchState.DONE)
        now = time.time()
        fields = dict(recipe=spec.recipe, kernel=spec.kernel.release, arch=spec.kernel_entry.arch or spec.kernel.arch,
                      builder=spec.builder, builder_version=probe.version, remote_dir=build_dir, pid=pid,
                      status=BuildRecordStatus.RUNNING, category="", lines=[], hint="", message="")
        if state == LaunchState.STARTED:
            fields.update(started_at=now, finished_at=0, attempts=(prior or {}).get("attempts", 0) + 1)
            self.emit(BuildEvent(key, BuildEventKind.STARTED, f"started on {host.name} in {build_dir} (pid {pid})",
                                 {"host": host.name, "dir": build_dir, "pid": pid}))
        else:
            self.emit(BuildEvent(key, BuildEventKind.REATTACHED,
                                 f"reattached to the {'running' if state == LaunchState.RUNNING else 'finished'} "
                                 f"build on {host.name} in {build_dir} (pid {pid})",
                                 {"host": host.name, "dir": build_dir, "pid": pid}))
        record(self.store, digest, host.name, **fields)
        if self.options.validate:
            _prewarm_validation()
        rc, outputs, followed = self._follow(t, key, builder, plan)
        return self._finish(spec, host, t, plan, probe, digest, rc, outputs, followed, res)

    def _launch(self, t: Transport, key: str, host: BuildHost, probe: _Probe, name: str, plan: BuildPlan,
                mode: str) -> tuple[int, LaunchState]:
        from kpipe.commands import Command

        # The inputs travel as the launch command's stdin (one round trip, not an SFTP upload and a command).
        remote_tar = f"{probe.workdir}/.{name}.{int(time.time() * 1e6)}.{threading.get_ident()}.tar"
        cache_root = f"{probe.workdir}/cache"
        cmd = Command.script(LAUNCH_SCRIPT, probe.workdir, name, remote_tar, mode,
                             cache_root, str(host.slots), "1" if plan.cachedir_log else "0", *plan.argv,
                             label="launch", timeout=120, stdin=_tarball(plan))
        r = t.run(cmd)
        kv = _kv(r.stdout)
        state = kv.get("state", "")
        if r.exit_status != 0 or state not in tuple(LaunchState):
            raise BuildFailed(f"build host {host.name}: cannot start the build in {plan.build_dir}: "
                              f"{(r.stderr or r.stdout).strip()[-300:]}",
                              hint="check free space and permissions of the build host's workdir")
        pid = int(kv["pid"]) if kv.get("pid", "").isdigit() else 0
        if "lost" in kv:
            self.emit(BuildEvent(key, BuildEventKind.RESTARTED,
                                 f"the earlier build (pid {kv['lost']}) died without finishing; started again"))
        return pid, LaunchState(state)

    def _follow(self, t: Transport, key: str, builder: Builder, plan: BuildPlan) -> tuple[int, dict[str, str], str]:
        """Follow the log from offset 0 until the build ends and the log is drained.

        Returns the exit status, where the outputs are (key=value) and the log text as followed.
        """
        from kpipe.commands import Command

        offset = 0
        splitter = _LineSplitter()
        dead_polls = 0
        chunks: list[str] = []
        # How long new output alone may wait before it is answered: 250 ms at first (the first lines show
        # quickly), doubling to the 1 s cap. A long build then costs about one follow request a second (each
        # one a shell on the host, competing with the build for CPU), not four; its end is still seen within
        # 50 ms, whatever the window.
        batch = BATCH_ROUNDS
        while True:
            if self._stop.is_set():
                raise KpipeError(f"stopped following the build in {plan.build_dir}; it keeps running",
                                 exit_code=ExitCode.INTERRUPTED)
            r = t.run(Command.script(FOLLOW_SCRIPT, plan.build_dir, str(offset), str(POLL_ROUNDS), str(CHUNK_BYTES),
                                     plan.module_path, plan.output_dir, str(batch), str(MODULE_INLINE_BYTES),
                                     label="follow", timeout=60))
            batch = min(POLL_ROUNDS, batch * 2)
            head, sep, body = r.stdout.partition("--kpipe-log--\n")
            head_lines = head.splitlines()
            parts = head_lines[0].split() if head_lines else []
            if r.exit_status != 0 or not sep or len(parts) != 4:
                raise BuildFailed(f"the build folder {plan.build_dir} vanished from the build host",
                                  hint="run the build again")
            end, size, status, alive = int(parts[0]), int(parts[1]), parts[2], parts[3] == "1"
            if end > offset:
                chunks.append(body)
                for line in splitter.feed(body):
                    self._line(key, builder, line)
                offset = end
            if status != "-":
                if offset >= size:
                    for line in splitter.flush():
                        self._line(key, builder, line)
                    return int(status), _kv("\n".join(head_lines[1:])), "".join(chunks)
                continue  # the log is complete but longer than one chunk
            if not alive:
                # no exit status and no process: give run.sh's last write a moment, then call it lost
                dead_polls += 1
                if dead_polls >= 3:
                    raise BuildFailed(f"the build process in {plan.build_dir} died without an exit status "
                                      "(killed, or the host rebooted)", hint="run the build again to restart it")
            else:
                dead_polls = 0

    def _line(self, key: str, builder: Builder, line: str) -> None:
        self.emit(BuildEvent(key, BuildEventKind.LINE, line))
        m = builder.milestone(line)
        if m is not None:
            self.emit(BuildEvent(key, BuildEventKind.MILESTONE, m.text, {"step": m.step}))

    def _finish(self, spec: BuildSpec, host: BuildHost, t: Transport, plan: BuildPlan, probe: _Probe, digest: str,
                rc: int, kv: dict[str, str], followed: str, res: BuildResult) -> BuildResult:
        import tempfile

        from kpipe.builder.classify import Classification, classify

        key = res.key
        with tempfile.TemporaryDirectory(prefix="kpipe-fetch-") as tmp:
            log = _lossless(followed, kv.get("logsize", ""))
            if log is None:  # not valid UTF-8 (or incomplete): fetch the bytes themselves
                local_log = Path(tmp) / "log"
                t.get(f"{plan.build_dir}/log", local_log)
                log = local_log.read_bytes()
            if kv.get("cachelog"):
                extra = Path(tmp) / "cachedir-build.log"
                t.get(kv["cachelog"], extra)
                log += b"\n===== $CACHEDIR/build.log (copied after the run) =====\n" + extra.read_bytes()
            log_sha = self.store.put_bytes(log)
            try:
                started, finished = float(kv.get("started") or 0), float(kv.get("finished") or 0)
            except ValueError:
                started = finished = 0.0
            duration = max(0.0, finished - started) if started and finished else 0.0
            res.duration_s = round(duration, 3)
            module_remote = kv.get("module", "")
            if rc == 0 and module_remote:
                local_mod = Path(tmp) / Path(module_remote).name
                data = _module_bytes(kv)
                if data is not None:
                    local_mod.write_bytes(data)  # came with the last follow answer: no download
                else:
                    t.get(module_remote, local_mod)
                art = add_artifact(
                    self.store, local_mod, kernel=spec.kernel.release, status=ArtifactStatus.BUILT, recipe=spec.recipe,
                    arch=spec.kernel_entry.arch or spec.kernel.arch, builder=spec.builder,
                    builder_version=probe.version, inputs_digest=digest, build_host=host.name,
                    duration_s=res.duration_s, log_sha256=log_sha, module_name=local_mod.name[:-3],
                    meta={"remote_dir": plan.build_dir, "slot": kv.get("slot", ""), "argv": list(plan.argv),
                          "rendered": json.loads(json.dumps(spec.rendered, default=str)),
                          "stream": spec.stream, "version": spec.version, "replace": spec.replace},
                )
                record(self.store, digest, host.name, status=BuildRecordStatus.SUCCEEDED, artifact_id=art.id,
                       log_sha256=log_sha, finished_at=time.time())
                res.status, res.artifact_id, res.artifact_status = BuildStatus.BUILT, art.id, art.status
                res.module_name = art.module_name
                self.emit(BuildEvent(key, BuildEventKind.BUILT, f"module {art.filename} -> artifact {art.id}",
                                     {"artifact": art.id, "duration_s": res.duration_s}))
                self._after_build(spec, art, res)
                return res
        text = log.decode("utf-8", "replace")
        c: Classification = classify(text)
        if rc == 0:
            c = Classification("unknown", c.lines, "the builder reported success but no module was found in "
                               f"{plan.output_dir}", "no module produced")
        record(self.store, digest, host.name, status=BuildRecordStatus.FAILED, category=c.category, lines=list(c.lines),
                hint=c.hint, message=c.matched, log_sha256=log_sha, finished_at=time.time())
        res.status, res.category, res.lines = BuildStatus.FAILED, c.category, list(c.lines)
        res.hint = f"{c.hint} (whole log: `kpipe builds --log {digest[:12]}`)"
        res.message = f"{spec.builder} failed ({c.category}) on {host.name}: {c.matched or 'exit status ' + str(rc)}"
        res.exit_code = int(BuildFailed.exit_code)
        self.emit(BuildEvent(key, BuildEventKind.FAILED, res.message, {"category": c.category, "lines": list(c.lines),
                                                         "hint": c.hint, "log_sha256": log_sha}))
        return res

    def _after_build(self, spec: BuildSpec, art: Artifact, res: BuildResult) -> None:
        """Validate (and sign when the recipe asks) through kpipe.validation."""
        if not self.options.validate:
            return
        import sqlite3

        from kpipe import validation

        key = res.key
        try:
            try:
                report = validation.validate_and_record(self.ws, art)
            except sqlite3.IntegrityError:
                # Another kpipe process indexed the same kernel's symbols at the same moment (its
                # check-then-insert lost the race); the index exists now, so validate once more.
                report = validation.validate_and_record(self.ws, art)
            art = get_artifact(self.store, art.id)
            res.artifact_status = art.status
            ok = bool(getattr(report, "ok", art.status == ArtifactStatus.VALID))
            self.emit(BuildEvent(key, BuildEventKind.VALIDATED,
                                 f"validation: {'passed' if ok else 'REJECTED'} ({art.status})", {"ok": ok}))
            if not ok:
                res.status = BuildStatus.REJECTED
                findings = [f"{getattr(f, 'id', '')}: {getattr(f, 'message', f)}"
                            for f in getattr(report, "findings", []) if getattr(f, "severity", "") == "error"]
                res.lines = findings[:12]
                res.message = f"module {art.filename} failed validation"
                res.hint = f"see `kpipe artifacts show {art.id}`"
                res.exit_code = 3
                return
            if (spec.signing or {}).get("sign"):
                signed = validation.sign_artifact(self.ws, art, (spec.signing or {}).get("signer"))
                res.signed_id = signed.id
                self._signed(key, signed.id)
        except KpipeError as e:
            _errored(res, e)
