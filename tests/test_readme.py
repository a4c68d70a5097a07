"""README.md and docs/: every relative link resolves, and the README's commands run.

The README's commands are read from its ```bash and ```python blocks, in the
order the README gives them, so a command changed into one that no longer
runs fails here. Training commands run on `digits` at reduced steps (one
tiny run each, made once for the module); the commands that use a trained
run then run on the quickstart's run. Commands that do not finish in about a
minute on a CPU, or that would change the machine or the checkout, are
skipped by their first words (`SKIPPED`), each with the reason. Every
`python launch.py --config=...` command of README.md and docs/ is also
parsed as launch.py parses it, with its config range-checked, without
training.
"""

import functools
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

PAGES = sorted(p for p in {os.path.join(ROOT, 'README.md'), os.path.join(ROOT, 'CHANGELOG.md'),
                            *glob.glob(os.path.join(ROOT, 'docs', '**', '*.md'), recursive=True)}
               if os.path.isfile(p))


# README commands not run here, by their first words, with the reason.
SKIPPED = {
    ('pip', 'install'): 'installs packages into the environment; CI runs the install line',
    ('python', '-m', 'pytest'): 'the whole test suite, of which this file is part',
    ('tensorboard',): 'a server that runs until it is stopped',
    ('python', '-m', 'sslj.sweep'): 'dozens of full runs; tests/test_sweep.py runs small sweeps',
    ('python', '-m', 'sslj.report'): ('tests/test_report.py runs it on a copy of docs/records '
                                      'and compares the page with docs/results.md'),
}
# launch.py commands with this flag start one process of several hosts.
MULTI_HOST_FLAG = '--coordinator_address'
MULTI_HOST_REASON = 'one process of a multi-host run; tests/test_multihost.py runs two'

# What a README training command runs with here: a few steps, the session's data dir.
REDUCED = {'num_steps': '20', 'eval_every': '10'}


# Links.

_FENCE = re.compile(r'^(```|~~~).*?^\1[ \t]*$', re.M | re.S)
_INLINE_CODE = re.compile(r'`[^`\n]*`')
_LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_HEADING = re.compile(r'^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$', re.M)


def _read(path):
  with open(path, encoding='utf-8') as f:
    return f.read()


def _prose(text):
  """The text outside fenced code blocks."""
  return _FENCE.sub('', text)


def links(text):
  """The link targets of Markdown text, outside code blocks and code spans."""
  return _LINK.findall(_INLINE_CODE.sub('', _prose(text)))


def slug(heading):
  """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
  text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link keeps its text
  text = text.replace('`', '').strip().lower()
  text = ''.join(c for c in text if c.isalnum() or c in ' -_')
  return text.replace(' ', '-')


@functools.lru_cache(maxsize=None)
def anchors(path):
  """Every heading anchor of a Markdown file, with GitHub's -1, -2 for repeats."""
  seen, out = {}, set()
  for heading in _HEADING.findall(_prose(_read(path))):
    base = slug(heading)
    n = seen.get(base, 0)
    seen[base] = n + 1
    out.add(base if n == 0 else f'{base}-{n}')
  return out


def broken_links(page):
  """'target: why' for every relative link of `page` that does not resolve."""
  broken = []
  for target in links(_read(page)):
    if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I):  # http:, https:, mailto:
      continue
    path, _, anchor = target.partition('#')
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    relative = os.path.relpath(resolved, ROOT).replace(os.sep, '/')
    if not os.path.exists(resolved):
      broken.append(f'{target}: {relative} does not exist')
    elif anchor and resolved.endswith('.md') and anchor not in anchors(resolved):
      broken.append(f'{target}: {relative} has no heading with the anchor #{anchor}')
  return broken


def test_the_link_checker_reads_github_anchors_and_catches_a_broken_link(tmp_path):
  assert slug('Π-model') == 'π-model'
  assert slug('Why the CPU presets keep the learning rate constant') == (
      'why-the-cpu-presets-keep-the-learning-rate-constant')
  assert slug('Overrides: `--config.<field>=<value>`') == 'overrides---configfieldvalue'
  assert slug('export and `sslj.load`') == 'export-and-ssljload'
  page = tmp_path / 'page.md'
  page.write_text('# Title\n\n## A section\n\n[ok](#a-section) [gone](#no-such) '
                  '[file](missing.md) `[in code](nowhere.md)`\n\n```\n[fenced](nowhere.md)\n```\n')
  assert broken_links(str(page)) == [
      '#no-such: ' + os.path.relpath(str(page), ROOT).replace(os.sep, '/')
      + ' has no heading with the anchor #no-such',
      'missing.md: ' + os.path.relpath(str(tmp_path / 'missing.md'), ROOT).replace(os.sep, '/')
      + ' does not exist']


