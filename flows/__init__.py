"""Prefect flows: thin wrappers that call `scanner` and report through Prefect artifacts.

- `scan-model-version` (flows.scan_version): scan one registry version and gate its promotion.
- `registry-watcher` (flows.watcher): poll for pending requests, apply the guard.
- `scan-file` (flows.scan_file): a manual scan of a model file.
"""
