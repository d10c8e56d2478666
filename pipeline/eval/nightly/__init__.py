"""The nightly job: benchmark suite (suite), evaluation of new checkpoints (runner), report (report)."""
