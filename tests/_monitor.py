"""Run a subprocess from a test; a hang is lack of progress, not slowness.

A worker that compiles for minutes on a loaded 2-core machine is slow, not
hung; a collective that deadlocks waits forever without using the CPU.
:func:`run` therefore fails a test only when the child has shown no sign of
life for ``stall_s`` seconds: no new line on stdout or stderr and no CPU
time spent (read from ``/proc/<pid>/stat`` where it exists; on other
systems output alone counts). ``total_s`` is a generous overall bound that
only a runaway child reaches.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

import pytest

STALL_S = 180.0
TOTAL_S = 3600.0
_CPU_STEP_S = 0.5   # CPU seconds that count as progress
_POLL_S = 1.0


def _cpu_seconds(pid: int) -> Optional[float]:
  """User + system CPU time of process ``pid`` (all its threads), if known."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except (OSError, IndexError):
    return None
  # Fields after the command: state is [0], utime [11], stime [12].
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Reader(threading.Thread):
  """Collects a pipe's lines and the time of the last one."""

  def __init__(self, pipe):
    super().__init__(daemon=True)
    self.pipe, self.lines, self.last = pipe, [], time.monotonic()

  def run(self):
    for line in self.pipe:
      self.lines.append(line)
      self.last = time.monotonic()

  @property
  def text(self) -> str:
    return "".join(self.lines)


def _kill(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (OSError, AttributeError):
    proc.kill()
  proc.wait()


def run(cmd: Sequence[str], *, env=None, cwd=None, stall_s: float = STALL_S,
        total_s: float = TOTAL_S) -> subprocess.CompletedProcess:
  """Runs ``cmd`` to completion, failing the test if it stops progressing.

  Args:
    cmd: the command.
    env: its environment (default: this process's).
    cwd: its working directory.
    stall_s: seconds without output or CPU use that count as a hang.
    total_s: overall bound, seconds.

  Returns:
    A :class:`subprocess.CompletedProcess` with text ``stdout``/``stderr``.
  """
  proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True)
  readers = [_Reader(proc.stdout), _Reader(proc.stderr)]
  for r in readers:
    r.start()
  start = progress = time.monotonic()
  cpu = _cpu_seconds(proc.pid) or 0.0
  while proc.poll() is None:
    time.sleep(_POLL_S)
    now, used = time.monotonic(), _cpu_seconds(proc.pid)
    if used is not None and used - cpu >= _CPU_STEP_S:
      progress, cpu = now, used
    progress = max([progress] + [r.last for r in readers])
    why = (f"no output and no CPU use for {now - progress:.0f} s (hung)"
           if now - progress > stall_s else
           f"still running after {now - start:.0f} s" if now - start > total_s
           else None)
    if why:
      _kill(proc)
      for r in readers:
        r.join(timeout=5)
      pytest.fail(f"{' '.join(map(str, cmd))}: {why}; stderr tail:\n"
                  f"{readers[1].text[-3000:]}")
  for r in readers:
    r.join()
  return subprocess.CompletedProcess(list(cmd), proc.returncode,
                                     readers[0].text, readers[1].text)


def worker_report(script) -> dict:
  """Runs a multi-device worker script (it sets its own simulated device
  count, so this process's ``XLA_FLAGS`` are dropped) and returns the JSON
  object on its last stdout line."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = run([sys.executable, str(script)], env=env)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
