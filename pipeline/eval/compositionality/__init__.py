"""Compositionality: does the model prefer a caption over a minimally edited one?"""
