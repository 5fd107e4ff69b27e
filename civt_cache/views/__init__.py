"""The views: the recipe, the view records (layout, sampling, pairing), and the engine that
renders records into pixels in batches on any device (decode, Pillow-exact resampling, the
per-family ops, one packed transfer per batch). Imports the data layer only."""
