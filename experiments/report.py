"""Reports of a sweep from its ``results.jsonl`` alone: a Markdown table and a matplotlib plot.

  python -m experiments.report runs/sweeps/e1_methods               # table.md + plot.png there
  python -m experiments.report DIR --metrics accuracy --x peft.rank --curve eval/loss

Rows are grouped by their overrides without the seed: one table row per group with the mean
± sample standard deviation over its seeds, the trainable parameters (count and % of the
base), wall time, tokens/s and peak memory; failed cells are listed under the table with their
errors. The plot shows the first metric per group (bars with ±std, or lines over ``x`` when a
numeric key varies), and beside it the mean loss curve of each group. Presentation options
come from the arguments, else from ``sweep.json``'s ``report`` (written by `experiments.run`),
else from the rows.

>>> rows = [{'cell': f'm={m},seed={s}', 'overrides': {'arg.method': m, 'seed': s},
...          'status': 'ok', 'metrics': {'accuracy': a}, 'params': None}
...         for m, s, a in [('lora', 0, 0.8), ('lora', 1, 0.9), ('full', 0, 0.7)]]
>>> print(table(rows, columns=('seeds', 'metrics')))
| method | seeds | accuracy |
|---|---|---|
| lora | 2 | 0.8500 ± 0.0707 |
| full | 1 | 0.7000 |
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics

SEED_KEYS = ('seed',)
METRIC_ORDER = ('accuracy', 'f1_macro', 'loss', 'perplexity')
COLUMNS = ('seeds', 'trainable', 'metrics', 'time', 'throughput', 'memory')


def load_rows(path, latest: bool = True) -> list[dict]:
  """The rows of a results.jsonl (a torn last line is skipped); with ``latest``, only the last
  row of each cell, in the order the cells first appear."""
  rows = []
  for line in pathlib.Path(path).read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue
  if not latest:
    return rows
  out = {}
  for r in rows:
    out[r['cell']] = r
  order = list(dict.fromkeys(r['cell'] for r in rows))
  return [out[c] for c in order]


def _name(key: str) -> str:
  return key[len('arg.'):] if key.startswith('arg.') else key


def varying(rows) -> list[str]:
  """Override keys (seeds excluded) whose values differ between rows, in first-seen order."""
  keys = list(dict.fromkeys(k for r in rows for k in r['overrides'] if k not in SEED_KEYS))
  values = {k: {json.dumps(r['overrides'].get(k), default=str) for r in rows} for k in keys}
  return [k for k in keys if len(values[k]) > 1] or keys


def groups(rows) -> dict[tuple, list[dict]]:
  """Rows grouped by the values of the varying keys (first-seen order)."""
  keys = varying(rows)
  out = {}
  for r in rows:
    out.setdefault(tuple(json.dumps(r['overrides'].get(k), default=str) for k in keys),
                   []).append(r)
  return out


def metric_names(rows) -> list[str]:
  names = list(dict.fromkeys(k for r in rows if r['status'] == 'ok' for k in r['metrics']))
  return sorted(names, key=lambda k: (METRIC_ORDER.index(k) if k in METRIC_ORDER
                                      else len(METRIC_ORDER), names.index(k)))


def _mean_std(values, digits: int = 4) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return '—'
  if len(values) == 1:
    return f'{values[0]:.{digits}f}'
  return f'{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}'


def _mean(values):
  values = [v for v in values if v is not None]
  return statistics.mean(values) if values else None


def _value(v) -> str:
  return '—' if v == 'null' else v.strip('"')


def table(rows, metrics=None, columns=COLUMNS) -> str:
  """The Markdown table of ``rows`` (see the module docstring); failed cells below it."""
  keys = varying(rows)
  metrics = list(metrics or metric_names(rows))
  head = [_name(k) for k in keys]
  head += ['seeds'] if 'seeds' in columns else []
  head += ['trainable', 'trainable %'] if 'trainable' in columns else []
  head += metrics if 'metrics' in columns else []
  head += ['wall time (s)'] if 'time' in columns else []
  head += ['tokens/s'] if 'throughput' in columns else []
  head += ['peak RSS (MiB)'] if 'memory' in columns else []
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  failed = []
  for values, group in groups(rows).items():
    ok = [r for r in group if r['status'] == 'ok']
    failed += [r for r in group if r['status'] != 'ok']
    cells = [_value(v) for v in values]
    if 'seeds' in columns:
      cells.append(str(len(ok)) if len(ok) == len(group) else f'{len(ok)}/{len(group)}')
    if 'trainable' in columns:
      params = next((r['params'] for r in group if r.get('params')), None)
      cells += ([f'{params["trainable"]:,}', f'{params["percent"]:.4g}'] if params
                else ['—', '—'])
    if 'metrics' in columns:
      cells += [_mean_std([r['metrics'].get(m) for r in ok]) for m in metrics]
    for column, key, fmt in (('time', 'wall_s', '{:.0f}'), ('throughput', 'tokens_per_s', '{:.0f}'),
                             ('memory', 'peak_rss_mib', '{:.0f}')):
      if column in columns:
        mean = _mean([r.get(key) for r in ok])
        cells.append('—' if mean is None else fmt.format(mean))
    lines.append('| ' + ' | '.join(cells) + ' |')
  if failed:
    lines += ['', f'Failed cells ({len(failed)}):', '']
    lines += [f'- `{r["cell"]}`: {(r.get("error") or "").splitlines()[0][:300]}' for r in failed]
  return '\n'.join(lines)


def _label(keys, values) -> str:
  """'lora', or 'bitfit, peft.target=classifier': the first key's value bare, unset keys left
  out."""
  parts = [_value(v) if i == 0 else f'{_name(k)}={_value(v)}'
           for i, (k, v) in enumerate(zip(keys, values)) if v != 'null']
  return ', '.join(parts) or 'all'


def _numeric_key(rows, keys):
  for k in keys:
    vals = {r['overrides'].get(k) for r in rows}
    if len(vals) >= 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                              for v in vals):
      return k
  return None


def plot(rows, path, metric: str | None = None, x: str | None = None,
         curve: str | None = 'train/loss', title: str | None = None):
  """Writes a PNG: ``metric`` per group (bars ± std, or lines over the numeric key ``x``), and
  beside it the mean ``curve`` (a ``curves`` key of the rows) per group."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  ok = [r for r in rows if r['status'] == 'ok']
  metric = metric or next(iter(metric_names(rows)), None)
  keys = varying(rows)
  x = x if x is not None else _numeric_key(ok, keys)
  has_curves = curve and any(curve in (r.get('curves') or {}) for r in ok)
  fig, axes = plt.subplots(1, 2 if has_curves else 1, figsize=(12 if has_curves else 7, 4.5),
                           squeeze=False)
  ax = axes[0][0]
  if metric and x:
    hue = [k for k in keys if k != x]
    series = {}
    for r in ok:
      if metric not in r['metrics'] or x not in r['overrides']:
        continue
      label = _label(hue, [json.dumps(r['overrides'].get(k), default=str) for k in hue])
      series.setdefault(label, {}).setdefault(r['overrides'][x], []).append(r['metrics'][metric])
    for label, points in series.items():
      xs = sorted(points)
      ax.errorbar(xs, [statistics.mean(points[v]) for v in xs],
                  yerr=[statistics.stdev(points[v]) if len(points[v]) > 1 else 0 for v in xs],
                  marker='o', capsize=3, label=label)
    xs = sorted(v for points in series.values() for v in points)
    if xs and xs[0] > 0 and xs[-1] / xs[0] >= 16:
      ax.set_xscale('log', base=2 if all(math.log2(v).is_integer() for v in xs) else 10)
    ax.set_xlabel(_name(x))
    ax.legend(fontsize=8)
  elif metric:
    labels, means, stds = [], [], []
    for values, group in groups(rows).items():
      vals = [r['metrics'][metric] for r in group if r['status'] == 'ok' and metric in r['metrics']]
      if vals:
        labels.append(_label(keys, values))
        means.append(statistics.mean(vals))
        stds.append(statistics.stdev(vals) if len(vals) > 1 else 0)
    ax.bar(range(len(means)), means, yerr=stds, capsize=3, color='tab:blue')
    ax.set_xticks(range(len(means)), labels, rotation=45, ha='right', fontsize=8)
    if means:
      lo, hi = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
      pad = (hi - lo) * 0.2 or 0.05
      ax.set_ylim(lo - pad, hi + pad)
  ax.set_ylabel(metric or '')
  ax.grid(alpha=0.3)
  if has_curves:
    cax = axes[0][1]
    for values, group in groups(rows).items():
      runs = [dict(map(tuple, r['curves'][curve])) for r in group
              if r['status'] == 'ok' and curve in (r.get('curves') or {})]
      if runs:
        steps = sorted(set.intersection(*(set(c) for c in runs)))
        cax.plot(steps, [statistics.mean(c[s] for c in runs) for s in steps],
                 label=_label(keys, values), lw=1.2)
    cax.set_xlabel('step')
    cax.set_ylabel(curve + ' (mean over seeds)')
    cax.grid(alpha=0.3)
    cax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1), borderaxespad=0)   # outside
  fig.suptitle(title or (rows[0].get('sweep', '') if rows else ''))
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)
  return path


