"""Ray Tune over whole ``pairmill train`` runs (``pairmill tune``)."""
