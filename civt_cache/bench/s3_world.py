"""``bench scale --s3``: the unit world's cache in a local S3 server, made by 4 processes that
claim units of it at once (``cache-teachers --claim``), and the start-ups read from the bucket.

The server is moto's (``pip install 'moto[server]'``), run in this process behind a WSGI layer
that counts every request it answers, whichever process sent it: writes (PUT), reads (GET of an
object), existence checks (HEAD), listings (GET of a bucket) and deletes. Counted at the server,
the figures are what a real bucket bills, with no hook in the commands measured.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs

from civt_cache.errors import ConfigError

CLAIMERS = 4
BUCKET = "civt-bench"  # + the server's port: moto's buckets live as long as the process, not the server
KINDS = ("PUT", "GET", "HEAD", "LIST", "DELETE")


class CountingApp:
    """A WSGI layer that counts each request by kind before the app answers it."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app, self.counts, self.lock = app, collections.Counter(), threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/").strip("/")
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if method == "GET" and "/" not in path:  # a bucket's GET is a listing
            kind = "LIST"
        elif method == "POST" and "delete" in query:  # DeleteObjects
            kind = "DELETE"
        else:
            kind = method
        with self.lock:
            self.counts[kind] += 1
        return self.app(environ, start_response)

    def taken(self) -> collections.Counter:
        """The counts so far, and zero from here on."""
        with self.lock:
            counts, self.counts = self.counts, collections.Counter()
        return counts


@contextmanager
def counted_s3() -> Iterator[tuple[dict[str, str], CountingApp, str]]:
    """A moto S3 server on 127.0.0.1, the environment S3 clients read to reach it (for child
    processes), its request counter and a new empty bucket on it."""
    try:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server
    except ImportError:
        raise ConfigError("bench scale --s3 runs a local S3 server: pip install 'moto[server]' s3fs") from None
    class Quiet(MotoRequestHandler):  # type: ignore[misc, valid-type]
        def log_request(self, *args: Any, **kwargs: Any) -> None:  # a line per request otherwise
            pass

    app = CountingApp(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    bucket = f"{BUCKET}-{server.server_address[1]}"
    try:
        bucket_fs(env).mkdir(bucket)
        app.taken()
        yield env, app, bucket
    finally:
        server.shutdown()
        thread.join()


def bucket_fs(env: dict[str, str]) -> Any:
    """An s3fs filesystem on the server of ``env``, named explicitly (this process's own
    environment is left as it is)."""
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False, endpoint_url=env["AWS_ENDPOINT_URL"],
                             key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"])


def per_unit(counts: collections.Counter, units: int) -> str:
    """Requests by kind per unit, e.g. ``PUT 9.0, GET 3.1, ...``."""
    return ", ".join(f"{k} {counts[k] / units:.2f}" for k in KINDS)


def claimed_in_s3(stage_one: list[str], start_ups: dict[str, list[str]], units: int,
                  run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """Stage one by ``CLAIMERS`` processes claiming units of one cache in the counted bucket
    (``stage_one``'s ``--out`` replaced), then each start-up (``start_ups``, where the text
    ``CACHE`` is the bucket's cache). Returns {row: Measured} and the request lines."""
    from civt_cache.bench.scale import _MEASURED, Measured, measured, peak_rss_kib

    rows: dict[str, Any] = {}
    lines = []
    with counted_s3() as (env, app, bucket):
        cache = f"s3://{bucket}/cache"
        def at_cache(cmd: list[str]) -> list[str]:
            return [cache if a == "CACHE" else a for a in cmd]

        args = at_cache(stage_one) + ["--claim"]
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", _MEASURED, *args], cwd=run_dir, env={**os.environ, **env},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(CLAIMERS)]
        said = [p.communicate() for p in procs]
        seconds = time.perf_counter() - t0
        for proc, (_, err) in zip(procs, said):
            if proc.returncode != 0:
                raise RuntimeError(f"bench scale --s3: a claiming cache-teachers failed:\n{err[-3000:]}")
        peaks = [peak_rss_kib(err)[0] for _, err in said]
        made = app.taken()
        rows[f"stage one in S3, {CLAIMERS} processes claiming units"] = Measured(seconds, max(peaks) / 1024, 0.0,
                                                                                "\n".join(e for _, e in said))
        lines.append(f"stage one in S3: {per_unit(made, units)} requests per unit; {made['LIST']:,} listings "
                     f"in all ({sum(made.values()):,} requests for {units:,} units)")
        rows["  S3 objects per unit"] = Measured(len(bucket_fs(env).find(f"{bucket}/cache")) / units, 0.0)
        rows["  S3 requests per unit (stage one)"] = Measured(sum(made.values()) / units, 0.0)
        app.taken()
        for name, cmd in start_ups.items():
            rows[f"{name} (S3)"] = measured(at_cache(cmd), run_dir, env)
            took = app.taken()
            lines.append(f"{name} (S3): {sum(took.values()):,} requests ({', '.join(f'{k} {took[k]}' for k in KINDS)})")
    return rows, lines
