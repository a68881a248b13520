"""--bench on a pretend CUDA and a pretend MPS device: every method's step, the memory meter's
CUDA branch and the memory runs, with tests/pretend_device.py's PretendDevice failing any op that
mixes device and CPU tensors (the core's tests run the pipeline's stages on it)."""

import pytest

from experiments import bench, common, compare
from experiments.__main__ import main
from experiments.tests.helpers import tiny_reference

pretend_device = pytest.importorskip(
    "tests.pretend_device", reason="the core's tests/pretend_device.py (PretendDevice) is needed"
)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_bench_runs_on_a_pretend_device(device, tiny_run, tmp_path, monkeypatch):
    _, argv = tiny_run
    tiny_reference(tiny_run, tmp_path)  # its cache is rebuilt at the device's precision
    argv = argv + ["--out_dir", str(tmp_path), "--device", device, "--bench", "--bench_steps", "2"]
    # the memory runs stay in this process: a child process would escape the pretend device
    monkeypatch.setattr(common, "in_child_process", lambda function, *args: function(*args))
    # FPO and the methods of its ratios: the losses of every method run on the pretend device in
    # the core's tests (tests/test_device.py); what is bench's own is the same for each
    rows = {label: compare.COMPARE_ROWS[label] for label in ("FPO", "SimPO", "DPO", "TDPO-2")}
    monkeypatch.setattr(compare, "COMPARE_ROWS", rows)
    monkeypatch.setattr(bench, "COMPARE_ROWS", rows)
    with pretend_device.pretend(device, monkeypatch):
        main(argv)
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.md").exists()
