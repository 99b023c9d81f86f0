"""experiments/bench_length.py's report on made-up results (no runs, nothing timed): the table,
ratios to PyTorch, skipped rows, and the longest T within the budget with its extrapolation."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[2]))

from experiments import bench_length  # noqa: E402


def run(s_per_step, load_mib, step_mib):
  return {'s_per_step': s_per_step, 'rss_after_load_mib': load_mib, 'step_rss_mib': step_mib,
          'process_peak_rss_mib': load_mib + step_mib}


def test_table_ratios_skips_and_longest_length():
  results = {
      'torch SDPA': {512: run(2.0, 1000, 1000), 1024: run(4.0, 1000, 2000)},
      'peftjax flash remat=none': {512: run(1.0, 1000, 500), 1024: run(2.0, 1000, 1000)},
      'peftjax xla (T x T) remat=none': {512: run(1.0, 1000, 4000),
                                         1024: {'skipped': True}},
  }
  table = bench_length.format_table(results, [512, 1024], limit_gib=16)
  lines = table.splitlines()
  assert lines[0] == '| row | T=512 | T=1,024 | longest T in 16 GiB |'
  assert '| peftjax flash remat=none | 1.00 s (2.00x), 1.46 GiB | 2.00 s (2.00x), 1.95 GiB |' in table
  # memory linear in T: (16384 - 1000) / 1000 steps of 1,024 tokens ~ 15,753 tokens
  assert lines[3].endswith('| ~15,753 (memory ~ T^1.0) |')
  assert lines[4] == '| peftjax xla (T x T) remat=none | 1.00 s (2.00x), 4.88 GiB | ' \
                     'skipped (memory) | >= 512 (one T measured) |'


def test_longest_measured_length_when_the_budget_is_passed_inside_the_grid():
  points = [(512, run(1.0, 1000, 1000)), (1024, run(1.0, 1000, 20000))]
  assert bench_length.longest_within(points, 16 * 1024) == '512'
