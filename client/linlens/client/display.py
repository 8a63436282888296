"""Results display as reports in Jupyter, without the results or the client importing the reports.

The results are plain data (``linlens.contract.results`` imports nothing of ``linlens.report``). In a running IPython
session, importing ``linlens.client`` registers, by type name, an HTML formatter for the three result types with
IPython's own extension point (``for_type_by_name``); it imports ``linlens.report`` only when a result is shown, so
importing the client stays light. Outside IPython nothing happens (IPython is never imported here).
"""

from __future__ import annotations

import sys
from typing import Any

#: The result types a report draws (``linlens.report.content.Reportable``), by module and name.
RESULT_TYPES = (
    ("linlens.contract.results", "ExplainResult"),
    ("linlens.contract.results", "Explanation"),
    ("linlens.contract.results", "Generation"),
)


def report_fragment(result: Any) -> str:
    """The result's report as an HTML fragment with its style scoped to it (what Jupyter shows)."""
    from linlens.report import fragment

    return fragment(result)


def show_results_in_jupyter() -> bool:
    """Register ``report_fragment`` as IPython's HTML display of the result types; False outside IPython."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if get_ipython is not None else None
    if shell is None:
        return False
    formatter = shell.display_formatter.formatters["text/html"]
    for module, name in RESULT_TYPES:
        formatter.for_type_by_name(module, name, report_fragment)
    return True
