"""What `sslj.viz` made, and the `index.html` that shows it.

Every picture viz knows ends as an entry: a `Picture` (a PNG file in the
pictures folder, with a caption saying what it shows and where its numbers
come from) or a `Skipped` (why it does not apply to this run, or why drawing
it failed). The page lists both, so a missing picture is never silent.
"""

from __future__ import annotations

import dataclasses
import html
import os
import time


@dataclasses.dataclass(frozen=True)
class Picture:
  """A written picture.

  Attributes:
    name: short identifier, e.g. 'filters'.
    file: PNG file name, relative to the pictures folder.
    title: heading on the page.
    caption: what the picture shows.
    source: where it comes from (checkpoint step, file, split).
    size: (width, height) in pixels.
    numbers: figures computed while drawing (e.g. top-1), for logs and tests.
    crisp: a pixel grid, shown with nearest-neighbour scaling in the page.
  """
  name: str
  file: str
  title: str
  caption: str
  source: str
  size: tuple[int, int]
  numbers: dict = dataclasses.field(default_factory=dict)
  crisp: bool = False


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A picture that was not drawn, and why."""
  name: str
  title: str
  reason: str


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
figure { margin: 0 0 2.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ccc; }
img.crisp { image-rendering: pixelated; }
figcaption { max-width: 60em; margin-top: .4em; }
.source { color: #666; font-size: 90%; }
table.run td { padding: 0 1em 0 0; }
li { margin-bottom: .3em; }
"""


def run_summary(config, results: dict | None, step: int | None) -> list[tuple[str, str]]:
  """(label, value) rows describing the run at the top of the page."""
  labels = config.data.labels_per_class
  rows = [('method', config.method), ('dataset', config.data.name),
          ('labels per class', 'all' if labels is None else str(labels)),
          ('model', config.model.name), ('seed', str(config.seed)),
          ('checkpoint', f'step {step}' if step is not None else 'none used')]
  if results:
    rows.append(('results.json', f"top-1 {results['top1']:.2f}%, top-5 {results['top5']:.2f}% "
                                 f"after {results['num_steps']} steps"))
  else:
    rows.append(('results.json', 'not written yet (the run has not finished)'))
  return rows


def write_index(folder: str, entries: list, *, workdir: str, summary: list[tuple[str, str]]) -> str:
  """Writes `folder/index.html` showing every Picture and listing every Skipped."""
  e = html.escape
  pictures = [x for x in entries if isinstance(x, Picture)]
  skipped = [x for x in entries if isinstance(x, Skipped)]
  parts = ['<!DOCTYPE html>', '<html><head><meta charset="utf-8">',
           f'<title>sslj pictures: {e(os.path.basename(workdir.rstrip(os.sep)))}</title>',
           f'<style>{_STYLE}</style></head><body>',
           f'<h1>Pictures of <code>{e(workdir)}</code></h1>', '<table class="run">']
  parts += [f'<tr><td>{e(k)}</td><td>{e(v)}</td></tr>' for k, v in summary]
  parts.append(f'<tr><td>drawn</td><td>{e(time.strftime("%Y-%m-%d %H:%M:%S"))}</td></tr>')
  parts.append('</table>')
  crisp = ' class="crisp"'
  for p in pictures:
    parts.append(f'<figure id="{e(p.name)}"><h2>{e(p.title)}</h2>'
                 f'<img src="{e(p.file)}"{crisp if p.crisp else ""} alt="{e(p.title)}" width="{p.size[0]}" '
                 f'height="{p.size[1]}">'
                 f'<figcaption>{e(p.caption)} <span class="source">Source: {e(p.source)}.'
                 '</span></figcaption></figure>')
  if skipped:
    parts.append('<h2>Not drawn</h2><ul>')
    parts += [f'<li id="{e(s.name)}"><b>{e(s.title)}</b>: {e(s.reason)}</li>' for s in skipped]
    parts.append('</ul>')
  parts.append('</body></html>')
  path = os.path.join(folder, 'index.html')
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write('\n'.join(parts) + '\n')
  os.replace(tmp, path)
  return path
