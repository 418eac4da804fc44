"""One module per `m2s bench` benchmark; each exposes `run(quick: bool) -> dict`."""
