"""Near-duplicate removal of gallery images against a validation set (SSLD's first stage).

extract    SIFT features of every image into packed, resumable, appendable shards.
shortlist  VLAD (k-means codebook on the reference descriptors) or user embeddings.
verify     exact matching + ratio test + one-to-one + geometric check (OpenCV).
pipeline   ``ssld dedup``: the stages above, sharded and resumable, and the report.
"""