@pytest.mark.parametrize('page', PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(page):
  assert not broken_links(page), '\n'.join(broken_links(page))


def test_the_readme_links_every_method_page_and_stays_short():
  readme = _read(os.path.join(ROOT, 'README.md'))
  configs = sorted(os.path.basename(p)[:-3]
                   for p in glob.glob(os.path.join(ROOT, 'configs', '*.py')))
  targets = {link.partition('#')[0] for link in links(readme)}
  assert 'docs/results.md' in targets
  for name in configs:
    assert f'docs/methods/{name}.md' in targets, name
    assert os.path.exists(os.path.join(ROOT, 'docs', 'methods', f'{name}.md')), name
  assert len(readme.splitlines()) <= 220


# Commands.

_BLOCK = re.compile(r'^```(bash|python)[ \t]*\n(.*?)^```[ \t]*$', re.M | re.S)


def blocks(text):
  """(language, code) of every ```bash and ```python block, in order."""
  return _BLOCK.findall(text)


def commands(code):
  """The commands of a bash block: continuation lines joined, comments dropped."""
  out = []
  for line in code.replace('\\\n', ' ').splitlines():
    words = shlex.split(line, comments=True)
    if words:
      out.append(words)
  return out


def skip_reason(words):
  if MULTI_HOST_FLAG in ' '.join(words):
    return MULTI_HOST_REASON
  for first, reason in SKIPPED.items():
    if tuple(words[:len(first)]) == first:
      return reason
  return None


def _is_launch(words):
  return words[:2] == ['python', 'launch.py']


def _is_training(words):
  return _is_launch(words) and not any(w.startswith('--mode=') and w != '--mode=train'
                                       for w in words)


def _readme_steps():
  """('bash', words) and ('python', code) of README.md, in order, skipped ones left out."""
  steps = []
  for language, code in blocks(_read(os.path.join(ROOT, 'README.md'))):
    if language == 'python':
      steps.append(('python', code))
      continue
    for words in commands(code):
      if skip_reason(words) is None:
        steps.append(('bash', words))
  return steps


def _name(step):
  language, what = step
  return ' '.join(what) if language == 'bash' else 'python block: ' + what.strip().splitlines()[-1]


def _in_tmp(text, tmp):
  """README paths (runs/...) moved under `tmp`."""
  return re.sub(r'(^|[=\'" ])runs/', lambda m: f'{m.group(1)}{tmp}/runs/', text)


def _reduced(words, data_dir):
  keep = [w for w in words
          if not any(w.startswith(f'--config.{k}=') for k in (*REDUCED, 'data.data_dir'))]
  return keep + [f'--config.{k}={v}' for k, v in REDUCED.items()] + [
      f'--config.data.data_dir={data_dir}']


def _image_folder(path):
  import numpy as np
  from PIL import Image
  os.makedirs(path, exist_ok=True)
  pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  for i, image in enumerate(pixels):
    Image.fromarray(image).save(os.path.join(path, f'{i}.png'))
  return path


def _argv(step, tmp, data_dir):
  """The process to start for a README step."""
  language, what = step
  if language == 'python':
    return [sys.executable, '-c', _in_tmp(what, tmp)]
  words = [_in_tmp(w, tmp) for w in what]
  words = [f'--images={_image_folder(os.path.join(tmp, "images"))}'
           if w.startswith('--images=') else w for w in words]
  if _is_training(words):
    words = _reduced(words, data_dir)
  if words[0] == 'python':
    return [sys.executable, *words[1:]]
  raise AssertionError(f'README command {" ".join(what)!r} is neither run here nor in SKIPPED')


@pytest.fixture(scope='module')
def readme_outcomes(data_dir, tmp_path_factory):
  """{step name: CompletedProcess} of every README step, run once, in the README's order."""
  tmp = str(tmp_path_factory.mktemp('readme'))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  outcomes = {}
  for step in _readme_steps():
    outcomes[_name(step)] = subprocess.run(_argv(step, tmp, data_dir), cwd=ROOT, env=env,
                                           capture_output=True, text=True, timeout=300)
  return outcomes


def test_the_readme_has_the_commands_this_file_runs():
  steps = _readme_steps()
  training = [what for language, what in steps if language == 'bash' and _is_training(what)]
  assert ['python', 'launch.py', '--config=configs/mean_teacher.py',
          '--workdir=runs/mean_teacher'] in training  # the quickstart's
  modes = {w for language, what in steps if language == 'bash' for w in what
           if w.startswith('--mode=')}
  assert modes >= {'--mode=eval', '--mode=probe', '--mode=predict', '--mode=export'}
  assert any(what[:3] == ['python', '-m', 'sslj.viz'] for _, what in steps)
  assert any(language == 'python' and 'sslj.load' in what for language, what in steps)
  names = [_name(step) for step in steps]
  assert len(set(names)) == len(names), names  # each outcome is kept under its name


@pytest.mark.parametrize('name', [_name(s) for s in _readme_steps()])
def test_the_readme_command_runs(readme_outcomes, name):
  proc = readme_outcomes[name]
  assert proc.returncode == 0, (name, proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  if _is_training(name.split()):  # it trained to the end and wrote its results
    assert 'results.json' in proc.stdout, proc.stdout[-3000:]


# Documented training commands: parsed, not run.

def _launch_commands():
  """(page, words) of every `python launch.py --config=...` command in README.md and docs/."""
  found = []
  for page in PAGES:
    for language, code in blocks(_read(page)):
      if language != 'bash':
        continue
      for words in commands(code):
        if _is_training(words) and any(w.startswith('--config=') for w in words):
          found.append((os.path.relpath(page, ROOT), words))
  return found


def _parse_like_launch(words):
  """The config `python launch.py WORDS` would train, range-checked; a UserError if not."""
  from absl import flags
  from ml_collections import config_flags
  from sslj import cli, preflight
  from sslj.errors import UserError
  argv = ['launch.py']
  for w in words[2:]:
    if w.startswith('--config='):  # an absolute path; seed=S, a placeholder, as seed=0
      w = '--config=' + os.path.join(ROOT, w[len('--config='):].replace('seed=S', 'seed=0'))
    if not w.startswith(('--coordinator_address', '--num_processes', '--process_id')):
      argv.append(w)
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  flags.DEFINE_string('workdir', None, '', flag_values=values)
  try:
    values(argv)
    config = holder.value
    config.method  # pylint: disable=pointless-statement  (a failed load raises here)
  except UserError:
    raise
  except KeyError as e:  # a misspelt --config.x=y, worded as launch.py words it
    raise UserError(cli.unknown_field(e)) from None
  except (flags.Error, AttributeError, TypeError, ValueError, OSError) as e:
    raise UserError(cli.one_line(str(e))) from None
  preflight.check_config(config)
  preflight.ignored_overrides(config, cli.overridden_fields(argv))
  return config


def test_a_documented_command_that_cannot_run_is_caught():
  from sslj.errors import UserError
  good = ['python', 'launch.py', '--config=configs/supervised.py:labels_per_class=10',
          '--workdir=runs/x', '--config.num_steps=500']
  assert _parse_like_launch(good).num_steps == 500
  for bad in ('--config.optimiser.lr=0.1', '--config.batch_size=0'):
    with pytest.raises(UserError):
      _parse_like_launch([*good, bad])
  with pytest.raises(UserError):
    _parse_like_launch(['python', 'launch.py', '--config=configs/supervised.py:labels=10'])


@pytest.mark.parametrize('page,words', _launch_commands(),
                         ids=[f'{p}: {" ".join(w[2:4])}' for p, w in _launch_commands()])
def test_every_documented_training_command_parses(page, words):
  del page
  spec = next(w for w in words if w.startswith('--config='))
  config_file = os.path.basename(spec[len('--config='):].partition(':')[0])
  assert _parse_like_launch(words).method == config_file[:-len('.py')]
