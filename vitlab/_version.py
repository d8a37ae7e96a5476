"""vitlab's version, in a module of its own so that any unit (checkpoint, profiling, cli) can read it without
importing the package root, which imports them."""
__version__ = "0.1.0"
