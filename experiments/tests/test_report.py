"""experiments/report.py: standard library only, and its charts parse with one series per
label."""

import ast
import json
import sys
from xml.etree import ElementTree

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


def test_svg_chart_parses_with_one_series_per_label():
    series = {"FPO": [(0.5, 0.6), (2.0, 0.7)], "DPO": [(10.0, 0.3)], "SimPO & co": []}
    for lines, log_x in ((True, False), (False, True)):
        svg = report.svg_chart("t", "x", "y", series, lines=lines, log_x=log_x)
        root = ElementTree.fromstring(svg)
        groups = root.findall("{http://www.w3.org/2000/svg}g[@class='series']")
        assert [g.get("data-label") for g in groups] == list(series)
        assert [len(g.findall("{http://www.w3.org/2000/svg}circle")) for g in groups] == [2, 1, 0]


def test_training_chart_has_one_panel_per_logged_quantity(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [
        {"step": step, "loss": 0.7 - 0.1 * step, "margin": 0.2 * step, "accuracy": 0.5,
         "feature_mse": 0.001 * step, "ms_per_step": 30.0}
        for step in range(4)
    ]
    log.write_text("".join(json.dumps(record) + "\n" for record in records))
    root = ElementTree.fromstring(report.training_chart(log, "t"))
    series = root.findall(".//{http://www.w3.org/2000/svg}g[@class='series']")
    assert [g.get("data-label") for g in series] == ["loss", "margin", "accuracy", "feature_mse"]
    assert all(len(g.findall("{http://www.w3.org/2000/svg}circle")) == 4 for g in series)
