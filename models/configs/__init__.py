"""Named model sizes (JSON) for `vlp.models.config.load_config`."""
