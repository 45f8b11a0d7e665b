"""A TCP proxy a test can cut, to put a real network fault between the service and a real
PostgreSQL or Redis.

    with FaultyLink(("127.0.0.1", 6379)) as link:
        url = f"redis://127.0.0.1:{link.port}/0"
        ...
        link.cut("blackhole")   # packets vanish: calls hang until their timeouts
        link.cut("reset")       # connections are closed and new ones refused at once
        link.cut("deaf")        # requests reach the server, its replies are lost
        link.cut("deaf", after=b"EVALSHA")  # the same from the first request holding those bytes on
        link.heal()
"""

from __future__ import annotations

import select
import socket
import threading


class FaultyLink:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._mode = "up"  # up, blackhole, deaf or reset
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        self._deaf_after: bytes | None = None  # deaf only once a request held these bytes
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self, mode: str = "reset", after: bytes | None = None) -> None:
        if mode not in ("blackhole", "deaf", "reset"):
            raise ValueError(f"mode must be blackhole, deaf or reset, got {mode!r}")
        if after is not None and mode != "deaf":
            raise ValueError("only a deaf cut can wait for a request (after=...)")
        with self._lock:
            self._deaf_after = after
            self._mode = mode if after is None else "up"
            pairs = list(self._pairs) if mode == "reset" else []
            if mode == "reset":
                self._pairs.clear()
        for pair in pairs:
            _close(*pair)

    def heal(self) -> None:
        with self._lock:
            self._mode, self._deaf_after = "up", None

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            _close(*pair)

    def __enter__(self) -> FaultyLink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self._mode
            if mode == "reset":
                _close(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peers = {client: server, server: client}
        try:
            while True:
                readable, _, _ = select.select(list(peers), [], [], 0.2)
                with self._lock:
                    mode, alive = self._mode, (client, server) in self._pairs
                if not alive:
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client and self._deaf_after is not None and self._deaf_after in data:
                        with self._lock:  # the request goes through; from its answer on, nothing comes back
                            self._mode, self._deaf_after, mode = "deaf", None, "deaf"
                    if mode == "up" or (mode == "deaf" and sock is client):
                        peers[sock].sendall(data)
                    # blackhole: read and drop both ways, so nothing ever arrives; deaf: the
                    # server does what it is asked and its answers are dropped
        except (OSError, ValueError):  # a socket closed by cut() or close() under select()
            return
        finally:
            with self._lock:
                if (client, server) in self._pairs:
                    self._pairs.remove((client, server))
            _close(client, server)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
