"""pai-flow's pure library: specs, stage keys, the artifact store, models, data, masks,
criteria, training and the stage functions. Usable from a notebook; never imports
Prefect or MLflow (tests/test_layers.py holds it to that)."""
