"""Offline tools: benchmarks, evaluations, calibration and the KV memory model (DESIGN §1).

They drive an in-process engine or an embedded Serve app from the outside; nothing in the Serve app imports
from here (the dependency runs one way: tools -> cluster app -> workers).
"""
