"""The face set: folder layout, ingest from the store, the FaceSet index, decoding and augmentation.

Nothing here imports torch at package import: `faceclf ingest` stays light.
"""
