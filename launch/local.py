r"""Runs a real multi-process JAX job on this machine: N processes x D fake CPU devices each.

  python launch/local.py --num_processes=2 --devices_per_process=4 [--timeout=600] -- \
      python -m train --config=experiments/configs/gpt_shakespeare.py:tiny --workdir=/tmp/run

Each child runs the command with `--coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=I` appended (train/distributed.py then calls `jax.distributed.initialize`, its
coordinator bound to 127.0.0.1 only) and XLA_FLAGS/JAX_PLATFORMS set for D CPU devices, whose
collectives go over gloo. Each child's output is streamed line by line with a `[pI]` prefix.
If a child fails, or the timeout passes, every child is stopped (SIGTERM, then SIGKILL) and
the launcher exits non-zero with one line saying why: a multi-process job whose peer died
otherwise waits in a collective until JAX's own timeouts, minutes later.

Only the standard library: the launcher does not import JAX.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

KILL_GRACE_S = 5.0


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env(devices: int) -> dict[str, str]:
  flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', os.environ.get('XLA_FLAGS', ''))
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1',
          'XLA_FLAGS': ' '.join(
              [*flags.split(), f'--xla_force_host_platform_device_count={devices}'])}


def _stream(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
  for line in proc.stdout:
    with lock:
      sys.stdout.write(f'{prefix} {line}' if line.endswith('\n') else f'{prefix} {line}\n')
      sys.stdout.flush()


def _stop(procs: list[subprocess.Popen]) -> None:
  """SIGTERM to each child's process group, SIGKILL to those still alive after a grace time."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
      try:
        os.killpg(p.pid, sig)
      except ProcessLookupError:
        pass
    deadline = time.monotonic() + KILL_GRACE_S
    while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
      time.sleep(0.05)


def _describe(code: int) -> str:
  if code < 0:
    try:
      return f'was killed by {signal.Signals(-code).name}'
    except ValueError:
      return f'was killed by signal {-code}'
  return f'exited with status {code}'


def launch(command: list[str], num_processes: int, devices_per_process: int,
           timeout: float, port: int | None = None) -> int:
  """Runs the job; returns 0 when every process succeeded, else non-zero (after stopping all)."""
  port = port or free_port()
  env = child_env(devices_per_process)
  lock = threading.Lock()
  procs, threads = [], []
  for i in range(num_processes):
    argv = command + [f'--coordinator_address=127.0.0.1:{port}',
                      f'--num_processes={num_processes}', f'--process_id={i}']
    # Own session: stopping a child's group also stops anything it started.
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    procs.append(proc)
    with lock:
      print(f'[launch] process {i} started (pid {proc.pid})', flush=True)
    thread = threading.Thread(target=_stream, args=(proc, f'[p{i}]', lock), daemon=True)
    thread.start()
    threads.append(thread)

  # One waiter per child reports (exit time, index, code): the first failure in time is the
  # cause; the others usually fail because of it (a peer gone from a collective).
  exits: queue.Queue = queue.Queue()
  for i, proc in enumerate(procs):
    threading.Thread(target=lambda i=i, p=proc: exits.put((i, p.wait())), daemon=True).start()
  deadline = time.monotonic() + timeout
  failure, done = None, 0
  try:
    while done < num_processes:
      try:
        i, code = exits.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        failure = (f'timeout: {timeout:g}s passed with {num_processes - done} process(es) '
                   f'still running; stopped them')
        break
      done += 1
      if code != 0:
        failure = (f'process {i} {_describe(code)}; stopped the other '
                   f'{sum(p.poll() is None for p in procs)} process(es)')
        break
  except KeyboardInterrupt:
    failure = 'interrupted; stopped every process'
  finally:
    _stop(procs)
    for thread in threads:
      thread.join(timeout=2.0)
  if failure:
    print(f'error: {failure}', file=sys.stderr, flush=True)
    return 1
  return 0


def _interrupt(signum, frame):
  """SIGTERM to the launcher (e.g. from a scheduler) stops the children too."""
  del signum, frame
  raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if '--' not in argv:
    print('error: give the train command after --, e.g. launch/local.py --num_processes=2 '
          '-- python -m train --config=... --workdir=...', file=sys.stderr)
    return 2
  split = argv.index('--')
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=4)
  parser.add_argument('--timeout', type=float, default=3600.0,
                      help='seconds before every process is stopped')
  parser.add_argument('--port', type=int, default=None, help='coordinator port (default: free)')
  args = parser.parse_args(argv[:split])
  command = argv[split + 1:]
  if not command:
    parser.error('empty command after --')
  if args.num_processes < 1 or args.devices_per_process < 1 or args.timeout <= 0:
    parser.error('--num_processes, --devices_per_process and --timeout must be positive')
  signal.signal(signal.SIGTERM, _interrupt)
  return launch(command, args.num_processes, args.devices_per_process, args.timeout, args.port)


if __name__ == '__main__':
  sys.exit(main())
