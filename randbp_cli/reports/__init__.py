"""Typed reports and what becomes of them: the JSON record and the measurement records with their
units (record.py), the report kinds (report.py), reading a file back (load.py, checked by
shapes.py), atomic writes (files.py), and rendering (tables.py, render.py, plots.py: the only
modules here that import rich or matplotlib). Imports run/ (method labels) and below.
"""
