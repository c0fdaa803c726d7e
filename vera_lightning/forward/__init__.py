"""How an adapted layer computes: the path table, the low-rank autograd nodes, the merged form, the cost model, sharing.

The bottom floor above ``config``: it reads a layer only through :class:`~vera_lightning.forward.protocol.AdaptedLayer`
and imports nothing else of the package.
"""
