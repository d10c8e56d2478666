"""The kill-rate table per core module, printed and written into docs/testing.md."""
from __future__ import annotations

from results import ModuleScore
from workspace import REPO

DOC = REPO / "docs" / "testing.md"
START, END = "<!-- mutation-table:start -->", "<!-- mutation-table:end -->"


def table(scores: list[ModuleScore]) -> str:
    rows = ["| module | mutants | killed | survived | no test reaches it | equivalent | kill rate |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    total = ModuleScore("modules run to the end")
    for s in scores + [total]:
        if s is not total:
            total.killed += s.killed
            total.survived += s.survived
            total.no_tests += s.no_tests
            total.equivalent += s.equivalent
        name = f"**{s.module}**" if s is total else f"`{s.module}`"
        rows.append(f"| {name} | {s.counted + s.equivalent} | {s.killed} | {s.survived} | "
                    f"{s.no_tests} | {s.equivalent} | {100 * s.kill_rate:.1f}% |")
    return "\n".join(rows)


def summary(scores: list[ModuleScore]) -> str:
    return table(scores).replace("`", "").replace("**", "")


def _equivalents(record: dict) -> str:
    lines = []
    for (function, change), entry in sorted(record.items()):
        if entry.get("equivalent"):
            lines.append(f"- `{function}`: `{' / '.join(c.strip() for c in change)}` — {entry['why']}")
    return "\n".join(lines) or "None."


def write_doc(scores: list[ModuleScore], record: dict, not_run: list[str]) -> None:
    """Replace the generated part of docs/testing.md (between the two markers)."""
    text = DOC.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    waiting = ", ".join(f"`{m}`" for m in not_run) or "none"
    generated = (f"{START}\n{table(scores)}\n\nCore modules not yet run to the end: {waiting}.\n\n"
                 f"Equivalent mutants (left out of the rates):\n\n{_equivalents(record)}\n{END}")
    DOC.write_text(head + generated + tail)
