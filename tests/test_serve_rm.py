"""The serve_rm client against loopback HTTP servers (127.0.0.1) that fail in planned ways."""

import doctest
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from openrlhf_lsc import serve_rm
from openrlhf_lsc.serve_rm import RewardServerError, ServeRMClient


def start(respond):
    """A server calling `respond(payload, n)` for the n-th request (from 1): returns (status, body object or
    bytes) or None to hang up without answering. Records every payload."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(payload)
            answer = respond(payload, len(seen))
            if answer is None:
                self.close_connection = True
                return
            status, body = answer
            body = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_port}/get_reward", seen=seen, httpd=httpd)


@pytest.fixture
def server():
    servers = []

    def make(respond):
        servers.append(start(respond))
        return servers[-1]

    yield make
    for s in servers:
        s.httpd.shutdown()
        s.httpd.server_close()


def lengths(payload):
    return {"rewards": [float(len(q)) for q in payload["query"]]}


def test_docstring_example_runs():
    assert doctest.testmod(serve_rm, raise_on_error=False).failed == 0


def test_batches_and_payload(server):
    s = server(lambda p, n: (200, lengths(p)))
    client = ServeRMClient(s.url, name="len", batch_size=2)
    assert client.score(["a", "bb", "ccc"], prompts=["p1", "p2", "p3"], labels=["x", "y", "z"]) == [1.0, 2.0, 3.0]
    assert s.seen == [{"query": ["a", "bb"], "prompts": ["p1", "p2"], "labels": ["x", "y"]},
                      {"query": ["ccc"], "prompts": ["p3"], "labels": ["z"]}]
    assert client.score([]) == [] and len(s.seen) == 2
    ints = server(lambda p, n: (200, {"rewards": [3] * len(p["query"])}))  # JSON integers are numbers too
    assert ServeRMClient(ints.url).score(["ab", "c"]) == [3.0, 3.0]


def test_503_once_then_success(server):
    s = server(lambda p, n: (503, {"detail": "busy"}) if n == 1 else (200, lengths(p)))
    assert ServeRMClient(s.url, retries=2, backoff=0.01).score(["abc"]) == [3.0]
    assert len(s.seen) == 2


def test_always_500_fails_after_bounded_retries_naming_url_and_model(server):
    s = server(lambda p, n: (500, {"detail": "boom"}))
    client = ServeRMClient(s.url, name="helpful", retries=3, backoff=0.05)
    start_time = time.monotonic()
    with pytest.raises(RewardServerError) as e:
        client.score(["abc"])
    elapsed = time.monotonic() - start_time
    assert len(s.seen) == 4  # one attempt + 3 retries
    # Backoff 0.05 + 0.1 + 0.2 = 0.35 s of sleeping; the stated bound for this test is 5 s.
    assert 0.35 <= elapsed < 5.0
    assert s.url in str(e.value) and "'helpful'" in str(e.value) and "HTTP 500" in str(e.value)
    assert "4 attempt(s)" in str(e.value) and e.value.transient


def test_4xx_is_not_retried(server):
    s = server(lambda p, n: (422, {"detail": "field required"}))
    with pytest.raises(RewardServerError, match=r"HTTP 422 .*not retried.*field required") as e:
        ServeRMClient(s.url, name="rm", retries=5, backoff=0.01).score(["a"])
    assert len(s.seen) == 1 and s.url in str(e.value) and not e.value.transient


def test_hanging_server_times_out(server):
    release = threading.Event()
    s = server(lambda p, n: release.wait(10) and None)
    client = ServeRMClient(s.url, name="slow", timeout=0.3, retries=1, backoff=0.0)
    start_time = time.monotonic()
    with pytest.raises(RewardServerError, match=r"no answer within 0.3 s \(timeout\), 2 attempt") as e:
        client.score(["a"])
    release.set()
    assert time.monotonic() - start_time < 5.0 and s.url in str(e.value) and "'slow'" in str(e.value)


def test_connection_refused_names_the_url():
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    url = f"http://127.0.0.1:{port}/get_reward"
    with pytest.raises(RewardServerError, match="cannot connect") as e:
        ServeRMClient(url, name="gone", retries=1, backoff=0.0).score(["a"])
    assert url in str(e.value) and "'gone'" in str(e.value)


def test_server_dropping_the_connection_is_retried(server):
    s = server(lambda p, n: None if n == 1 else (200, lengths(p)))
    assert ServeRMClient(s.url, retries=1, backoff=0.0).score(["ab"]) == [2.0]
    assert len(s.seen) == 2


@pytest.mark.parametrize(
    "body, match",
    [
        ({"rewards": ["1.5"]}, "is '1.5', expected a finite number"),
        ({"rewards": [True]}, "is True, expected a finite number"),
        ({"rewards": [None]}, "is None, expected a finite number"),
        ({"rewards": [[1.0]]}, r"is \[1.0\], expected a finite number"),
        (b'{"rewards": [NaN]}', "is nan, expected a finite number"),
        (b'{"rewards": [Infinity]}', "is inf, expected a finite number"),
        ({"rewards": []}, r'expected \{"rewards": \[1 numbers\]\}'),
        ({"rewards": [1.0, 2.0]}, r'expected \{"rewards": \[1 numbers\]\}'),
        ({"scores": [1.0]}, r'expected \{"rewards"'),
        ([1.0], r'expected \{"rewards"'),
        (b"<html>oops</html>", "not JSON"),
    ],
)
def test_unusable_answers_are_refused_without_retry(server, body, match):
    s = server(lambda p, n: (200, body))
    with pytest.raises(RewardServerError, match=match) as e:
        ServeRMClient(s.url, name="rm", retries=3, backoff=0.01).score(["q"])
    assert s.url in str(e.value) and len(s.seen) == 1 and not e.value.transient


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(url="localhost:5000/get_reward"), "expected http"),
        (dict(url="ftp://host/x"), "expected http"),
        (dict(url="http://host:port/x"), "port is not a number"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(timeout=float("nan")), "timeout must be a finite number > 0"),
        (dict(timeout=0), "timeout must be a finite number > 0"),
        (dict(retries=-1), "retries must be an integer >= 0"),
        (dict(backoff=float("inf")), "backoff must be a finite number >= 0"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    kwargs = {"url": "http://127.0.0.1:1/get_reward", **kwargs}
    with pytest.raises(ValueError, match=match):
        ServeRMClient(**kwargs)
