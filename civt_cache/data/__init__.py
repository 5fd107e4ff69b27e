"""The data: manifests (sample identity), reading WebDataset shards, writing them
(``make-shards``), image checks, and the built-in sources (scikit-learn digits, synthetic
ImageNet-shaped JPEGs). Imports nothing of the views, the cache, the loader or the stages."""
