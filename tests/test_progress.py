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


def test_the_bar_follows_each_item_and_leaves_no_line_behind(monkeypatch, capsys):
    """A slow pass redraws the bar as items arrive (tqdm redraws at most every 0.1 s), then clears it:
    nothing of it stays between the log lines."""
    import time

    monkeypatch.setattr(progress, "on_terminal", lambda: True)

    def slow():
        for i in range(3):
            time.sleep(0.15)
            yield i

    assert list(progress.shown(slow(), 3, "reference: train")) == [0, 1, 2]
    drawn = capsys.readouterr().err
    assert "1/3 [" in drawn and "2/3 [" in drawn
    assert "\n" not in drawn and drawn.endswith("\r")  # cleared, not left as a line


def test_a_resumed_bar_starts_at_its_step(capsys):
    with progress.bar(10, "train", initial=4) as b:
        b.refresh()
    assert "4/10 [" in capsys.readouterr().err
