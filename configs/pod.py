"""Many devices on many hosts: the default model on 100K synthetic pages, global batch 512,
parameters and optimizer state sharded over groups of 8 devices (FSDP), batch over everything.

Run the same command on every host. TPU pod slice (JAX finds the other hosts by itself):

  gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \\
    "cd phase1_jax && python -m phase1_jax.train --config configs/pod.py --workdir /mnt/shared/pod"

GPU cluster under SLURM (`distributed='auto'` reads SLURM's environment; one task per node):

  srun --nodes 4 --ntasks-per-node 1 python -m phase1_jax.train --config configs/pod.py \\
    --workdir /shared/pod

Any other cluster: name the coordinator (process 0's host and a free port) on every node:

  python -m phase1_jax.train --config configs/pod.py --workdir /shared/pod \\
    --config.parallel.distributed=manual --config.parallel.coordinator_address=node0:12345 \\
    --config.parallel.num_processes=4 --config.parallel.process_id=$NODE_RANK

The workdir must be one directory every host sees (Orbax writes each host's shards there; only
process 0 writes logs and JSON). `train.batch_size` is the global batch: it must divide by the
device count. `--config.parallel.fsdp=1` replicates the state instead (plain data parallel).
"""
from phase1_jax.config import base_config


def get_config():
  config = base_config()
  config.exp_name = 'phase1_pod'
  config.data.train_samples = 100_000
  config.data.val_samples = 2000
  config.train.batch_size = 512
  config.train.num_epochs = 20
  config.train.learning_rate = 3e-4
  config.train.warmup_steps = 1000
  config.eval.batch_size = 128
  config.checkpoint.every_steps = 500     # preemptible pods lose at most 500 steps
  config.parallel.mode = 'jit'
  config.parallel.fsdp = 8
  config.parallel.distributed = 'auto'
  return config
