"""The Ray driver side: preflight checks, `train`, `sweep`, `analyze`, and the callbacks that write MLflow."""
