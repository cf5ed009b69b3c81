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


def _watch(cmd: Sequence[str], env, cwd, stall_s: float,
           total_s: float) -> tuple:
  """Runs ``cmd`` to completion or to a hang; returns ``(completed, why)``
  with ``why`` None unless the child was killed (and then why)."""
  proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True)
  _LIVE.add(proc)
  readers = [_Reader(proc.stdout), _Reader(proc.stderr)]
  for r in readers:
    r.start()
  start = progress = time.monotonic()
  cpu = _cpu_seconds(proc.pid) or 0.0
  why = None
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
      break
  for r in readers:
    r.join(timeout=5 if why else None)
  _LIVE.discard(proc)
  done = subprocess.CompletedProcess(list(cmd), proc.returncode,
                                     readers[0].text, readers[1].text)
  return done, why


def _checked(done: subprocess.CompletedProcess, why) -> (
    subprocess.CompletedProcess):
  if why:
    pytest.fail(f"{' '.join(map(str, done.args))}: {why}; stderr tail:\n"
                f"{done.stderr[-3000:]}")
  return done


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
  return _checked(*_watch(cmd, env, cwd, stall_s, total_s))


def _worker_cmd(script) -> tuple:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return [sys.executable, str(script)], env


def _key(script) -> str:
  return os.path.realpath(str(script))


class _Prestarted:
  """Worker scripts run one after another in a background thread, started
  when the tests that need them are collected: the suite is mostly
  single-threaded XLA compiles, so a worker compiling on the other core
  meanwhile costs no wall time. :func:`worker_report` then waits for its
  result."""

  def __init__(self, scripts):
    self.results = {_key(s): None for s in scripts}
    self.done = {_key(s): threading.Event() for s in scripts}
    self.thread = threading.Thread(target=self._run, args=(scripts,),
                                   daemon=True)
    self.thread.start()

  def _run(self, scripts):
    for script in scripts:
      try:
        self.results[_key(script)] = _watch(*_worker_cmd(script), None,
                                            STALL_S, TOTAL_S)
      finally:
        self.done[_key(script)].set()

  def take(self, script):
    """The script's ``(completed, why)``, once it has run; None if it was
    not prestarted."""
    if _key(script) not in self.done:
      return None
    self.done[_key(script)].wait()
    return self.results[_key(script)]


_PRESTARTED = []   # at most one _Prestarted per pytest session
_LIVE = set()      # children still running (killed at the session's end)


def prestart(scripts) -> None:
  """Starts ``scripts`` (worker paths) in the background, one at a time."""
  if scripts and not _PRESTARTED:
    _PRESTARTED.append(_Prestarted(list(scripts)))


def kill_children() -> None:
  """Kills every child still running (the session is over)."""
  for proc in list(_LIVE):
    _kill(proc)


def worker_report(script) -> dict:
  """Runs a multi-device worker script (it sets its own simulated device
  count, so this process's ``XLA_FLAGS`` are dropped), or waits for its
  prestarted run, and returns the JSON object on its last stdout line."""
  got = _PRESTARTED[0].take(script) if _PRESTARTED else None
  if got is None:
    cmd, env = _worker_cmd(script)
    got = _watch(cmd, env, None, STALL_S, TOTAL_S)
  proc = _checked(*got)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
