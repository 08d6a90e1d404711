"""The small core that both `harness` and `backends` import, and that imports neither: the request and event types
a backend streams, its spec, errors, process-group launching, GPU probing and file helpers."""
