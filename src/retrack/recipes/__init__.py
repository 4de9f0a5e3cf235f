"""Built-in data sets and small models that ship with retrack and work offline."""
