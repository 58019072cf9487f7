"""Connection hygiene at the gateway: idle connections, and a client trickling its headers, are closed after
--keepalive-timeout; connections beyond --max-connections are closed as they arrive; normal requests keep being
answered meanwhile."""

from __future__ import annotations

import socket
import time

import openai

from tests.helpers.procs import start_gateway, start_service, wait_until

KEY = "sk-conn-" + "c" * 24


def idle_sockets(port: int, count: int) -> list[socket.socket]:
    out = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setblocking(False)
        out.append(s)
    return out


def closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_idle_connections_are_closed_and_capped_while_requests_are_answered(tmp_path):
    service = start_service(tmp_path)
    gateway, base = start_gateway(tmp_path, service.target, "--keepalive-timeout", "20", "--max-connections", "2100",
                                  keys=KEY)
    port = int(base.rsplit(":", 1)[1])
    sockets: list[socket.socket] = []
    try:
        opened = time.monotonic()
        # A client that trickles its headers a byte at a time (below, while waiting) never completes a request.
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.setblocking(False)
        sockets = idle_sockets(port, 2000)
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        started = time.monotonic()
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert reply.choices[0].message.content is not None and time.monotonic() - started < 10
        if time.monotonic() - opened < 15:  # held until their idle time is up
            assert not any(closed_by_server(s) for s in sockets[:2000:50])
        over = idle_sockets(port, 150)  # 2,150 open, over the cap of 2,100
        # The server accepts a backlog of connections, then closes those over the cap.
        wait_until(lambda: sum(closed_by_server(s) for s in over) >= 45, 5, 0.1, "connections over the cap closed")
        sockets += over
        sockets.append(slow)
        def trickled_and_all_closed() -> bool:
            try:
                slow.send(b"a")  # one more header byte
            except OSError:
                pass  # closed by the server
            return all(closed_by_server(s) for s in [*sockets[:2000:50], slow])

        wait_until(trickled_and_all_closed, 30, 0.2, "idle and trickling connections closed after --keepalive-timeout")
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert reply.choices
    finally:
        for s in sockets:
            s.close()
        gateway.stop()
        service.proc.stop()
