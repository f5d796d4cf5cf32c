"""Progress on stderr also when it is not a terminal: plain lines at each tenth (rate-limited) and at the end."""
from __future__ import annotations

import subprocess
import sys

from edgeslim.core import progress


def test_plain_lines_at_each_tenth_and_at_the_end(monkeypatch, capsys):
    monkeypatch.setattr(progress, "MIN_GAP_S", 0.0)
    with progress.bar("calibrating on bbc-news", 20, True) as shown:
        for step in range(20):
            shown.note(f"loss {1.0 / (step + 1):.3g}")
            shown.advance()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("calibrating on bbc-news: 2/20 (10%,") and lines[-1].endswith("loss 0.05 done")
    assert len(lines) == 11  # every tenth, then the closing line


def test_lines_are_rate_limited_and_off_means_silent(monkeypatch, capsys):
    with progress.bar("work", 1000, True) as shown:  # a fast loop: no line closer than MIN_GAP_S to the last
        for _ in range(1000):
            shown.advance()
    assert len(capsys.readouterr().err.splitlines()) == 1  # only the closing line
    with progress.bar("work", 10, False) as shown:
        shown.advance(10)
    assert list(progress.each([1, 2], "x", enabled=False)) == [1, 2] and capsys.readouterr().err == ""


def test_a_compress_with_calibration_shows_its_stages_in_a_log(tmp_path):
    done = subprocess.run([sys.executable, "-m", "edgeslim", "compress", "tiny-bert", "-m", "asvd", "--ratio", "0.6",
                           "--calib", "random:16", "-o", str(tmp_path / "a.slim")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    err = done.stderr.splitlines()
    assert any(line.startswith("calibrating on random") for line in err)
    assert any(line.startswith("done asvd") for line in err)


def test_a_stage_says_it_runs_only_once_it_runs_long(monkeypatch, capsys):
    import time

    from edgeslim import pipeline

    monkeypatch.setattr(pipeline, "STAGE_LINE_S", 0.05)
    with pipeline.stage("quick"):
        pass
    with pipeline.stage("slow"):
        time.sleep(0.3)
    err = capsys.readouterr().err.splitlines()
    assert "quick ..." not in err and "slow ..." in err  # a fast refusal stays one line; a long stage shows itself
    assert [line.split(" (")[0] for line in err if line.startswith("done")] == ["done quick", "done slow"]


def test_a_stage_shows_itself_while_a_library_inside_hides_its_own_stderr(monkeypatch, capsys):
    import contextlib
    import io
    import time

    from edgeslim import pipeline

    monkeypatch.setattr(pipeline, "STAGE_LINE_S", 0.05)
    # the body hides its stderr as core/onnx_io._quiet_torch does
    with pipeline.stage("export runs/[/x].slim"), contextlib.redirect_stderr(io.StringIO()) as hidden:
        time.sleep(0.3)
    err = capsys.readouterr().err.splitlines()  # the path's brackets are text, not rich markup
    assert "export runs/[/x].slim ..." in err and err[-1].startswith("done export runs/[/x].slim (")
    assert hidden.getvalue() == ""
