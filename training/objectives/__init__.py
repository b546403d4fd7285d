"""Training objectives: the network plus its losses, as one module the engine wraps."""
