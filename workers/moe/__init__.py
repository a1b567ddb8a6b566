"""Mixture-of-experts layers (issue 17 builds them here): routers (top-k, grouped, dMoE block coresets),
expert-parallel dispatch/combine over the torch.distributed groups of workers/dist/, expert placement and
rebalancing, REAP pruning. The decoder (workers/model/llama.py) calls an MoE block where a dense MLP stands;
everything above the model (scheduler, runner records, KV) is unchanged by it.
"""
