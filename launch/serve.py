"""The search server: a web page and a JSON API that answer composed queries against a gallery index.

    python launch/serve.py --index indexes/demo                                 # http://127.0.0.1:8000/
    python launch/serve.py --index indexes/demo --bundle bundles/demo --port 8080 --replicas 2
    curl -F image=@reference.jpg -F "text=with a red roof" -F k=10 http://127.0.0.1:8000/search
    curl http://127.0.0.1:8000/healthz

The index comes from `launch/index.py`, the query encoder from the bundle it records (or `--bundle`, written by
`launch/export.py`); an index built from another bundle is refused before anything starts (exit code 2). Without a
cluster this starts a private Ray head on 127.0.0.1 that ends with the command (Ctrl-C). With `cluster.address` or
RAY_ADDRESS set, Serve runs on that cluster and its proxy listens on the head node; the bundle, index and gallery
paths must then be absolute, on storage every node mounts.

Security: the server has no authentication. Keep `--host` on loopback (the default) and reach it through an SSH
tunnel, or put it behind a reverse proxy that authenticates users; never bind 0.0.0.0 on a shared network. On a
cluster, run Ray with token authentication (`RAY_AUTH_MODE=token`) so that its dashboard and jobs API are not open
either. Settings beyond the flags are the config's `serve` section (`serve.max_upload_mb=5`, `serve.top_k=50`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import CONFIG_ERROR_EXIT, ConfigError, parse_config_args  # noqa: E402


def add_arguments(parser) -> None:
    parser.add_argument("--index", required=True, help="a gallery index directory (launch/index.py)")
    parser.add_argument("--bundle", help="the bundle to encode queries with (default: the one the index records)")
    parser.add_argument("--host", help="address to listen on (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default serve.port, 8000)")
    parser.add_argument("--replicas", type=int, help="Serve replicas (default serve.replicas)")


def main(argv: list[str] | None = None) -> int:
    from cluster.serving.deployment import ServeError, run_server

    try:
        args, config = parse_config_args(argv, "ConText-CIR search server", add_arguments, default_config="tiny")
        flags = {key: getattr(args, key) for key in ("host", "port", "replicas") if getattr(args, key) is not None}
        serve_config = dataclasses.replace(config.serve, **flags)
    except (ConfigError, ValueError) as error:  # ValueError: a flag ServeConfig refuses
        print(f"config error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_server(args.bundle, args.index, serve_config, config.cluster, announce=lambda line: print(line, flush=True))
    except ServeError as error:
        print(f"serve error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
