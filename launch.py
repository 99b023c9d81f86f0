"""peftjax entry point: ``python launch.py --config=configs/sentiment.py:method=lora --workdir=DIR``.

Any config field can be overridden on the command line, e.g. ``--config.peft.rank=16``.
"""
from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml-collections config file[:arg].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and exports.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  from peftjax.train import loop
  loop.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
