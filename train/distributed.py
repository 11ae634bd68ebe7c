"""The one place that decides whether and how to call `jax.distributed.initialize`.

  * explicit flags (`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`): any
    machine, e.g. `launch/local.py` on one machine (a loopback coordinator binds 127.0.0.1
    only; the default would listen on every interface);
  * a SLURM job step with several tasks, or a Cloud TPU VM: `jax.distributed.initialize()`
    with no arguments, which reads the SLURM environment or the TPU metadata itself;
  * otherwise one process, nothing to initialize.
It must run before JAX touches a backend (first thing in `main`).
"""

from __future__ import annotations

import os

import jax

from train.errors import UserError

# Seconds a process waits for all others to connect to the coordinator.
INIT_TIMEOUT_S = 300


def detect_cluster() -> str | None:
  """'slurm' in a SLURM job step of more than one task, 'tpu' on a Cloud TPU VM, else None."""
  if 'SLURM_JOB_ID' in os.environ and 'SLURM_STEP_NODELIST' in os.environ:
    if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
      return 'slurm'
  if os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('TPU_ACCELERATOR_TYPE'):
    return 'tpu'
  try:  # TPU chips on the PCI bus, as JAX's own Cloud TPU detection checks.
    from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
      return 'tpu'
  except Exception:  # pylint: disable=broad-except
    pass  # a private helper: if it moved, only the explicit flags and SLURM remain
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str:
  """Joins the job's processes into one JAX runtime; returns how ('flags', 'slurm', 'tpu',
  'single')."""
  given = {'--coordinator_address': coordinator_address, '--num_processes': num_processes,
           '--process_id': process_id}
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise UserError(f'{", ".join(missing)}: needed with '
                      f'{", ".join(k for k in given if k not in missing)} (give all three)')
    host, _, port = coordinator_address.rpartition(':')
    if not host or not port.isdigit():
      raise UserError(f'--coordinator_address={coordinator_address}: expected HOST:PORT')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise UserError(f'--process_id={process_id} must be in [0, --num_processes='
                      f'{num_processes})')
    if num_processes == 1:
      return 'single'
    loopback = host in ('127.0.0.1', 'localhost', '[::1]')
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, initialization_timeout=INIT_TIMEOUT_S,
        coordinator_bind_address=f'127.0.0.1:{port}' if loopback else None)
    return 'flags'
  cluster = detect_cluster()
  if cluster is None:
    return 'single'
  local_device_ids = None
  if cluster == 'slurm' and os.environ.get('SLURM_NTASKS_PER_NODE') == '1':
    # JAX assumes one task per GPU under SLURM (device SLURM_LOCALID); one task per node
    # takes all the node's GPUs.
    gpus = int(os.environ.get('SLURM_GPUS_ON_NODE', '0') or 0)
    local_device_ids = list(range(gpus)) or None
  jax.distributed.initialize(local_device_ids=local_device_ids,
                             initialization_timeout=INIT_TIMEOUT_S)
  return cluster
