"""Reporting: compute once into typed rows, render many.

``build.py`` reads the database (SQL in ``db/reports.py``) into a ``rows.Report``; ``stats.py``
holds the pure statistics; ``render.py`` writes the table, markdown, CSV and JSON; ``figures.py``
the PNG figures and ``page.py`` the HTML page that holds them.
"""
