"""``pairmill run``: the E5 chain (filter -> mine -> train -> evaluate) and its report. It sits above
the jobs (``pipelines``, ``mining``, ``training``); the core package ``pairmill`` imports none of them."""
