"""torch.distributed between replicas that come and go: pair groups (no global world) and the KV channels on them."""
