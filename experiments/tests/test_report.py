"""experiments/report.py: standard library only, and its tables print what they are given."""

import ast
import sys

from experiments import report
from experiments.tests.helpers import PACKAGE


def test_report_imports_only_the_standard_library():
    tree = ast.parse((PACKAGE / "report.py").read_text())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported and imported <= set(sys.stdlib_module_names), imported


def test_interval_table_prints_each_cell_in_its_column_s_format():
    rows = {
        "FPO": {"targets": "positive", "change": (0.26, 0.214, 0.305),
                "size": (1234.5, 1000, 1500)},
        "DPO": {"targets": "-", "change": None, "size": (6.4e-05, 6e-05, 7e-05)},
    }
    table = report.interval_table("method", rows, {"targets": "", "change": "+.3f",
                                                   "size": ".2g"}, "A note.")
    assert table.splitlines() == [
        "| method | targets | change | size |",
        "|---|---|---|---|",
        "| FPO | positive | +0.260 [+0.214, +0.305] | 1.2e+03 [1e+03, 1.5e+03] |",
        "| DPO | - | - | 6.4e-05 [6e-05, 7e-05] |",
        "",
        "A note.",
    ]
