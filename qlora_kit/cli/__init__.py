"""The command line: `qlora-kit` and its commands (app.py), `auto` (auto.py: probe, choose, train) and the
offline `demo` (demo.py). The only package that may import from every other.
"""
