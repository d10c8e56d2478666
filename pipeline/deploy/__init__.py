"""Deployment: turn a checkpoint into an export that serving and the eval jobs load (`vlp export`)."""
