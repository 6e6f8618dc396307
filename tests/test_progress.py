"""Progress: a bar on a terminal for long no-grad passes, nothing drawn into a log file."""

from dpokit import progress


def test_a_pass_shows_a_bar_on_a_terminal_only(monkeypatch, capsys):
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    assert list(progress.shown(iter([1, 2, 3]), 3, "reference: train")) == [1, 2, 3]
    drawn = capsys.readouterr().err
    assert "reference: train" in drawn and "/3 [" in drawn  # a bar over the 3 batches, cleared at the end
    assert list(progress.shown(iter([1, 2]), 2, None)) == [1, 2]  # no label: no bar
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    assert list(progress.shown(iter([1, 2]), 2, "eval")) == [1, 2]
    assert capsys.readouterr().err == ""
