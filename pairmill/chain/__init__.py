"""``pairmill run``: the E5 chain (filter -> mine -> train -> evaluate) and its report: the face of
pairmill, above the jobs (``pipelines``, ``mining``, ``training``), which it imports. The rest of the
``pairmill`` package is the core and imports no job; nothing imports this package back."""
