"""DeepSpeed JSON configs shipped with vlp (see README: Running on a GPU cluster)."""
