"""Locate: keys (FFN-out inputs), target values (batched δ optimisation) and key statistics Σ₀."""
