"""Streaming reads of members of the official binary dataset archives.

STL-10's archive holds a 2.7 GB `unlabeled_X.bin`; reading members straight
out of the (gzip) tar stream, in fixed-size record chunks, keeps memory to one
chunk and needs no extracted copy on disk. The same code reads a directory
where a user already extracted the archive.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
import os
import tarfile
from typing import BinaryIO
import zlib

import numpy as np

from sslj.errors import UserError

# What a truncated or corrupt archive raises, while listing or while reading.
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def _corrupt(source: str, e: Exception) -> UserError:
  return UserError(
      f'cannot read the archive {source} ({type(e).__name__}: {e}); it is '
      'truncated or corrupt: download it again.'
  )


def iter_members(
    source: str, wanted: Collection[str]
) -> Iterator[tuple[str, BinaryIO]]:
  """Yields (basename, file object) for each member whose basename is wanted.

  Args:
    source: a tar archive (any compression tarfile knows) or a directory
      holding the extracted files (searched recursively).
    wanted: basenames to yield; others are skipped.

  The file objects are only valid until the next item is requested, because
  a tar stream can only move forward.
  """
  if os.path.isdir(source):
    for dirpath, _, filenames in sorted(os.walk(source)):
      for filename in sorted(filenames):
        if filename in wanted:
          with open(os.path.join(dirpath, filename), 'rb') as f:
            yield filename, f
    return
  try:
    # 'r|*' reads the archive as a forward-only stream: members are never
    # loaded whole, whatever their size.
    with tarfile.open(source, mode='r|*') as tar:
      for member in tar:
        basename = os.path.basename(member.name)
        if member.isfile() and basename in wanted:
          yield basename, tar.extractfile(member)
  except _READ_ERRORS as e:
    raise _corrupt(source, e) from e


def read_small_members(source: str, wanted: Collection[str]) -> dict[str, bytes]:
  """Contents of the wanted members; UserError naming any that are missing."""
  try:
    found = {name: f.read() for name, f in iter_members(source, wanted)}
  except _READ_ERRORS as e:
    raise _corrupt(source, e) from e
  missing = sorted(set(wanted) - set(found))
  if missing:
    raise UserError(
        f'{source} lacks {", ".join(missing)}; it is not the official '
        'archive or is incomplete: download it again.'
    )
  return found


def iter_record_chunks(
    source: str,
    member: str,
    record_size: int,
    chunk_records: int,
    decode: Callable[[np.ndarray], np.ndarray],
) -> Iterator[np.ndarray]:
  """Yields decode(chunk) for chunks of fixed-size records of one member.

  Args:
    source: archive or directory, as for `iter_members`.
    member: basename of the binary file of records.
    record_size: bytes per record.
    chunk_records: records read at a time (bounds the memory used).
    decode: maps a uint8 [n, record_size] array to the output arrays.

  Raises:
    UserError: the member is missing or its size is not a whole number of
      records (a truncated download).
  """
  for _, f in iter_members(source, {member}):
    while True:
      try:
        data = f.read(record_size * chunk_records)
      except _READ_ERRORS as e:
        raise _corrupt(source, e) from e
      if not data:
        return
      if len(data) % record_size:
        raise UserError(
            f'{member} in {source} ends with a partial record (its size is not '
            f'a multiple of {record_size} bytes): download the archive again.'
        )
      yield decode(np.frombuffer(data, np.uint8).reshape(-1, record_size))
  raise UserError(f'{source} lacks {member}: download the archive again.')
