import torch

# The test models are tiny: one intra-op thread is as fast alone and far faster when the cores are shared.
torch.set_num_threads(1)
