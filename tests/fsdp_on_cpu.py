"""``dpokit`` under Accelerate's FSDP2 in gloo CPU processes, for the tests.

Accelerate turns FSDP on only for accelerator devices; a machine without one gets plain
multi-process CPU (DDP). This launcher lifts that one gate (after Accelerate has set up its
gloo process group, it switches the state to FSDP with the plugin ``accelerate launch --use_fsdp``
configured through the environment) and runs the dpokit command line. Everything after that is
the real path: ``accelerator.prepare`` shards the model with ``fully_shard`` over a CPU device
mesh, and every forward, backward, gradient clip, optimizer step and state-dict gather is
FSDP2's, with gloo collectives.

    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 tests/fsdp_on_cpu.py train cfg.yaml ...
"""

import sys

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = accelerate.Accelerator.__init__


def broadcasts_through_cuda() -> bool:
    """Whether this Accelerate's ``cpu_ram_efficient_loading`` (rank 0's weights broadcast into the
    shards) moves the weights through CUDA tensors, with no CPU path (Accelerate 1.6 does)."""
    import inspect

    from accelerate.utils import fsdp_utils

    return ".cuda()" in inspect.getsource(fsdp_utils.fsdp2_load_full_state_dict)


def _init_sharded_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.state.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* settings
        if broadcasts_through_cuda():  # then every process reads the weights (dpokit.sharding.weights_on_main_only)
            plugin.cpu_ram_efficient_loading = False
        self.state.fsdp_plugin = plugin
        self.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP  # both shared states


def _reporting_weight_reads():
    """Say on stdout which process reads a model's weights (``fsdp_on_cpu: process R read the model
    weights``), so tests see whether the processes other than the main one read none."""
    import os

    from dpokit import modeling

    read = modeling._from_pretrained

    def reporting(loader, path, what, **kwargs):
        if what == "model":
            print(f"fsdp_on_cpu: process {os.environ.get('RANK', '0')} read the model weights", flush=True)
        return read(loader, path, what, **kwargs)

    modeling._from_pretrained = reporting


if __name__ == "__main__":
    from dpokit.cli import main

    accelerate.Accelerator.__init__ = _init_sharded_on_cpu
    _reporting_weight_reads()
    sys.exit(main(sys.argv[1:]))  # a launched process's main() ends it (dpokit.launch)
