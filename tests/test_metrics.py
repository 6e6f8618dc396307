"""The logged rows: statistics averaged over micro-batches, processes and the steps of a window,
copied to the host once per row."""

import subprocess
import sys

import pytest
import torch

from dpokit.metrics import GIB, LogWindow, memory_row, peak_memory_bytes, step_means


class TwoProcesses:
    """An accelerator whose other process holds the same pairs and the same token count."""

    device = torch.device("cpu")

    @staticmethod
    def gather(t):
        return torch.cat([t, t])

    @staticmethod
    def reduce(t, op):
        assert op == "sum"
        return 2 * t


def test_logged_statistics_are_means_over_micro_batches_and_processes():
    """One gather for every statistic of a step: each key's mean over all its pairs."""
    micro = [{"loss": torch.tensor([1.0, 2.0]), "rewards/margins": torch.tensor([0.5, -0.5])},
             {"loss": torch.tensor([3.0, 6.0]), "rewards/margins": torch.tensor([1.0, 1.0])}]
    names, means = step_means(micro, TwoProcesses())
    assert dict(zip(names, means.tolist())) == {"loss": 3.0, "rewards/margins": 0.5}


def test_a_window_copies_to_the_host_once_per_row(monkeypatch):
    """Steps add device tensors without reading them; the row reads them all in one copy. A step
    fp16 skipped (grad_norm None) leaves the norm's mean to the other steps; the learning rate is the
    last step's; tokens are summed over steps and processes."""
    reads = []
    for name in ("tolist", "item", "__float__", "cpu"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k: (reads.append(_name), _real(self, *a, **k))[1])

    window = LogWindow()
    steps = [(1.0, torch.tensor(2.0), 1e-3, 10), (3.0, None, 2e-3, 20), (5.0, torch.tensor(4.0), 3e-3, 30)]
    for loss, norm, lr, tokens in steps:
        window.add([{"loss": torch.tensor([loss, loss])}], norm, lr, tokens, TwoProcesses())
    assert reads == []  # nothing waited for the device yet
    window.seconds = 2.0
    row = window.row(TwoProcesses(), pairs_per_step=4)
    # one copy of the steps' values, one of the processes' token counts and memory peaks
    assert reads.count("tolist") == 2 and "item" not in reads and "__float__" not in reads
    assert row.pop("memory/host_peak_gib") > 0
    assert row == {"loss": 3.0, "grad_norm": 3.0, "learning_rate": 3e-3, "tokens": 120, "tokens_per_second": 60.0,
                   "pairs": 12, "pairs_per_second": 6.0, "seconds": 2.0}


