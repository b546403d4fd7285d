"""Serve the scene oracle: an OpenAI-compatible chat-completions endpoint on 127.0.0.1 that answers the data
generator's prompts for synthetic-benchmark images from their scene descriptions.

    python launch/scene_oracle.py --root data/synthetic --port 8011 --fault-rate 0.1

It is a stand-in for a real vision-language model (vLLM, SGLang, a hosted API), used by the demo and the tests: it
finds each image by the hash of its bytes and answers from the scene it was drawn from, with faults (429s,
malformed JSON, a missing object) at `--fault-rate`. See shards/synthetic/oracle.py.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.cli import ArgumentParser  # noqa: E402
from shards.synthetic.oracle import OracleError, SceneOracle, make_server  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Scene oracle: a VLM stand-in for synthetic images (127.0.0.1 only).")
    parser.add_argument("--root", default="data/synthetic", help="synthetic benchmark root (objects.json, cirr/)")
    parser.add_argument("--port", type=int, default=8011, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--port-file", help="write the port chosen here once listening")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of answers with a fault (0..1)")
    parser.add_argument("--seed", type=int, default=0, help="seeds which answers get faults")
    parser.add_argument("--api-key-env", help="require the API key held by this environment variable")
    args = parser.parse_args(argv)
    if not 0.0 <= args.fault_rate <= 1.0:
        parser.error("--fault-rate must be within [0, 1]")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that variable is not set")
    try:
        oracle = SceneOracle.from_root(args.root, fault_rate=args.fault_rate, seed=args.seed)
    except (OSError, ValueError, OracleError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    server = make_server(oracle, args.port, api_key)
    port = server.server_address[1]
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"scene oracle (a stand-in for a VLM) on http://127.0.0.1:{port}/v1: {len(oracle.scenes)} images", flush=True)
    if args.port_file:
        temporary = Path(args.port_file + ".tmp")
        temporary.write_text(str(port))
        temporary.replace(args.port_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print(f"scene oracle served: {dict(sorted(oracle.counts.items()))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
