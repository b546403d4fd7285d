"""`ray start` for a node that joins a head on 127.0.0.1 of the same machine (a test-only entry point).

Ray 2.60 offers no flag for this. With `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (our loopback setting) `ray start`
refuses to join a head; with it at 1 it rewrites `127.0.0.1` in `--address` and `--node-ip-address` to the
machine's outward address, so the node would listen beyond loopback. This runs Ray's own CLI with the join
allowed and loopback kept as given; the processes it starts inherit the environment's 0 and stay on 127.0.0.1.

    python tests/support/ray_node_cli.py start --block --address=127.0.0.1:PORT --node-ip-address=127.0.0.1 ...
"""

from __future__ import annotations

import sys

from ray._private import ray_constants, services

ray_constants.ENABLE_RAY_CLUSTER = True  # only this process: its check before joining
services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 instead of the outward address

from ray.scripts.scripts import main  # noqa: E402

if __name__ == "__main__":
    sys.argv = ["ray", *sys.argv[1:]]
    sys.exit(main())
