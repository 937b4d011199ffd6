"""tiderl's rollout layer: engine, INT4 modules, agent loop, workers, the Trajectory record."""

import logging
import warnings

# torchao (imported by transformers) warns at import that its CUDA-only kernels (mxfp8, cutlass) cannot load,
# and torch warns about torchao's enum registrations. Both are harmless on a CPU build and would bury the
# job's own output in every Ray worker, so only their errors are shown.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# Weights and trajectories cross actors as zero-copy (read-only) tensors; tiderl only reads them (loading a
# state dict and padding a batch both copy), so Ray's and torch's warnings about that are noise here.
warnings.filterwarnings("ignore", message="Zero-copy tensor serialization is enabled")
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
