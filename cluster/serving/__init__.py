"""The search server on Ray Serve: `config` (the `serve` section), `http_api` (request checks, the replica's
routes; no ray), `page` (the HTML page), `deployment` (the Serve application and `run_server`)."""
