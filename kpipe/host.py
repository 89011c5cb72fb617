"""The one record of a host kpipe connects to: the inventory produces it, the SSH transport takes it.

Plain data with no imports of its own, so that the inventory (fleet/), the transports, the lab,
the builder and the rollout all share it without an import edge between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Host:
    """One host: where and as whom to connect, plus its inventory groups and variables.

    `user` "" leaves the choice to ssh_config (then the local user); the inventory always sets one
    (Ansible's default: root). `groups` and `vars` are the inventory's data and take no part in
    equality: two records of the same connection compare equal (the SSH pool reuses a connection
    on equality).
    """

    name: str
    address: str
    port: int = 22
    user: str = ""
    identity_file: str = ""
    become: bool = False  # run sudo-flagged commands through sudo (non-root users)
    known_hosts: str = ""  # an extra known_hosts file for this host (kpipe_known_hosts, the lab's)
    connect_timeout: float | None = None  # None: [ssh] connect_timeout
    groups: tuple[str, ...] = field(default=(), compare=False)
    vars: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json and the inventory selection cache."""
        return {
            "name": self.name, "address": self.address, "port": self.port, "user": self.user,
            "identity_file": self.identity_file, "become": self.become, "known_hosts": self.known_hosts,
            "groups": list(self.groups), "vars": self.vars,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Host:
        """The inverse of to_dict (KeyError/TypeError/ValueError on a damaged document)."""
        return cls(name=str(d["name"]), address=str(d["address"]), port=int(d["port"]), user=str(d["user"]),
                   identity_file=str(d["identity_file"]), become=bool(d["become"]),
                   known_hosts=str(d["known_hosts"]), groups=tuple(d["groups"]), vars=dict(d["vars"]))
