"""The one client for OpenRLHF's reward-model server (`python -m openrlhf.cli.serve_rm`). Standard library only.

Protocol: POST {"query": [...], "prompts": [...], "labels": [...]} to e.g. http://host:5000/get_reward,
answer {"rewards": [one number per query], ...}. Used by the reference estimator, rehearsal selection and
the remote `reward_func` (`openrlhf_lsc.remote`).

Faults: connection errors, timeouts and HTTP 5xx are retried `retries` times with exponential backoff
(`backoff`, 2 * backoff, 4 * backoff, ... seconds, at most 30 each); HTTP 4xx (the request itself is wrong)
and malformed answers are not retried. Every failure raises `RewardServerError` naming the URL and the
reward model; an answer counts only if it holds one finite JSON number per query (a string such as "1.5",
true/false, null or NaN is refused).
"""

import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, List, Optional, Sequence


class RewardServerError(RuntimeError):
    """A reward server could not be reached or gave an unusable answer (the message names URL and model).

    `transient` is True when the server could not be reached or kept failing (connection errors, timeouts,
    HTTP 5xx, after the retries): trying later may work. False when it answered and refused the request
    (HTTP 4xx) or its answer was unusable.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class ServeRMClient:
    """Score texts on a `serve_rm` endpoint, `batch_size` queries per request.

    Args:
        url: the endpoint, e.g. "http://127.0.0.1:5000/get_reward" (http or https).
        name: the reward model's name for error messages (default: the URL's host:port).
        batch_size: queries per request (>= 1).
        timeout: seconds to wait for each answer (> 0).
        retries: extra attempts after a connection error, timeout or 5xx (>= 0).
        backoff: seconds before the first retry, doubled for each further one (>= 0, capped at 30).

    Bad arguments raise ValueError naming the argument.

    Example:
        >>> import json, threading
        >>> from http.server import BaseHTTPRequestHandler, HTTPServer
        >>> class Handler(BaseHTTPRequestHandler):  # a toy server: reward = query length
        ...     def do_POST(self):
        ...         queries = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["query"]
        ...         body = json.dumps({"rewards": [float(len(q)) for q in queries]}).encode()
        ...         self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        ...         self.wfile.write(body)
        ...     def log_message(self, *args): pass
        >>> server = HTTPServer(("127.0.0.1", 0), Handler)
        >>> threading.Thread(target=server.serve_forever, daemon=True).start()
        >>> client = ServeRMClient(f"http://127.0.0.1:{server.server_port}/get_reward", name="length", batch_size=2)
        >>> client.score(["a", "bb", "ccc"])
        [1.0, 2.0, 3.0]
        >>> server.shutdown()
    """

    def __init__(
        self,
        url: str,
        name: Optional[str] = None,
        batch_size: int = 64,
        timeout: float = 300.0,
        retries: int = 4,
        backoff: float = 1.0,
    ):
        parsed = urllib.parse.urlparse(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"reward server URL {url!r}: expected http(s)://host[:port]/path")
        try:
            parsed.port  # noqa: B018 -- raises ValueError on a port that is not a number
        except ValueError:
            raise ValueError(f"reward server URL {url!r}: the port is not a number") from None
        for arg, value, low, integer in (("batch_size", batch_size, 1, True), ("timeout", timeout, None, False),
                                         ("retries", retries, 0, True), ("backoff", backoff, 0, False)):
            ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
            ok = ok and math.isfinite(value) and (value > 0 if low is None else value >= low)
            if not ok:
                need = "an integer" if integer else "a finite number"
                raise ValueError(f"reward server {url}: {arg} must be {need} {'> 0' if low is None else f'>= {low}'}, "
                                 f"got {value!r}")
        self.url, self.name = url, name or parsed.netloc
        self.batch_size, self.timeout, self.retries, self.backoff = batch_size, float(timeout), retries, float(backoff)

    def _fail(self, what: str, transient: bool = False) -> RewardServerError:
        return RewardServerError(f"reward model {self.name!r} at {self.url}: {what}", transient)

    def _post(self, payload: dict) -> Any:
        data = json.dumps(payload).encode()
        attempts = self.retries + 1
        for attempt in range(attempts):
            request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
                break
            except urllib.error.HTTPError as e:
                if e.code < 500:  # the request itself is wrong: retrying will not help
                    detail = e.read()[:200].decode(errors="replace")
                    raise self._fail(f"HTTP {e.code} {e.reason} (not retried){': ' + detail if detail else ''}") from None
                last = f"HTTP {e.code} {e.reason}"
            except (TimeoutError, socket.timeout):
                last = f"no answer within {self.timeout:g} s (timeout)"
            except urllib.error.URLError as e:
                reason = e.reason
                timed_out = isinstance(reason, (TimeoutError, socket.timeout))
                last = f"no answer within {self.timeout:g} s (timeout)" if timed_out else f"cannot connect ({reason})"
            except OSError as e:  # connection reset, server closed the connection mid-answer, ...
                last = f"connection failed ({type(e).__name__}: {e})"
            if attempt + 1 < attempts:
                time.sleep(min(self.backoff * 2**attempt, 30.0))
        else:
            raise self._fail(f"{last}, {attempts} attempt(s)", transient=True) from None
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise self._fail(f"the answer is not JSON: {body[:200]!r}") from None

    def score(
        self, queries: Sequence[str], prompts: Optional[Sequence[str]] = None, labels: Optional[Sequence[Any]] = None
    ) -> List[float]:
        """One reward per query.

        Args:
            queries: full texts (prompt + response) as the reward model should read them.
            prompts: the prompt part of each query, sent along for servers that use it (default "").
            labels: per-query labels sent along (default "").

        Returns:
            list of len(queries) finite floats.

        Raises:
            RewardServerError: the server failed after the retries, refused the request, or answered
                something other than {"rewards": [one finite number per query]}.
        """
        queries = list(queries)
        prompts = [""] * len(queries) if prompts is None else list(prompts)
        labels = [""] * len(queries) if labels is None else list(labels)
        if len(prompts) != len(queries) or len(labels) != len(queries):
            raise ValueError(f"{len(queries)} queries need as many prompts and labels, got {len(prompts)} and {len(labels)}")
        scores: List[float] = []
        for b in range(0, len(queries), self.batch_size):
            n = len(queries[b : b + self.batch_size])
            answer = self._post({"query": queries[b : b + n], "prompts": prompts[b : b + n], "labels": labels[b : b + n]})
            rewards = answer.get("rewards") if isinstance(answer, dict) else None
            if not isinstance(rewards, list) or len(rewards) != n:
                raise self._fail(f"expected {{\"rewards\": [{n} numbers]}}, got {json.dumps(answer)[:200]}")
            for j, r in enumerate(rewards):
                if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                    raise self._fail(f"reward {j} of the batch (query {b + j}) is {r!r}, expected a finite number")
            scores += [float(r) for r in rewards]
        return scores
