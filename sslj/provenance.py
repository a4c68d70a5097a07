"""Where a run's numbers come from: the code, the command and the machine.

`record()` is what `results.json` keeps under `"provenance"`, so a results
table built from runs (`python -m sslj.report`) can say which commit, which
command and which hardware each figure came from:

  {"sslj_version": "0.1.0", "commit": "a1b0fe7...", "dirty": false,
   "command": "python launch.py --config=configs/fixmatch.py ...",
   "device_kind": "cpu", "platform": "cpu", "device_count": 1,
   "process_count": 1, "host_cpu": "Intel(R) Xeon(R) Processor", "host_cores": 2,
   "load_average": [2.1, 2.05, 1.9], "jax_version": "0.10.2",
   "finished": "2026-12-02T19:40:11Z"}

`commit` and `dirty` are None where the package is not in a git checkout (an
installed wheel) or git is missing; every field is best effort and never
stops a run.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import time

import jax


def _git(*args: str) -> str | None:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(['git', '-C', here, *args], capture_output=True, text=True,
                         timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
  """The installed version, and the checkout's commit and whether it had local changes.

  Read once per process: `sslj.train` asks at the start of a run, so a checkout
  edited while the run trains does not relabel it.
  """
  try:
    version = importlib.metadata.version('sslj')
  except importlib.metadata.PackageNotFoundError:
    version = None
  commit = _git('rev-parse', 'HEAD')
  dirty = None
  if commit:
    status = _git('status', '--porcelain', '--untracked-files=no')
    dirty = bool(status) if status is not None else None
  return {'sslj_version': version, 'commit': commit or None, 'dirty': dirty}


@functools.lru_cache(maxsize=1)
def host_cpu() -> str:
  """The host's CPU model as the OS names it ('' when it cannot be read)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def command() -> str:
  """The command line of this process, as a shell would take it back.

  A module run with `python -m` is written that way (Python puts the module's
  file path in argv[0]), and launch.py by its name.
  """
  argv = list(sys.argv)
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  if argv and spec is not None and spec.name:
    name = spec.name[:-len('.__main__')] if spec.name.endswith('.__main__') else spec.name
    return shlex.join(['python', '-m', name, *argv[1:]])
  if argv and argv[0].endswith('launch.py'):
    argv[0] = os.path.basename(argv[0])
  return shlex.join(['python', *argv])


def record() -> dict:
  devices = jax.devices()
  return {**code_version(), 'command': command(),
          'device_kind': devices[0].device_kind, 'platform': devices[0].platform,
          'device_count': jax.device_count(), 'process_count': jax.process_count(),
          'host_cpu': host_cpu(), 'host_cores': os.cpu_count(), 'load_average': load_average(),
          'jax_version': jax.__version__,
          'finished': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}


def load_average() -> list[float] | None:
  """The host's 1, 5 and 15 minute load averages: how busy its cores were as
  the run ended (wall times of runs that shared the cores are upper bounds)."""
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None
