"""What `launch.py` does, kept out of it so the entry point has no logic.

Bad input ends the program with one line on stderr and exit status 2, never a
traceback, and before anything is compiled or written.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import flags, logging

from sslj.errors import UserError

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def parse_flags(argv):
  """absl's flag parsing, with its errors (and the config's) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    cause = e.__cause__ or e.__context__
    if isinstance(cause, UserError):
      fail(str(cause))
    fail(one_line(str(e)))
  except UserError as e:
    fail(str(e))
  except OSError as e:  # a config file that is missing or cannot be read
    config_unreadable(e)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    # ml_collections reports a misspelt or mistyped `--config.x=y` this way.
    lacking = missing_model_field(argv)
    if lacking:
      fail(lacking)
    if isinstance(e, KeyError) and e.args:
      fail(unknown_field(e))
    fail('bad config override: ' + ' '.join(str(e).split()))


def missing_model_field(argv) -> str | None:
  """The one line for a `--config.model.<field>=...` that the config's model
  does not have, naming the fields it has; None if there is none."""
  spec = next((a.partition('=')[2] for a in reversed(argv) if a.startswith('--config=')), '')
  wanted = [n.partition('.')[2] for n in overridden_fields(argv) if n.startswith('model.')]
  if not spec or not wanted:
    return None
  import importlib.util  # pylint: disable=g-import-not-at-top
  from sslj import models  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(':')
  try:  # the config file once more (it ran a moment ago), for its model
    module_spec = importlib.util.spec_from_file_location('sslj_config_for_error', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    model = module.get_config(arg or None).model
  except Exception:  # pylint: disable=broad-except
    return None
  lacking = sorted(f for f in wanted if f.partition('.')[0] not in model)
  if not lacking:
    return None
  return (f'--config.model.{lacking[0]}: model {model.name} has no field {lacking[0]}; its '
          f'fields are {", ".join(sorted(models.fields(model.name))) or "none"} (and name, '
          'dtype); the config string picks the model, e.g. configs/x.py:model=resnet18.')


def config_unreadable(error: OSError) -> None:
  """Fails with one line for a `--config` file ml_collections could not load."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  detail = [l for l in lines if l.startswith('[Errno')]
  spec = next((a.partition('=')[2] for a in reversed(sys.argv) if a.startswith('--config=')), '')
  fail(f'cannot load --config={spec}: ' + (detail[-1] if detail else ' '.join(lines)))


def unknown_field(error: KeyError) -> str:
  """The one line for ml_collections' KeyError on a misspelt `--config.x=y`."""
  name, _, hint = str(error.args[0] if error.args else error).partition('\n')
  return (f'bad config override: the config has no field {name}. '
          f'{hint or "See the config file for the fields that exist."}')


def one_line(text: str) -> str:
  """The last non-empty line of an absl flag error (the part that says what is wrong)."""
  lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
  return lines[-1] if lines else text


def log_sslj_info() -> None:
  """INFO logging for sslj's own lines; libraries speak at WARNING."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OnlyOurInfo())


class _OnlyOurInfo(pylogging.Filter):
  """Keeps INFO lines of sslj; libraries (Orbax logs every save) speak at WARNING."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or '/sslj/' in record.pathname.replace(os.sep, '/')


def exit_now(status: int) -> None:
  """Ends the process without tearing down Python and JAX.

  After a SIGTERM the grace period is short, and that teardown (freeing the
  runtime, joining its threads) took about 20 s on a loaded 2-core CPU. The
  run's files are closed by then; only streams, log handlers and the
  multi-host coordination are left to flush and close.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  pylogging.shutdown()
  import jax
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  os._exit(status)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def overridden_fields(argv=None) -> set:
  """Dotted config fields given on the command line as `--config.NAME=VALUE`."""
  names = set()
  for arg in sys.argv if argv is None else argv:
    if arg.startswith('--config.'):
      names.add(arg[len('--config.'):].partition('=')[0])
  return names


def _finished_line(results: dict, workdir: str) -> str:
  return (f"{results['method']} on {results['dataset']}: top-1 {results['top1']:.2f}%, "
          f"top-5 {results['top5']:.2f}% in {results['wall_s']:.0f} s "
          f"({os.path.join(workdir, 'results.json')})")


def _train(config, workdir: str) -> None:
  """Checks everything cheap, then trains under the workdir's lock.

  Nothing is prepared, compiled or written before the config's ranges, the
  recorded config and the workdir's writability have been checked.
  """
  import jax
  from sslj import preflight, run_files, train, workdir_lock
  preflight.check_config(config)
  preflight.ignored_overrides(config, overridden_fields())
  path = os.path.abspath(workdir)
  if os.path.isdir(path):
    run_files.check_recorded(path, config)
    finished = run_files.finished_results(path)
    if finished is not None:
      print(f'{path} holds a finished run; nothing to do (move results.json away to evaluate '
            f'again): {_finished_line(finished, workdir)}')
      return
  preflight.check_workdir(path, jax.process_count())
  stopped = False
  with workdir_lock.held(path, enabled=jax.process_index() == 0):
    logging.info('Training %s on %s in %s.', config.method, config.data.name, path)
    results = train.train_and_evaluate(config, path)
    stopped = results is None
  if stopped:
    print('Stopped early on SIGTERM after saving a checkpoint; run the same command to resume.',
          file=sys.stderr)
    exit_now(0)
  print(_finished_line(results, workdir))


def run(*, config, workdir, mode, coordinator_address=None, num_processes=None,
        process_id=None, **use_flags) -> int:
  if mode == 'train' and (config is None or not workdir):
    fail('--config and --workdir are required, e.g. --config=configs/supervised.py --workdir=runs/x')
  if not workdir:
    fail(f'--mode={mode} needs --workdir=DIR, the directory of a trained run.')
  log_sslj_info()
  try:
    from sslj import parallel
    parallel.initialize_distributed(coordinator_address, num_processes, process_id)
    if mode == 'train':
      _train(config, workdir)
    elif mode == 'viz':  # pictures of a run (sslj/viz)
      from sslj import viz
      print(viz.run_command(os.path.abspath(workdir), config=config, **use_flags))
    else:  # eval, probe, predict, export: use a trained run (sslj/use).
      from sslj.use import commands
      print(commands.run(mode, os.path.abspath(workdir), config=config, **use_flags))
    return 0
  except UserError as e:
    fail(str(e))
  except KeyboardInterrupt as e:
    # Ctrl-C: after a checkpoint (train.Interrupted says so), or at once.
    message = str(e) or ('Interrupted (Ctrl-C); checkpoints saved before are kept, so running '
                         'the same command resumes from the last one.')
    print(message, file=sys.stderr)
    exit_now(EXIT_INTERRUPTED)
  except OSError as e:  # A full disk while writing metrics, events or results.
    from sslj import checkpoint
    reason = checkpoint.disk_full_reason(e)
    if reason is None:
      raise
    fail(f'{reason} while writing {e.filename or workdir}; free space and run the same '
         'command to resume.')
