"""The per-worker training job: build, resume, loop, close."""
