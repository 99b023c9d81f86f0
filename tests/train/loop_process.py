"""One process of the multi-process run in test_multiprocess.py (not a test module).

  python loop_process.py CONFIG_JSON WORKDIR PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES

Runs ``loop.run`` on ``LOCAL_DEVICES`` fake CPU devices as process ``PROCESS_ID`` of a
``jax.distributed`` cluster coordinated on localhost:PORT (CPU collectives: gloo).
"""
import json
import os
import pathlib
import sys

config_file, workdir, process_id, num_processes, port, local_devices = sys.argv[1:]
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={local_devices}'
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402  (XLA_FLAGS must be set before JAX starts)
import ml_collections  # noqa: E402

jax.config.update('jax_cpu_collectives_implementation', 'gloo')

from peftjax.train import loop  # noqa: E402

config = ml_collections.ConfigDict(json.loads(pathlib.Path(config_file).read_text()))
config.distributed = dict(coordinator_address=f'localhost:{port}',
                          num_processes=int(num_processes), process_id=int(process_id))
loop.run(config, workdir)
