"""The built-in plugins, registered through the same entry-point group third-party plugins use; each sees only the
public API."""
