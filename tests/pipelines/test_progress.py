import io

from pipelines.progress import progress, progress_enabled


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_lines_on_a_terminal_only(monkeypatch):
    monkeypatch.delenv("ADBRAY_PROGRESS", raising=False)
    quiet = io.StringIO()
    assert list(progress(range(5), "collect", stream=quiet)) == [0, 1, 2, 3, 4] and quiet.getvalue() == ""
    tty = Tty()
    assert list(progress(iter(range(7)), "collect", total=7, unit="episodes", every_s=0.0, stream=tty)) == list(range(7))
    lines = tty.getvalue().splitlines()
    assert len(lines) == 8 and lines[-1].startswith("[collect] 7/7 episodes (") and lines[0].startswith("[collect] 1/7")
    monkeypatch.setenv("ADBRAY_PROGRESS", "0")
    assert not progress_enabled(Tty())
    monkeypatch.setenv("ADBRAY_PROGRESS", "1")
    assert progress_enabled(io.StringIO())


def test_event_driven_progress_updates_and_finishes(monkeypatch):
    from pipelines.progress import Progress

    monkeypatch.delenv("ADBRAY_PROGRESS", raising=False)
    tty = Tty()
    bar = Progress("collect", total=10, unit="episodes", every_s=0.0, stream=tty)
    for done in (3, 7, 10):
        bar.update(done)
    bar.finish()
    lines = tty.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["[collect] 3/10 episodes", "[collect] 7/10 episodes",
                                                        "[collect] 10/10 episodes", "[collect] 10/10 episodes"]
    quiet = io.StringIO()
    silent = Progress("collect", 10, stream=quiet)
    silent.update(5)
    silent.finish()
    assert quiet.getvalue() == ""
