"""tests/_monitor.py: a silent idle child is a hang; a slow busy one is not."""

import sys

import pytest

from tests import _monitor


def _child(code):
  return [sys.executable, "-c", code]


def test_idle_silent_child_is_a_hang():
  with pytest.raises(pytest.fail.Exception, match="hung"):
    _monitor.run(_child("import time; time.sleep(60)"), stall_s=3)


def test_busy_silent_child_is_not_a_hang():
  proc = _monitor.run(_child(
      "import time\nt = time.time()\nwhile time.time() - t < 6: pass\n"
      "print('done')"), stall_s=3)
  assert proc.returncode == 0 and proc.stdout.strip() == "done"


def test_child_that_prints_is_not_a_hang():
  proc = _monitor.run(_child(
      "import sys, time\nfor i in range(6):\n"
      "  print(i, flush=True); time.sleep(1)\nsys.exit(3)"), stall_s=3)
  assert proc.returncode == 3 and proc.stdout.split() == list("012345")


def test_overall_bound():
  with pytest.raises(pytest.fail.Exception, match="still running"):
    _monitor.run(_child("while True: pass"), stall_s=60, total_s=3)


def test_prestarted_worker_report_is_waited_for(tmp_path, monkeypatch):
  script = tmp_path / "w.py"
  script.write_text("import json, time\ntime.sleep(2)\n"
                    "print(json.dumps({'ok': 1}))\n")
  other = tmp_path / "x.py"
  other.write_text("print('{\"ran\": \"here\"}')\n")
  monkeypatch.setattr(_monitor, "_PRESTARTED", [])
  _monitor.prestart([script])
  assert _monitor._PRESTARTED[0].thread.is_alive()   # started, not done
  assert _monitor.worker_report(script) == {"ok": 1}
  assert _monitor.worker_report(other) == {"ran": "here"}   # not prestarted


def test_prestarted_hang_fails_the_test(tmp_path, monkeypatch):
  script = tmp_path / "w.py"
  script.write_text("import time\ntime.sleep(60)\n")
  monkeypatch.setattr(_monitor, "_PRESTARTED", [])
  monkeypatch.setattr(_monitor, "STALL_S", 3)
  _monitor.prestart([script])
  with pytest.raises(pytest.fail.Exception, match="hung"):
    _monitor.worker_report(script)
