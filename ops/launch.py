"""
A Triton launch as data, so that the code that runs a kernel and the static cost model that counts it
(scripts/kernel_cost.py) read the same choices: the kernel, its grid, warps and stages, its constexprs, the value
of each scalar argument and the dtype of each tensor argument, the trip count of each runtime loop summed over the
grid, and the bytes the launch must move at least (each input read once, each output written once).

An op's plan function turns shapes into launches; run() binds the tensors by name and launches.
"""
from dataclasses import dataclass, field


@dataclass
class Launch:
    fn: object                      # the @triton.jit kernel
    grid: tuple
    tensors: dict                   # argument name -> torch dtype of the tensor it points to
    scalars: dict                   # argument name -> int or float value
    consts: dict                    # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 2
    loops: list = field(default_factory=list)  # body executions of each runtime loop over the grid, program order
    hbm_bytes: int = 0              # compulsory global traffic

    @property
    def name(self):
        return self.fn.__name__

    def programs(self):
        n = 1
        for g in self.grid:
            n *= g
        return n


def run(launch, **tensors):
    """Launch with the tensors given by argument name (every name of launch.tensors)."""
    missing = set(launch.tensors) - set(tensors)
    assert not missing, f"{launch.name}: no tensor for {sorted(missing)}"
    launch.fn[launch.grid](**tensors, **launch.scalars, **launch.consts, num_warps=launch.num_warps,
                           num_stages=launch.num_stages)
