"""Plotting shared by the chain's report and tune's trials.png."""


def pyplot():
    """matplotlib's pyplot on the Agg backend (the report and tune's trials.png write files only)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt
