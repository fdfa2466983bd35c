"""Training recipes: one file per recipe (adapter loop, contrastive, probe, in-context), behind one dispatch table."""
