"""Models, checkpoints and summaries of the PEDConv training system (the training engine lands here too)."""
