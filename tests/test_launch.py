"""How a launched process ends (dpokit.launch): the command line ends it itself once its command has
succeeded, leaving the process group to that exit; called from Python, the commands destroy it.
(The launched runs of test_train, test_fsdp and test_tiny take these paths in real processes.)"""

import pytest

from dpokit import launch
from dpokit.cli import main


class Exited(Exception):
    """Raised by the stand-in for :func:`dpokit.launch.exit_now`."""


@pytest.fixture
def exits(monkeypatch):
    """The calls of :func:`dpokit.launch.exit_now` (each raises :class:`Exited` instead of ending pytest)."""
    calls = []

    def exit_now():
        calls.append(launch.EXITS_WHEN_DONE)
        raise Exited

    monkeypatch.setattr(launch, "exit_now", exit_now)
    monkeypatch.setattr(launch, "EXITS_WHEN_DONE", False)  # restored after the test: main() sets it
    return calls


def plan(workdir, *extra):
    main(["plan", f"model.name_or_path={workdir / 'model'}", "max_length=128", "--json", *extra])


def test_a_launched_process_exits_once_its_command_has_succeeded(workdir, exits, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exited):
        plan(workdir)
    assert exits == [True]
    assert '"total"' in capsys.readouterr().out  # the command's output came first


def test_a_process_on_its_own_returns(workdir, exits, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plan(workdir)
    monkeypatch.setenv("WORLD_SIZE", "1")
    plan(workdir)
    assert exits == [] and not launch.EXITS_WHEN_DONE


def test_a_refused_command_ends_as_usual(workdir, exits, monkeypatch):
    """An error's exit code and message are the usual ones (the launcher then ends the others)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as ended:
        plan(workdir, "max_lenght=3")
    assert ended.value.code == 2 and exits == []


class Recorded:
    """An Accelerator's or Accelerate ``PartialState``'s part in ending: what was called."""

    def __init__(self, calls: list, trackers: int = 0):
        self.calls = calls
        self.trackers = [self] * trackers

    def finish(self):
        self.calls.append("tracker finished")

    def destroy_process_group(self):
        self.calls.append("group destroyed")


@pytest.mark.parametrize("exits_when_done", [False, True])
def test_ending_finishes_the_trackers_and_destroys_the_group_unless_the_process_exits(monkeypatch, exits_when_done):
    monkeypatch.setattr(launch, "EXITS_WHEN_DONE", exits_when_done)
    destroyed = [] if exits_when_done else ["group destroyed"]
    calls = []
    accelerator = Recorded(calls, trackers=2)
    accelerator.state = Recorded(calls)
    launch.end_process_group(accelerator)  # an Accelerator: trackers, and its state's group
    assert calls == ["tracker finished", "tracker finished", *destroyed]
    calls.clear()
    state = Recorded(calls)
    del state.trackers  # PartialState has none
    launch.end_process_group(state)
    assert calls == destroyed
