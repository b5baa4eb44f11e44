"""``wakelab sweep``: plan, run the children, compare (a table and one HTML page), resume. App layer."""
