"""Config validation, optimizer and the training loop."""