def test_memory_peaks_are_the_highest_process_s_in_gib_and_left_out_where_unknown():
    assert memory_row(3 * GIB // 2, -1) == {"memory/device_peak_gib": 1.5}
    assert memory_row(-1, 5 * GIB) == {"memory/host_peak_gib": 5.0}

    class Uneven(TwoProcesses):  # the other process used more device memory and less host memory
        @staticmethod
        def gather(t):
            return torch.cat([t, torch.tensor([[7, 4 * GIB, 1]])])

    window = LogWindow()
    window.add([{"loss": torch.tensor([1.0])}], None, 1e-3, 5, TwoProcesses())
    window.seconds = 1.0
    row = window.row(Uneven(), pairs_per_step=1)
    assert row["tokens"] == 12 and row["memory/device_peak_gib"] == 4.0  # a CPU process knows no device peak: -1
    assert row["memory/host_peak_gib"] == round(peak_memory_bytes(torch.device("cpu"))[1] / GIB, 4)


def test_the_host_peak_counts_memory_the_process_has_written():
    """ru_maxrss in bytes whatever the platform's unit: a fresh process that writes 256 MiB peaks above it."""
    code = ("import torch; from dpokit.metrics import peak_memory_bytes; t = torch.ones(64 * 2**20); "
            "print(peak_memory_bytes(torch.device('cpu'))[1])")
    peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 256 * 2**20 < peak < 4 * 2**30


def test_settling_keeps_the_values_for_the_row():
    """settle() (before an eval or a save) copies the pending steps; steps added after it join them."""
    window = LogWindow()
    window.add([{"loss": torch.tensor([1.0])}], torch.tensor(1.0), 1e-3, 5, TwoProcesses())
    window.settle()
    window.settle()  # nothing left to copy
    window.add([{"loss": torch.tensor([2.0])}], torch.tensor(3.0), 1e-3, 5, TwoProcesses())
    window.seconds = 1.0
    row = window.row(TwoProcesses(), pairs_per_step=1)
    assert row["loss"] == pytest.approx(1.5) and row["grad_norm"] == pytest.approx(2.0) and row["tokens"] == 20


class OneProcess:
    """An accelerator of one process in a run of several: main or not, and its own token count
    summed with nothing (``reduce`` and ``gather`` leave it as it is)."""

    device = torch.device("cpu")

    def __init__(self, main: bool):
        self.is_main_process = main

    @staticmethod
    def reduce(t, op):
        assert op == "sum"
        return t

    @staticmethod
    def gather(t):
        return t


def test_a_restored_window_counts_its_tokens_on_the_main_process_only():
    """A checkpoint keeps the window's tokens summed over the processes: restored, the main process
    holds them and every other process 0, so the row's sum over processes counts them once."""
    saved = {"steps": [[["loss"], [0.5], 1e-3], [["loss"], [1.5], 2e-3]], "tokens": 120, "seconds": 3.0}
    main, other = LogWindow.restored(saved, OneProcess(True)), LogWindow.restored(saved, OneProcess(False))
    assert (main.tokens, other.tokens) == (120, 0)
    assert main.seconds == other.seconds == 3.0 and main.steps == other.steps
    row = main.row(OneProcess(True), pairs_per_step=2)
    assert (row["loss"], row["tokens"], row["learning_rate"], row["tokens_per_second"]) == (1.0, 120, 2e-3, 40.0)
    assert LogWindow.restored(None, OneProcess(True)).tokens == 0


def test_tracker_keys_keep_eval_names_and_put_the_rest_under_train():
    from dpokit.metrics import tracker_key

    assert tracker_key("eval/loss") == "eval/loss"
    assert tracker_key("eval/rewards/margins") == "eval/rewards/margins"
    assert tracker_key("loss") == "train/loss"
    assert tracker_key("rewards/margins") == "train/rewards/margins"


class Recorder:
    """An accelerator that records what its trackers get."""

    def __init__(self, is_main_process: bool = True):
        self.is_main_process, self.logged = is_main_process, []

    def log(self, values, step):
        self.logged.append((step, values))


def test_rows_carried_from_another_run_reach_the_file_and_the_trackers(tmp_path):
    """A run resumed into a new folder starts from the other run's rows up to its checkpoint's step (a
    torn last line dropped); trackers get them with a diverged value back as NaN, as it was logged.
    Only the main process writes; its own folder's resume keeps its rows and logs none again."""
    from dpokit.metrics import MetricsLog

    earlier = tmp_path / "first.jsonl"
    earlier.write_text('{"step": 0, "eval/loss": 0.69}\n{"step": 1, "loss": 0.5}\n{"step": 2, "loss": null}\n'
                       '{"step": 3, "loss": 0.4}\n{"step": 4, "lo')
    path, accelerator = tmp_path / "metrics.jsonl", Recorder()
    log = MetricsLog(path, accelerator, keep_until_step=2, earlier=earlier)
    assert log.carried == 3
    assert path.read_text() == '{"step": 0, "eval/loss": 0.69}\n{"step": 1, "loss": 0.5}\n{"step": 2, "loss": null}\n'
    assert accelerator.logged[:2] == [(0, {"eval/loss": 0.69}), (1, {"train/loss": 0.5})]
    step, values = accelerator.logged[2]
    assert step == 2 and values.keys() == {"train/loss"} and values["train/loss"] != values["train/loss"]  # NaN
    other = Recorder(is_main_process=False)
    MetricsLog(tmp_path / "other.jsonl", other, keep_until_step=2, earlier=earlier)
    assert not (tmp_path / "other.jsonl").exists() and other.logged == []
    own = Recorder()
    assert MetricsLog(path, own, keep_until_step=1).carried == 0
    assert path.read_text() == '{"step": 0, "eval/loss": 0.69}\n{"step": 1, "loss": 0.5}\n' and own.logged == []
