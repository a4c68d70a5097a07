"""Two processes on the loopback address train as one process does."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from conftest import ROOT, tiny_config
from sslj import checkpoint, methods, train

_FLAGS = ['--config=configs/supervised.py', '--config.num_steps=8', '--config.batch_size=16',
          '--config.eval_every=0', '--config.checkpoint_every=4', '--config.log_every=4',
          '--config.eval_batch_size=100']


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, data_dir, devices, extra=()):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.Popen(
      [sys.executable, 'launch.py', *_FLAGS, f'--config.data.data_dir={data_dir}',
       f'--workdir={workdir}', *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _launch_pair(workdir, data_dir, extra=()):
  """Two processes with two CPU devices each, joined over a fresh loopback port."""
  port = _free_port()
  return [_launch(workdir, data_dir, 2, [*extra, f'--coordinator_address=127.0.0.1:{port}',
                                         '--num_processes=2', f'--process_id={i}'])
          for i in range(2)]


def _outputs_of_successful(procs, timeout=600):
  """Waits for every process (killing any left on failure); asserts exit 0; their outputs."""
  outputs = []
  try:
    for p in procs:
      code = p.wait(timeout=timeout)
      outputs.append(p.stdout.read())
      assert code == 0, outputs[-1][-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outputs


def _final_state(workdir, data_dir):
  config = tiny_config('supervised', **{'data.data_dir': data_dir, 'num_steps': 8})
  data = train.load_data(config)
  method = methods.get('supervised').make(config, data, 8)
  # Saved over 4 devices; restored onto this process's first device.
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
                          jax.eval_shape(method.init, jax.random.key(0)))
  ckpt = checkpoint.Checkpointer(str(workdir), every=0, keep=3, read_only=True)
  try:
    assert ckpt.latest_step() == 8
    return ckpt.restore(template)
  finally:
    ckpt.close()


def test_two_processes_train_like_one(data_dir, tmp_path):
  # One process with 4 devices, and two processes with 2 devices each (the
  # same global mesh and batch), sharing a workdir as hosts share a file system.
  one = _launch(tmp_path / 'one', data_dir, 4)
  assert one.wait(timeout=600) == 0, one.stdout.read()[-3000:]
  outputs = _outputs_of_successful(_launch_pair(tmp_path / 'two', data_dir))
  assert 'Process 1 of 2 joined' in outputs[1]

  expected, got = _final_state(tmp_path / 'one', data_dir), _final_state(tmp_path / 'two', data_dir)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    # Cross-process reductions may add in another order: equal to float32 rounding.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  # Preemption often reaches one host first. Both processes must stop at the
  # same step (a lone stop would leave the other waiting in a collective) and
  # the same commands must then resume to the end.
  workdir = tmp_path / 'run'
  data_dir = str(tmp_path / 'tfds')  # unprepared: process 0 prepares, process 1 waits for it
  steps = ['--config.num_steps=300', '--config.log_every=10', '--config.checkpoint_every=0']
  procs = _launch_pair(workdir, data_dir, steps)
  try:
    deadline = time.time() + 300
    metrics = workdir / 'metrics.jsonl'
    while not (metrics.exists() and metrics.read_text().strip()):
      assert time.time() < deadline and procs[0].poll() is None, procs[0].stdout.read()[-3000:]
      time.sleep(0.05)
  except BaseException:
    for p in procs:
      p.kill()
    raise
  procs[0].send_signal(signal.SIGTERM)
  outputs = _outputs_of_successful(procs, timeout=300)
  stopped = [re.findall(r'Stopped at step (\d+) on SIGTERM', out) for out in outputs]
  assert stopped[0] and stopped[0] == stopped[1], outputs[1][-3000:]
  step = int(stopped[0][0])
  assert step % train.STOP_CHECK_EVERY == 0 and step < 300
  assert not (workdir / 'results.json').exists()

  for out in _outputs_of_successful(_launch_pair(workdir, data_dir, steps)):
    assert f'Resuming at step {step} of 300' in out
  assert (workdir / 'results.json').exists()
