"""The teacher cache: its identity and compatibility rules (``spec``) and the one module that
knows its zarr layout and does its checked reads and commits (``store``)."""
