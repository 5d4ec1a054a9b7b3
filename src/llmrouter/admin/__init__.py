"""The dashboard: the operator's pages, served by the router under `dashboard.path` for admin keys.

security.py (path normalisation, headers, origin checks, login rate limit) -> sessions.py (login
sessions in the store) -> pages.py (the one entry point and the pages) reading queries.py (the
hourly rollup and the request log, every read bounded) and drawing charts.py (SVG on the server).
"""
