"""Where an evaluation job's result goes: the metrics JSON (`out`) and, for the jobs that
predict per example, the official results file beside it (`<out stem>.results.json` unless
`results_out` names it)."""
from __future__ import annotations

from pathlib import Path

from vlp.pipeline.data.files import write_json_atomic


def write_result(result: dict, out: str | Path | None, predictions: list[dict] | None = None,
                 results_out: str | Path | None = None) -> None:
    """Write `predictions` (recording their file in `result`) and then `result`, each
    atomically; nothing when neither file is asked for."""
    if predictions is not None and (out is not None or results_out is not None):
        results_out = Path(results_out or Path(out).with_suffix(".results.json"))
        write_json_atomic(results_out, predictions)
        result["results_file"] = str(results_out)
    if out is not None:
        write_json_atomic(out, result)
