"""Training recipes shipped with vlp (YAML; `vlp train --recipe`)."""