def write(directory, metrics=None, x=None, curve='train/loss', title=None,
          table_name='table.md', plot_name='plot.png') -> tuple[pathlib.Path, pathlib.Path]:
  """``table.md`` and ``plot.png`` in ``directory`` from its ``results.jsonl``."""
  directory = pathlib.Path(directory)
  rows = load_rows(directory / 'results.jsonl')
  text = table(rows, metrics)
  (directory / table_name).write_text(text + '\n')
  plot(rows, directory / plot_name, metric=(metrics or [None])[0], x=x, curve=curve, title=title)
  return directory / table_name, directory / plot_name


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('directory', help='a sweep directory holding results.jsonl')
  p.add_argument('--metrics', help='comma list of final metrics (default: all; the first is plotted)')
  p.add_argument('--x', help='numeric override key for the plot\'s x axis')
  p.add_argument('--curve', help='curve beside it (e.g. train/loss, eval/loss); "" for none')
  args = p.parse_args(argv)
  directory = pathlib.Path(args.directory)
  pinned = directory / 'sweep.json'
  options = json.loads(pinned.read_text()).get('report', {}) if pinned.is_file() else {}
  if args.metrics:
    options['metrics'] = args.metrics.split(',')
  if args.x:
    options['x'] = args.x
  if args.curve is not None:
    options['curve'] = args.curve or None
  for path in write(directory, **options):
    print(path)
  print(table(load_rows(directory / 'results.jsonl'), options.get('metrics')))


if __name__ == '__main__':
  main()
