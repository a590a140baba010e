"""The config schema: `defaults.get_config()` holds every field and its default, and
`paper256` the paper's shared 256 px setting. The runnable configs are the files of the
repository's `configs/` folder, which start from these."""
