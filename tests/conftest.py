"""Shared test set-up: quiet, single-threaded torch so the tests stay fast on small machines."""

import torch

torch.set_num_threads(1)
