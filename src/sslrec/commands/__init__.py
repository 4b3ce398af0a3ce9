"""The command-line programs, installed as console scripts (pyproject.toml) and kept runnable from a
checkout as ``launch/*.py``: ``train`` (sslrec-train), ``sweep`` (sslrec-sweep), ``export``
(sslrec-export), ``retrieve`` (sslrec-retrieve)."""
