"""The adapter object and its lookup, the shared projections, the layers (float and quantized base),
refusals, NaN/inf guards."""
