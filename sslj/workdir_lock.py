"""One training process per workdir: an OS lock on `DIR/.lock`.

The lock is `fcntl.flock`, which the kernel drops when the process ends, so a
run killed with SIGKILL leaves no stale lock: the file may stay, but the
next run takes it over. The file holds the holder's PID, so a refused second
process can say who holds the run. In a multi-host run every process shares
the workdir by design and only process 0 takes the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from sslj.errors import UserError

LOCK_FILE = '.lock'


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      pid = f.read().strip()
  except OSError:
    pid = ''
  return f'process {pid}' if pid.isdigit() else 'another process'


@contextlib.contextmanager
def held(workdir: str, enabled: bool = True):
  """Holds the workdir's lock for the body; removes the lock file after.

  Raises:
    UserError: another live process holds the lock (named by its PID).
  """
  if not enabled:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise UserError(f'{workdir} is in use by {_holder(path)}, which is training there; '
                      'wait for it to finish or stop it, or use another --workdir.') from None
    # The holder before us may have removed the file between our open and our
    # lock; then we locked a file no one else will see: open it again.
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  os.ftruncate(fd, 0)
  os.write(fd, f'{os.getpid()}\n'.encode())
  try:
    yield
  finally:
    with contextlib.suppress(OSError):
      os.remove(path)
    os.close(fd)
