"""Training dynamics from a recording: per-step quantities and how groups of rows move."""
