"""The plugin contract: hook specifications, the contexts hooks receive, the registry, plugin config sections and the
generated hook reference. Core layer."""
