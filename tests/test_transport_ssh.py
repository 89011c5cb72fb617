"""The SSH transport against real OpenSSH servers on loopback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kpipe.commands import Command
from kpipe.errors import CommandTimeout, TransportError
from kpipe.host import Host
from kpipe.transport.local import LocalTransport
from kpipe.transport.ssh import SshPool
from kpipe.workspace import SshSettings


def test_runs_argv_and_quotes_hostile_values_once(sshd):
    hostile = "a b; touch /tmp/kpipe-pwned-$$ `id` $(id) 'q' \"d\" \n|&>"
    with SshPool(known_hosts=[sshd.known_hosts]) as pool:
        r = pool.transport(sshd.target("h")).run(Command.of("printf", "%s", hostile))
    assert r.ok and r.stdout == hostile
    assert not list(Path("/tmp").glob("kpipe-pwned-*"))


def test_script_gets_user_values_as_positional_parameters(sshd):
    with SshPool(known_hosts=[sshd.known_hosts]) as pool:
        t = pool.transport(sshd.target("h"))
        r = t.run(Command.script('printf "%s|%s" "$1" "$2"', "x; id", "$(id)"))
    assert r.stdout == "x; id|$(id)"


def test_nonzero_exit_is_a_result_not_an_exception(sshd):
    with SshPool(known_hosts=[sshd.known_hosts]) as pool:
        r = pool.transport(sshd.target("h")).run(Command.script("echo oops >&2; exit 3"))
    assert r.exit_status == 3 and r.stderr.strip() == "oops"


def test_unknown_host_key_is_refused_by_default(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with SshPool(known_hosts=[empty]) as pool:
        target = Host("h", sshd.address, sshd.port, "root", str(sshd.client_key))
        with pytest.raises(TransportError) as e:
            pool.transport(target).run(Command.of("true"))
    assert e.value.kind == "hostkey" and "not in known_hosts" in str(e.value)


def test_changed_host_key_is_refused(sshd, tmp_path, sshd_factory):
    other = sshd_factory()
    wrong = tmp_path / "known_hosts"
    # the other server's key, written under this server's name
    wrong.write_text(other.known_hosts.read_text().replace(f"]:{other.port} ", f"]:{sshd.port} "))
    with SshPool(known_hosts=[wrong]) as pool:
        target = Host("h", sshd.address, sshd.port, "root", str(sshd.client_key))
        with pytest.raises(TransportError) as e:
            pool.transport(target).run(Command.of("true"))
    assert e.value.kind == "hostkey" and "MISMATCH" in str(e.value)


def test_accept_new_records_the_key_once(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    with SshPool(SshSettings(accept_new_host_keys=True), known_hosts=[kh]) as pool:
        target = Host("h", sshd.address, sshd.port, "root", str(sshd.client_key))
        assert pool.transport(target).run(Command.of("true")).ok
    assert kh.read_text().startswith(f"[{sshd.address}]:{sshd.port} ssh-ed25519 ")
    with SshPool(known_hosts=[kh]) as pool:  # now strict, and it passes
        target = Host("h", sshd.address, sshd.port, "root", str(sshd.client_key))
        assert pool.transport(target).run(Command.of("true")).ok


def test_connection_refused_names_the_host(tmp_path):
    from sshd import free_port

    with SshPool(known_hosts=[tmp_path / "kh"]) as pool, pytest.raises(TransportError) as e:
        pool.transport(Host("dead", "127.0.0.1", free_port())).run(Command.of("true"))
    assert e.value.kind == "refused" and e.value.host == "dead"


def test_command_timeout(sshd):
    with SshPool(known_hosts=[sshd.known_hosts]) as pool:
        t = pool.transport(sshd.target("h"))
        start = time.monotonic()
        with pytest.raises(CommandTimeout):
            t.run(Command.of("sleep", "30", timeout=1))
        assert time.monotonic() - start < 10
        assert t.run(Command.of("true")).ok  # the transport reconnects after a timeout


def test_connection_is_reused_across_commands(sshd):
    with SshPool(known_hosts=[sshd.known_hosts]) as pool:
        t = pool.transport(sshd.target("h"))
        t.run(Command.of("true"))
        sessions = sshd.session_pids()
        for _ in range(5):
            t.run(Command.of("true"))
        assert sshd.session_pids() == sessions and len(sessions) == 1


def test_connection_dropped_mid_command_is_a_transport_error_then_reconnects(sshd):
    import threading

    with SshPool(known_hosts=[sshd.known_hosts]) as pool:
        t = pool.transport(sshd.target("h"))
        t.run(Command.of("true"))
        threading.Timer(0.5, sshd.kill_sessions).start()
        with pytest.raises(TransportError) as e:
            t.run(Command.of("sleep", "20"))
        assert e.value.kind == "disconnected"
        assert t.run(Command.of("echo", "back")).stdout == "back\n"


def test_dead_idle_connection_is_reopened_before_the_next_command(sshd):
    with SshPool(known_hosts=[sshd.known_hosts]) as pool:
        t = pool.transport(sshd.target("h"))
        t.run(Command.of("true"))
        sshd.kill_sessions()
        time.sleep(1.0)
        assert t.run(Command.of("echo", "back")).stdout == "back\n"


def test_put_and_get(sshd, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 100)
    with SshPool(known_hosts=[sshd.known_hosts]) as pool:
        t = pool.transport(sshd.target("h"))
        t.put(src, str(tmp_path / "remote.bin"))
        t.get(str(tmp_path / "remote.bin"), tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_run_many_collects_partial_failure(sshd_factory, tmp_path):
    from sshd import free_port

    servers = [sshd_factory() for _ in range(3)]
    kh = tmp_path / "kh"
    kh.write_text("".join(s.known_hosts.read_text() for s in servers))
    targets = [Host(f"h{i}", s.address, s.port, "root", str(s.client_key)) for i, s in enumerate(servers)]
    targets.append(Host("dead", "127.0.0.1", free_port(), "root", str(servers[0].client_key)))
    with SshPool(known_hosts=[kh], forks=2) as pool:
        results = pool.run_many(targets, lambda t: t.run(Command.of("echo", t.name)).stdout.strip())
    assert [results[f"h{i}"] for i in range(3)] == ["h0", "h1", "h2"]
    assert isinstance(results["dead"], TransportError)


def test_local_transport_runs_without_a_shell(tmp_path):
    r = LocalTransport().run(Command.of("printf", "%s", "$(id); x"))
    assert r.stdout == "$(id); x"


def test_threads_asking_for_one_host_share_one_connection(sshd):
    """A host asked for by several threads at once gets one transport, so one connection: the
    pool looks up and builds under one lock (it once built outside it, and two threads could
    each open a connection to the same host)."""
    import threading

    target = Host("h", sshd.address, sshd.port, "root", str(sshd.client_key))
    with SshPool(known_hosts=[sshd.known_hosts]) as pool:
        start = threading.Barrier(8)
        got: list[object] = []

        def ask() -> None:
            start.wait()
            t = pool.transport(target)
            t.run(Command.of("true"))
            got.append(t)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert len(got) == 8 and len({id(t) for t in got}) == 1


def test_connections_prefer_aes_gcm_and_fall_back_without_it(sshd, sshd_factory):
    """kpipe asks for AES-GCM first (its packets are authenticated in C, not by paramiko's Python
    HMAC compare); a server that does not offer it still gets a working connection, over CTR."""
    with SshPool(known_hosts=[sshd.known_hosts]) as pool:
        t = pool.transport(Host("h", sshd.address, sshd.port, "root", str(sshd.client_key)))
        assert t.run(Command.of("echo", "ok")).stdout == "ok\n"
        transport = t.conn.client.get_transport()
        assert (transport.local_cipher, transport.remote_cipher) == ("aes128-gcm@openssh.com",) * 2
    old = sshd_factory(extra_config="Ciphers aes128-ctr,aes256-ctr")
    with SshPool(known_hosts=[old.known_hosts]) as pool:
        t = pool.transport(Host("old", old.address, old.port, "root", str(old.client_key)))
        assert t.run(Command.of("echo", "ok")).stdout == "ok\n"
        assert t.conn.client.get_transport().remote_cipher == "aes128-ctr"
