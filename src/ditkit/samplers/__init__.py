"""Samplers: integrate a prediction over a time grid.  Each is a plain function of a callable
``fn(x, t)`` and knows no network, objective or path."""
