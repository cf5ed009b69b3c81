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
