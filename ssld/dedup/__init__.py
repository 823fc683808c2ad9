"""Near-duplicate removal of gallery images against a validation set (SSLD's first stage).

extract: SIFT features of every image into packed, resumable shards.
"""
