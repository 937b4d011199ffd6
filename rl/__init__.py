"""tiderl's job package: config, CLI, the controller loop, learner, advantages, losses, checkpoints, metrics."""

import logging

# torchao (imported by transformers) warns at import that its CUDA-only kernels (mxfp8, cutlass) cannot load,
# and torch warns about torchao's enum registrations. Both are harmless on a CPU build and would bury the
# job's own output in every Ray worker, so only their errors are shown.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
