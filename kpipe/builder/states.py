"""The build states as StrEnums (stored in the builds table and printed by --json: values never change)."""

from __future__ import annotations

import enum


class BuildStatus(enum.StrEnum):
    """What happened to one build in a `kpipe build` run (BuildResult.status)."""

    BUILT = "built"
    CACHED = "cached"  # answered from the store, no host contacted
    FAILED = "failed"  # the builder failed (classified)
    REJECTED = "rejected"  # built, but validation refused the module
    ERROR = "error"  # kpipe could not run it (host, configuration, transport)


class BuildRecordStatus(enum.StrEnum):
    """A row of the builds table: a build on a host, possibly still running there."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class LaunchState(enum.StrEnum):
    """What the launch script found in the build folder (its `state=` line)."""

    STARTED = "started"  # a new build started
    RUNNING = "running"  # a build of the same inputs runs: reattach
    DONE = "done"  # it finished but was not collected: collect it


class BuildEventKind(enum.StrEnum):
    """The kind of a BuildEvent (progress for the CLI)."""

    CACHED = "cached"
    HOST = "host"
    STARTED = "started"
    REATTACHED = "reattached"
    RESTARTED = "restarted"
    MILESTONE = "milestone"
    LINE = "line"
    BUILT = "built"
    FAILED = "failed"
    VALIDATED = "validated"
    SIGNED = "signed"
    ERROR = "error"
